# -*- test-case-name: tests.test_resources -*-
"""
twisted.web building blocks whose errors are ours, never twisted.web's pages.

twisted.web's own 404, 405 and 500 answers are HTML pages; an OpenAI client
cannot parse them. Every node of our tree derives from L{JSONResource}: unknown
children are a 404, unknown methods a 405 (with C{Allow}), and an exception
escaping a C{render_*} method a 500, each rendered by L{error_payload}: OpenAI's
JSON envelope unless the client's C{Accept} asks for plain text or HTML.

Every response that outlives its C{render_*} call (the relay, load/unload,
C{/logs/stream}, C{/api/events}, C{/metrics}) goes through L{render_async};
L{client_gone} is the one test of whether anyone is still listening. Resources
see the supervisor through L{SupervisorAPI}, not its class.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from llamaswap.errors import ProxyError
from llamaswap.supervisor import StatusSource

if TYPE_CHECKING:
    from llamaswap.config.schema import ApiKey
    from llamaswap.names import LocalTarget
    from llamaswap.scheduling import QueueStats
    from llamaswap.supervisor import Lease, ModelStatus

_log = Logger()
JSON_TYPE = b"application/json"
TEXT_TYPE = b"text/plain; charset=utf-8"
HTML_TYPE = b"text/html; charset=utf-8"
# The methods a JSONResource may implement, in the order Allow lists them.
_METHODS = (b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS")


class SupervisorAPI(StatusSource, Protocol):
    """What the web resources call on the supervisor (L{llamaswap.supervisor.Supervisor})."""

    def acquire(self, target: LocalTarget, *, api_key: ApiKey | None = None) -> Deferred[Lease]: ...

    def position(self, acquired: Deferred[Lease]) -> tuple[int, int] | None: ...

    def unload(self, model_id: str | None = None) -> Deferred[None]: ...

    def status(self, model_id: str) -> ModelStatus: ...

    @property
    def stats(self) -> QueueStats:
        """The queue's counts (waits, refusals, swaps), for C{/metrics}."""


# An answer computed asynchronously: (status, content type, body).
Answer = tuple[int, bytes, bytes]


def client_gone(request: Request) -> bool:
    """
    Whether nothing more can be written to C{request}: its client left, or the
    response is finished. The one place that reads how twisted.web says so
    (C{channel} is None once the connection is lost, deleted once finished).
    """
    return bool(request.finished) or getattr(request, "channel", None) is None


def json_bytes(obj: object) -> bytes:
    """Serialize for a response body (UTF-8, compact but readable)."""
    return json.dumps(obj, ensure_ascii=False).encode("utf-8")


def read_body(request: Request) -> bytes:
    """The whole request body. Read it in C{render}: it is closed if the client leaves."""
    content = request.content
    if content is None:
        return b""
    data: bytes = content.read()
    return data


def respond(request: Request, status: int, body: bytes, content_type: bytes = JSON_TYPE) -> bytes:
    """Set status and Content-Type; return C{body} for a C{render_*} method to return."""
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", content_type)
    return body


def respond_json(request: Request, obj: object, status: int = 200) -> bytes:
    """Answer C{obj} as JSON."""
    return respond(request, status, json_bytes(obj))


def _accepted(accept: bytes) -> set[bytes]:
    """The media types an C{Accept} header allows (those with C{q=0} are refused)."""
    types = set()
    for item in accept.lower().split(b","):
        media, *params = item.split(b";")
        quality = 1.0
        for param in params:
            name, _, value = param.partition(b"=")
            if name.strip() == b"q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 1.0
        if media.strip() and quality > 0:
            types.add(media.strip())
    return types


def error_payload(error: ProxyError, accept: bytes | None) -> tuple[bytes, bytes]:
    """
    C{(content type, body)} for an error, by the request's C{Accept}: JSON if it
    names JSON (OpenAI and Anthropic SDKs send C{application/json}), else plain
    text for C{text/plain}, else a small page for C{text/html} (a browser), else
    JSON (C{*/*}, nothing, anything else).
    """
    types = _accepted(accept or b"")
    if not any(t == JSON_TYPE or t.endswith(b"+json") for t in types):
        if b"text/plain" in types:
            return TEXT_TYPE, f"llamaswap: {error.message}\n".encode("utf-8", "replace")
        if b"text/html" in types:
            message = html.escape(error.message).replace("\n", "<br>")
            page = (
                f"<!doctype html><html><head><meta charset=utf-8><title>llamaswap: "
                f"{error.status}</title></head><body><h1>llamaswap</h1><p>{message}</p>"
                "</body></html>\n"
            )
            return HTML_TYPE, page.encode("utf-8", "replace")
    return JSON_TYPE, error.body()


def request_accept(request: Request) -> bytes:
    """Every C{Accept} header of C{request}, joined."""
    return b",".join(request.requestHeaders.getRawHeaders(b"accept", []))


def respond_error(request: Request, error: ProxyError) -> bytes:
    """Answer a L{ProxyError} (see L{error_payload}), with its C{Retry-After} (a 429: 1 s)."""
    retry_after = error.retry_after
    if retry_after is None and error.status == 429:
        retry_after = 1
    if retry_after is not None:
        request.setHeader(b"Retry-After", b"%d" % retry_after)
    content_type, body = error_payload(error, request_accept(request))
    return respond(request, error.status, body, content_type)


def send_error(request: Request, error: ProxyError) -> None:
    """Finish an asynchronous request with a JSON error (if it can still be answered)."""
    if client_gone(request):
        return
    if getattr(request, "startedWriting", False):
        # Status and headers are gone already: a truncated body must not look complete.
        request.loseConnection()
        return
    body = respond_error(request, error)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


class JSONResource(Resource):
    """
    A resource whose errors are ours (JSON unless C{Accept} says otherwise).

    Subclasses define C{render_GET}, C{render_POST}... as usual, or C{render_any}
    for every method. HEAD is served by C{render_GET} when there is neither a
    C{render_HEAD} nor a C{render_any} (twisted.web drops the body).
    """

    log = Logger()

    def getChild(self, path: bytes, request: Request) -> IResource:
        return NotFound(self._not_found(request))

    @staticmethod
    def _not_found(request: Request) -> str:
        return f"not found: {request.path.decode('utf-8', 'replace')}"

    def allowed_methods(self) -> list[bytes]:
        methods = [m for m in _METHODS if callable(getattr(self, f"render_{m.decode()}", None))]
        if b"GET" in methods and b"HEAD" not in methods:
            methods.insert(methods.index(b"GET") + 1, b"HEAD")
        return methods

    def render(self, request: Request) -> bytes | int:
        method = request.method.decode("ascii", "replace")
        if request.method not in _METHODS:
            # Methods are case-sensitive (RFC 9110): "get" is not GET, and is
            # neither served nor relayed; nor is anything else we do not know.
            message = f"method {method} not implemented"
            if request.method.upper() in _METHODS:
                message += f" (methods are case-sensitive: {method.upper()})"
            return respond_error(request, ProxyError(message, 501))
        handler = getattr(self, f"render_{method}", None) or getattr(self, "render_any", None)
        if handler is None and method == "HEAD":
            handler = getattr(self, "render_GET", None)
        if not callable(handler):
            if not self.allowed_methods():  # an inner node, not an endpoint
                return respond_error(request, ProxyError(self._not_found(request), 404))
            request.setHeader(b"Allow", b", ".join(self.allowed_methods()))
            return respond_error(request, ProxyError(f"method {method} not allowed", 405))
        try:
            result: bytes | int = handler(request)
        except ProxyError as e:
            return respond_error(request, e)
        except Exception:
            self.log.failure("error rendering {method} {uri}", method=method, uri=request.uri)
            if getattr(request, "startedWriting", False):
                request.loseConnection()
                return NOT_DONE_YET
            return respond_error(request, ProxyError("internal error", 500))
        return result

    # twisted.web's default render_HEAD calls render_GET even when absent.
    render_HEAD: Any = None


class NotFound(JSONResource):
    """A JSON 404 for any method, and for any path below it."""

    isLeaf = True

    def __init__(self, message: str = "not found") -> None:
        super().__init__()
        self._message = message

    def render(self, request: Request) -> bytes:
        return respond_error(request, ProxyError(self._message, 404))


class ErrorResource(JSONResource):
    """Answers one fixed L{ProxyError} for any method and any path below it."""

    isLeaf = True

    def __init__(self, error: ProxyError, headers: dict[bytes, bytes] | None = None) -> None:
        super().__init__()
        self._error = error
        self._headers = headers or {}

    def render(self, request: Request) -> bytes:
        for name, value in self._headers.items():
            request.setHeader(name, value)
        return respond_error(request, self._error)


class Redirect(JSONResource):
    """Redirect any method to C{location} with C{status} (a leaf: nothing below it)."""

    isLeaf = True

    def __init__(self, location: bytes, status: int = 302) -> None:
        super().__init__()
        self._location = location
        self._status = status

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Location", self._location)
        return respond_json(request, {"location": self._location.decode()}, self._status)


def internal_error(request: Request, failure: Failure) -> ProxyError:
    """A L{ProxyError} as it is; anything else is logged and becomes a JSON 500."""
    if failure.check(ProxyError):
        error = failure.value
        assert isinstance(error, ProxyError)
        return error
    _log.failure("answering {uri} failed", failure, uri=request.uri)
    return ProxyError("internal error", 500)


def render_async(
    request: Request,
    work: Callable[[], Deferred[Any]],
    *,
    cancel: bool = True,
    error: Callable[[Request, Failure], ProxyError] = internal_error,
) -> int:
    """
    Serve C{request} from C{work()}, a Deferred that answers it (writes and
    finishes it) and fires when done: the one asynchronous render loop.

    One flag says the response is over, set when C{notifyFinish} fires either
    way; it is asked for before C{work} starts, so a response finished at once
    still sets it. The client leaving cancels the work (unless C{cancel} is
    false: an unload goes on). A failure of the work, while the client is still
    there, is answered as C{error(request, failure)} (a L{ProxyError}; see
    L{send_error}); after the end it is dropped (cancellation is expected).

    @return: C{NOT_DONE_YET}, for a C{render_*} method to return.
    """
    finished = left = False
    work_done: Deferred[Any] | None = None

    def ended(result: Failure | None) -> None:
        nonlocal finished, left
        finished = True
        left = isinstance(result, Failure)  # the connection was lost first
        if left and cancel and work_done is not None:
            work_done.cancel()

    def failed(failure: Failure) -> None:
        if finished or client_gone(request):
            return
        send_error(request, error(request, failure))

    request.notifyFinish().addBoth(ended)
    try:
        work_done = work()
    except BaseException:
        work_done = fail()
    if left and cancel:
        work_done.cancel()  # the client left while the work started
    work_done.addErrback(failed)
    return NOT_DONE_YET


def _answer(answer: Answer, request: Request) -> None:
    if client_gone(request):
        return
    status, content_type, body = answer
    respond(request, status, body, content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def render_answer(
    request: Request, work: Callable[[], Deferred[Answer]], *, cancel: bool = True
) -> int:
    """
    L{render_async} for work that fires with an L{Answer}: it is written as
    the response (a failure becomes its JSON error). Returns C{NOT_DONE_YET}.
    """
    return render_async(request, lambda: work().addCallback(_answer, request), cancel=cancel)
