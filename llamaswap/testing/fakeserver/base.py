# -*- test-case-name: tests.test_fakeserver -*-
"""
What every route of the fake server shares: JSON in and out, the error
envelope, the L{Endpoint} leaf (method dispatch, the 503 while loading), the
options of one generation, and the way a body goes out (whole, later, or as a
stream paced on the fake's clock that stops when the client leaves).

The envelope is C{{"error": {"code": <int>, "message": ..., "type": ...}, "served_by": ...}},
llama-server's shape (an integer code, no C{param}), not
L{llamaswap.errors.error_body}'s OpenAI shape, so it stays our own.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from typing import Any, TypeAlias

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from llamaswap.testing.fakeserver.helpers import dumps, parse_duration, words
from llamaswap.testing.fakeserver.server import FakeServer
from llamaswap.web import sse

JSONObject: TypeAlias = dict[str, Any]
RenderResult: TypeAlias = bytes | int
Handler: TypeAlias = Callable[[Request], RenderResult]


class HTTPError(Exception):
    """Raised by a handler to answer with a JSON error instead."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@frozen
class Generation:
    """What one generation request asked for, after defaults and overrides."""

    model: str
    tokens: int
    token_delay: float
    finish_reason: str  # "stop", or "length" when max_tokens cut it short
    prompt_tokens: int
    wait: float  # delay before anything is sent (fake_delay / ?wait=)


@frozen
class Stream:
    """A response body: frames written at once, frames paced, frames at the end."""

    head: Sequence[bytes]
    paced: Iterable[bytes]
    tail: Iterable[bytes] = field(default=())
    delay: float = 0.0
    content_type: bytes = b"text/event-stream"


# -- request and response helpers ---------------------------------------------


def json_response(request: Request, obj: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return dumps(obj)


def error_response(request: Request, status: int, message: str, kind: str, name: str) -> bytes:
    """The fake's error envelope (see the module docstring), with C{status}."""
    body = {"error": {"code": status, "message": message, "type": kind}, "served_by": name}
    return json_response(request, body, status)


def header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def read_json(request: Request) -> tuple[JSONObject, bytes]:
    """The body as a JSON object, and its raw bytes. @raise HTTPError: 400, not an object."""
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise HTTPError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise HTTPError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise HTTPError(400, "JSON body must be an object")
    return body, raw


def query(request: Request, name: bytes, default: str) -> str:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else default


def first_arg(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def headers_dict(request: Request) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


def model_of(body: JSONObject, default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def sse_json(obj: object, event: str | None = None) -> bytes:
    """One server-sent event carrying C{obj} as compact JSON, named C{event} when given."""
    return sse.frame(dumps(obj), None if event is None else event.encode("ascii"))


def include_usage(body: JSONObject) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _ignore_cancel(reason: Failure) -> None:
    # The client left and we cancelled our own work: that is the happy path.
    reason.trap(CancelledError)


# -- streaming ----------------------------------------------------------------


@implementer(IPushProducer)
class _FramePusher:
    """
    Writes frames as fast as the client takes them: a push producer that
    stops when the transport's buffer is full and goes on when it drains, so
    a large body never sits whole in memory.
    """

    def __init__(self, fake: FakeServer, request: Request, frames: Iterator[bytes]) -> None:
        self._fake = fake
        self._request = request
        self._frames = frames
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        request = self._request
        for frame in self._frames:
            if self._stopped:
                return
            self._fake.write_frame(request, frame)
            if self._paused or self._stopped:
                return
        if not self._stopped:
            self._stopped = True
            request.unregisterProducer()
            request.finish()

    def stopProducing(self) -> None:
        self._stopped = True


# -- routes -------------------------------------------------------------------


class Routes:
    """
    A family of request handlers (one API); each handler takes a request and
    returns body bytes or NOT_DONE_YET. L{table} says which path each serves.
    """

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.name = fake.name

    def table(self) -> dict[str, Endpoint]:
        """Path (no leading slash) -> endpoint, for L{tree.build_root}."""
        raise NotImplementedError

    def get(self, handler: Handler) -> Endpoint:
        """An endpoint answering GET (and HEAD) with C{handler}."""
        return Endpoint(self, {b"GET": handler})

    def post(self, handler: Handler) -> Endpoint:
        """An endpoint answering POST with C{handler}, and 503 while loading."""
        return Endpoint(self, {b"POST": handler}, gated=True)

    def any(self, handler: Handler) -> Endpoint:
        """An endpoint answering every method with C{handler}."""
        return Endpoint(self, {b"*": handler})

    def error(self, request: Request, status: int, message: str, kind: str) -> bytes:
        return error_response(request, status, message, kind, self.name)

    def identity(self, request: Request, raw: bytes | None, model: str) -> JSONObject:
        """The fields every JSON answer to a POST carries."""
        out: JSONObject = {
            "served_by": self.name,
            "h_content_length": header(request, b"content-length"),
        }
        if self.fake.options.echo:
            out["request_headers"] = headers_dict(request)
            out["request_body"] = None if raw is None else raw.decode("utf-8", "replace")
        return out

    def check_model(self, model: str) -> None:
        expected = self.fake.options.expect_model
        if expected is not None and model != expected:
            raise HTTPError(400, f"Invalid model: {model}, expected: {expected}")

    def generation(self, request: Request, body: JSONObject) -> Generation:
        opts = self.fake.options
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = self.name
        self.check_model(model)
        tokens = body.get("fake_tokens", opts.tokens)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= 10**7:
            raise HTTPError(400, "fake_tokens must be an integer in [0, 10000000]")
        delay = body.get("fake_token_delay", opts.token_delay)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60:
            raise HTTPError(400, "fake_token_delay must be a number of seconds in [0, 60]")
        wait = self._wait(request, body)
        finish = "stop"
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict"):
            limit = body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < tokens:
                tokens, finish = limit, "length"
                break
        prompt = sum(
            words(body.get(k)) for k in ("messages", "prompt", "input", "system", "input_extra")
        )
        return Generation(model, tokens, float(delay), finish, max(prompt, 1), float(wait))

    def _wait(self, request: Request, body: JSONObject) -> float:
        """The delay before answering: C{?wait=} if given, else the body's C{fake_delay}."""
        wait = body.get("fake_delay", 0)
        query_wait = request.args.get(b"wait")
        if query_wait:
            try:
                wait = parse_duration(query_wait[0].decode("ascii", "replace"))
            except ValueError:
                raise HTTPError(400, "wait: bad duration") from None
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 600:
            raise HTTPError(400, "fake_delay must be a number of seconds in [0, 600]")
        return float(wait)

    def usage(self, gen: Generation) -> JSONObject:
        return {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.tokens,
            "total_tokens": gen.prompt_tokens + gen.tokens,
        }

    def timings(self, gen: Generation) -> JSONObject:
        predicted_ms = gen.tokens * gen.token_delay * 1000.0
        return {
            "prompt_n": gen.prompt_tokens,
            "prompt_ms": 1.0,
            "predicted_n": gen.tokens,
            "predicted_ms": predicted_ms,
            "predicted_per_second": gen.tokens / (predicted_ms / 1000.0) if predicted_ms else 0.0,
        }

    def deliver(
        self, request: Request, wait: float, produce: Callable[[], bytes | Stream]
    ) -> RenderResult:
        """
        Answer with C{produce()}: a whole body, or a L{Stream}. With a C{wait},
        answer later, and not at all if the client leaves in the meantime.
        """
        if wait <= 0:
            result = produce()
            if isinstance(result, bytes):
                return result
            return self.start_stream(request, result)
        d = Deferred.fromCoroutine(self._deliver_later(request, wait, produce))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(_ignore_cancel)
        return server.NOT_DONE_YET

    async def _deliver_later(
        self, request: Request, wait: float, produce: Callable[[], bytes | Stream]
    ) -> None:
        await deferLater(self.fake.clock, wait)
        result = produce()
        if isinstance(result, bytes):
            request.setHeader(b"content-length", b"%d" % len(result))
            request.write(result)
            request.finish()
        else:
            self.start_stream(request, result)

    def start_stream(self, request: Request, stream: Stream) -> int:
        """
        Send C{stream}, writing each frame as soon as it is due, and stop at
        once when the client goes away.

        @return: C{NOT_DONE_YET}.
        """
        request.setHeader(b"content-type", stream.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        if stream.delay <= 0:
            frames = chain(stream.head, stream.paced, stream.tail)
            _FramePusher(self.fake, request, frames).start()
            return server.NOT_DONE_YET
        d = Deferred.fromCoroutine(self._paced(request, stream))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(_ignore_cancel)
        return server.NOT_DONE_YET

    async def _paced(self, request: Request, stream: Stream) -> None:
        fake = self.fake
        # The status line and headers go out at once, as llama-server's do,
        # even for streams whose first frame is a token (completions, /sse).
        request.write(b"")
        for frame in stream.head:
            fake.write_frame(request, frame)
        for frame in stream.paced:
            await deferLater(fake.clock, stream.delay)  # cancelled when the client leaves
            fake.write_frame(request, frame)
        for frame in stream.tail:
            fake.write_frame(request, frame)
        request.finish()


class Endpoint(Resource):
    """
    A leaf answering some methods. C{gated} routes answer 503 while the model
    is "loading", as llama-server does.
    """

    isLeaf = True

    def __init__(
        self, routes: Routes, handlers: dict[bytes, Handler], *, gated: bool = False
    ) -> None:
        super().__init__()
        self._routes = routes
        self._handlers = handlers
        if b"GET" in handlers and b"HEAD" not in handlers:
            self._handlers = {**handlers, b"HEAD": handlers[b"GET"]}
        self._gated = gated

    def render(self, request: Request) -> RenderResult:
        routes = self._routes
        handler = self._handlers.get(request.method) or self._handlers.get(b"*")
        if handler is None:
            request.setHeader(b"allow", b", ".join(sorted(self._handlers)))
            method = request.method.decode("ascii", "replace")
            return routes.error(
                request, 405, f"method {method} not allowed", "invalid_request_error"
            )
        if self._gated and routes.fake.loading:
            return routes.error(request, 503, "Loading model", "unavailable_error")
        try:
            return handler(request)
        except HTTPError as e:
            return routes.error(request, e.status, e.message, e.kind)
