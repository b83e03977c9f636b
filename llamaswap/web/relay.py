# -*- test-case-name: tests.test_relay -*-
"""
The relay: one client request, replayed to a model's server, streamed back.

The body was read once (by the route) and is replayed after any swap with an
exact Content-Length. The answer streams back chunk by chunk with backpressure:
L{BodyRelay} is registered as the client request's push producer, so a slow
client pauses the upstream socket and nothing is buffered whole.

Cancellation: when the client leaves before the upstream answered, the pending
C{acquire} (queued swap) or the treq request is cancelled; after the headers,
the upstream socket is closed. Either way the lease is released, so TTLs and
swaps see the model as idle again.

Loading state (C{sendLoadingState}): a streamed chat request whose model is not
ready at once is answered 200 C{text/event-stream} straight away, with progress
frames (L{LoadingStream}, in L{llamaswap.web.loading}) until the model is ready;
the upstream's own events follow in the same response.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import error as neterror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.server import Request
from zope.interface import implementer

from llamaswap.errors import ProxyError, UpstreamUnreachable
from llamaswap.names import LocalTarget, PeerTarget, Target
from llamaswap.peers import PeerLease
from llamaswap.supervisor import Lease
from llamaswap.web.base import SupervisorAPI, client_gone, render_async
from llamaswap.web.guard import authorize_model
from llamaswap.web.loading import LoadingStream
from llamaswap.web.site import request_info

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Request headers we never forward: the Agent sets Host and framing itself, treq
# adds its own Accept-Encoding (and decodes), and we answer Expect ourselves.
_NOT_FORWARDED = HOP_BY_HOP | {b"host", b"content-length", b"accept-encoding", b"expect"}
# Response headers we set ourselves (length: the body may have been gunzipped).
_NOT_RETURNED = HOP_BY_HOP | {b"content-length"}
_NO_BODY_STATUSES = frozenset({204, 304})
_USAGE_TAIL = 16 * 1024  # bytes of the answer kept to find a final "usage" object
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*\{')
_JSON = json.JSONDecoder()  # stateless: one for every find_usage call


# The namespace the relay has always logged under (log filters and tests know it);
# a Logger class attribute would be renamed after the class's new module.
_log = Logger(namespace="llamaswap.relay.Relay")
_NON_ASCII = re.compile(rb"[^\x21-\x7e]")


def _percent(match: re.Match[bytes]) -> bytes:
    return b"%%%02X" % match.group()[0]


# The body to send for a lease (rewritten for its model), from the route.
BodyFor = Callable[[Lease], bytes]
_ERROR_BODY_LIMIT = 64 * 1024  # upstream error bytes kept to report after a loading stream
TRUNCATED = 502  # the status recorded for an answer whose upstream body was cut short


def _end_to_end(headers: Headers, drop: frozenset[bytes]) -> list[tuple[bytes, list[bytes]]]:
    """The headers whose lowercase name is neither in C{drop} nor named by C{Connection}."""
    connection = headers.getRawHeaders(b"connection")
    if connection:
        drop = drop.union(t.strip().lower() for value in connection for t in value.split(b","))
    return [
        (name, list(values))
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in drop
    ]


def forward_headers(request: Request) -> Headers:
    """The client's end-to-end request headers, plus C{X-Forwarded-For}."""
    headers = Headers(dict(_end_to_end(request.requestHeaders, _NOT_FORWARDED)))
    client = getattr(request.getClientAddress(), "host", None)
    if client:
        previous = headers.getRawHeaders(b"x-forwarded-for", [])
        chain = [*previous, client.encode("ascii", "replace")]
        headers.setRawHeaders(b"X-Forwarded-For", [b", ".join(chain)])
    return headers


def copy_response_headers(source: Headers, target: Headers) -> None:
    """Copy end-to-end response headers (C{set}: replaces Twisted's Server/Date)."""
    for name, values in _end_to_end(source, _NOT_RETURNED):
        if name.lower() == b"content-encoding" and not any(v.strip() for v in values):
            continue  # ContentDecoderAgent leaves an empty one behind when it did nothing
        target.setRawHeaders(name, values)


def find_usage(tail: bytes) -> dict[str, Any] | None:
    """The last C{"usage": {...}} object in C{tail} (JSON or SSE), if any."""
    for match in reversed(list(_USAGE_KEY.finditer(tail))):
        try:
            usage, _ = _JSON.raw_decode(tail[match.end() - 1 :].decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(usage, dict):
            return usage
    return None


def describe(error: BaseException) -> str:
    """A one-line reason for a treq/Agent failure (which often wraps a list)."""
    reasons = getattr(error, "reasons", None)
    if reasons:
        return "; ".join(r.getErrorMessage() for r in reasons if isinstance(r, Failure))
    return str(error) or type(error).__name__


def warn_refused(request: Request, error: ProxyError) -> None:
    """Log a request to a model that is answered with C{error}."""
    _log.warn(
        "{method} {uri}: {status} {message}",
        method=request.method.decode("ascii", "replace"),
        uri=request.uri.decode("utf-8", "replace"),
        status=error.status,
        message=error.message,
    )


@implementer(IPushProducer)
class BodyRelay(TwistedProtocol):
    """
    Writes an upstream response body into the client request as it arrives.

    Registered as the request's streaming producer: the client connection's
    pause/resume/stop reach the upstream socket. C{done} fires (never fails)
    with the exception that ended the body: L{ResponseDone} or
    L{PotentialDataLoss} for a complete body, anything else for a truncated
    one. Cancelling it closes the upstream connection.
    """

    def __init__(self, request: Request, *, keep_tail: bool = False) -> None:
        self._request = request
        self.done: Deferred[BaseException] = Deferred(lambda _: self.stopProducing())
        self.bytes = 0
        self._keep_tail = keep_tail
        # The answer's last chunks, joined and cut to _USAGE_TAIL bytes only when
        # they hold twice that: not a 16 KiB copy per streamed event.
        self._tail: list[bytes] = []
        self._tail_size = 0
        self._stopped = False

    def connectionMade(self) -> None:
        if client_gone(self._request):
            self.stopProducing()  # the client left before the body started
            return
        self._request.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        self.bytes += len(data)
        if self._keep_tail:
            self._tail.append(data)
            self._tail_size += len(data)
            if self._tail_size > 2 * _USAGE_TAIL:
                self._tail = [b"".join(self._tail)[-_USAGE_TAIL:]]
                self._tail_size = len(self._tail[0])
        self._request.write(data)  # a no-op once the client has gone

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not client_gone(self._request) and getattr(self._request, "producer", None):
            self._request.unregisterProducer()
        if not self.done.called:
            # The exception, not the Failure: a Failure would errback the Deferred.
            self.done.callback(reason.value or Exception(reason.getErrorMessage()))

    def usage(self) -> dict[str, Any] | None:
        return find_usage(b"".join(self._tail)[-_USAGE_TAIL:]) if self._keep_tail else None

    def pauseProducing(self) -> None:
        if self.transport is not None and not self._stopped:
            self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        if self.transport is not None and not self._stopped:
            self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        if self.transport is not None and not self._stopped:
            self._stopped = True
            self.transport.stopProducing()  # type: ignore[attr-defined]


class _Collect(TwistedProtocol):
    """Keeps the first C{limit} bytes of a response body (an upstream's error)."""

    def __init__(self, limit: int) -> None:
        self.data = b""
        self._limit = limit
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data = (self.data + data)[: self._limit]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self.done.callback(self.data)


def _one_line_json(body: bytes) -> bytes | None:
    """C{body} as compact JSON if it is a JSON object, else None."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return json.dumps(document).encode() if isinstance(document, dict) else None


class Relay:
    """Proxies requests for a model to its server (through a supervisor lease) or to a peer."""

    def __init__(
        self,
        supervisor: SupervisorAPI,
        http: HTTPClient,
        clock: IReactorTime,
        fresh_http: HTTPClient | None = None,
    ) -> None:
        """
        C{http} keeps connections alive (for models and peers with
        C{reuseConnections}, the default); C{fresh_http}, when given, opens one
        connection per request for the others (docs/llama-server.md).
        """
        self._supervisor = supervisor
        self._clock = clock
        # Indexed by the model's reuse_connections: one lookup per request.
        self._clients = (fresh_http or http, http)

    def proxy(
        self,
        request: Request,
        target: Target,
        upstream_uri: bytes,
        body_for: BodyFor,
        *,
        loading: bool = False,
    ) -> int:
        """
        Answer C{request} from the server of C{target}, what the route resolved
        the requested name to (L{llamaswap.names}).

        C{upstream_uri} is the path and query to request on the model's server;
        C{body_for(lease)} gives the body to send (rewritten for the model).
        C{loading}: the request may get a L{LoadingStream} while its model
        loads, if the model's C{sendLoadingState} is on.
        Returns C{NOT_DONE_YET} for C{render_*} to return.
        """
        info = request_info(request)
        info.proxied = True
        client = info.client
        if client is not None and client.key is not None:  # a scoped key: 403 before any start
            loaded = (
                client.may_load  # (then it does not matter: no status to build)
                or (
                    isinstance(target, LocalTarget)
                    and self._supervisor.status(target.model_id).state == "ready"
                )
            )
            authorize_model(client, target, loaded)

        def exchange() -> Deferred[None]:
            return Deferred.fromCoroutine(
                self._exchange(request, upstream_uri, target, body_for, loading)
            )

        return render_async(request, exchange, error=self._error)

    def acquire(self, target: Target, request: Request) -> Deferred[Lease]:
        """A lease on C{target}: a peer's at once, else the supervisor's (for C{request}'s key)."""
        if isinstance(target, PeerTarget):
            return succeed(PeerLease(target))
        client = request_info(request).client
        return self._supervisor.acquire(target, api_key=None if client is None else client.key)

    async def _exchange(
        self, request: Request, uri: bytes, target: Target, body_for: BodyFor, loading: bool
    ) -> None:
        leased = await self._lease_for(request, target, loading)
        if leased is not None:
            lease, stream = leased
            await self._forward(request, uri, target, lease, body_for, stream)

    async def _lease_for(
        self, request: Request, target: Target, loading: bool
    ) -> tuple[Lease, LoadingStream | None] | None:
        """
        The first phase: a lease on C{target}'s server, with a loading stream
        meanwhile if the request may have one and the model is not ready at once.

        @return: the lease, and the loading stream if one was started; None
            if the lease was refused after a loading stream said 200 (the
            stream ended with the error).
        """
        acquired = self.acquire(target, request)
        stream = None
        # Only while the lease is not at hand: refusals (404, 429, 503) stay plain errors.
        if (
            loading
            and not acquired.called
            and isinstance(target, LocalTarget)
            and target.model.send_loading_state
        ):
            stream = LoadingStream(
                request, target.model_id, self._clock, lambda: self._supervisor.position(acquired)
            )
        try:
            lease = await acquired
        except CancelledError:
            raise
        except Exception as e:
            if stream is None:
                raise
            error = self._error_for(e, request)
            stream.fail(error.body(), error.status)
            return None
        finally:
            if stream is not None:
                stream.stop()
        if stream is not None:
            stream.ready()
        return lease, stream

    async def _forward(
        self,
        request: Request,
        uri: bytes,
        target: Target,
        lease: Lease,
        body_for: BodyFor,
        stream: LoadingStream | None,
    ) -> None:
        """
        The second phase: send the request on C{lease} and relay the answer
        (after C{stream}'s frames, if a loading stream said 200 already).
        The lease is released before the response is finished.
        """
        try:
            request_info(request).model = lease.model.id
            body = body_for(lease)
            try:
                lease, response = await self._send(request, uri, target, lease, body)
            except CancelledError:
                raise
            except Exception as e:
                error = (
                    e  # the second acquire failed (e.g. the restart)
                    if isinstance(e, ProxyError)
                    else UpstreamUnreachable(
                        f"model {lease.model.id}: upstream server unreachable: {describe(e)}"
                    )
                )
                if stream is None:
                    raise error from e
                stream.fail(error.body(), error.status)
                return
            if stream is not None and response.code >= 400:
                await self._fail_stream(stream, response, lease.model.id)
                return
            reason, relayed = await self._relay_response(request, response, stream is None)
        finally:
            # Release before finishing: the end of the request is observed (access
            # log, "request" event with a status snapshot) when finish() runs.
            lease.release()
        self._end(request, reason, relayed, lease.model.id)

    async def _send(
        self, request: Request, uri: bytes, target: Target, lease: Lease, body: bytes
    ) -> tuple[Lease, IResponse]:
        """
        Send the request to C{lease}'s server; return the lease it was sent on.

        A refused connection (so nothing was sent) right after the server died
        would be a 502 although the supervisor is about to notice the exit and
        restart it on the next request: once it knows (L{Lease.connection_refused}),
        the request gets one more try on a fresh lease. Any failure of that
        try is the caller's, and so is its lease (released here).
        """
        try:
            return lease, await self._request_upstream(request, uri, lease, body)
        except neterror.ConnectionRefusedError:
            if not await lease.connection_refused():
                raise
        _log.info(
            "model {model}: connection refused; trying once more on a fresh lease",
            model=lease.model.id,
        )
        lease.release()
        lease = await self.acquire(target, request)
        try:
            # Same target, same model: the body made for the first lease fits.
            return lease, await self._request_upstream(request, uri, lease, body)
        except BaseException:
            lease.release()
            raise

    async def _request_upstream(
        self, request: Request, uri: bytes, lease: Lease, body: bytes
    ) -> IResponse:
        framed = request.requestHeaders.hasHeader(
            b"content-length"
        ) or request.requestHeaders.hasHeader(b"transfer-encoding")
        headers = forward_headers(request)
        lease.authorize(headers)
        client = self._clients[lease.model.reuse_connections]
        response: IResponse = await client.request(
            request.method.decode("ascii"),
            lease.url.encode("utf-8") + _NON_ASCII.sub(_percent, uri),
            headers=headers,
            # Bytes: treq sends an exact Content-Length. No body stays no body.
            data=body if body or framed else None,
            unbuffered=True,  # never keep a copy of a streamed answer
            allow_redirects=False,  # a proxy relays 3xx, it does not follow them
        )
        return response

    async def _fail_stream(self, stream: LoadingStream, response: IResponse, model: str) -> None:
        """
        The upstream refused a request whose loading stream already said 200:
        pass its JSON error on as an event, or wrap whatever it said.
        """
        collect = _Collect(_ERROR_BODY_LIMIT)
        response.deliverBody(collect)
        body = await collect.done
        event = _one_line_json(body)
        if event is None:
            text = body.decode("utf-8", "replace").strip()
            event = ProxyError(
                f"model {model}: upstream answered {response.code}: {text}", response.code
            ).body()
        stream.fail(event, response.code)

    def _error_for(self, error: BaseException, request: Request) -> ProxyError:
        """A L{ProxyError} as is; anything else is logged and becomes a 500."""
        if isinstance(error, ProxyError):
            return error
        _log.failure(
            "proxying {uri} failed", Failure(error), uri=request.uri.decode("utf-8", "replace")
        )
        return ProxyError("internal error while proxying the request", 500)

    async def _relay_response(
        self, request: Request, response: IResponse, head: bool = True
    ) -> tuple[BaseException, BodyRelay]:
        """
        Send status and headers (unless C{head} is false: a loading stream sent
        them), then stream the body; return how the body ended.
        """
        headers = response.headers  # each attribute of treq's response is a proxy lookup
        content_type = b",".join(headers.getRawHeaders(b"content-type", [])).lower()
        if head:
            code = response.code
            request.setResponseCode(code, response.phrase)
            copy_response_headers(headers, request.responseHeaders)
            if request.method == b"HEAD":
                length = headers.getRawHeaders(b"content-length")
                if length:
                    request.responseHeaders.setRawHeaders(b"Content-Length", length[:1])
            elif isinstance(size := response.length, int) and code not in _NO_BODY_STATUSES:
                request.setHeader(b"Content-Length", b"%d" % size)
            if b"text/event-stream" in content_type:
                request.setHeader(b"X-Accel-Buffering", b"no")
            request.write(b"")  # status and headers now, before the first token
        body = BodyRelay(
            request, keep_tail=b"json" in content_type or b"event-stream" in content_type
        )
        response.deliverBody(body)
        return await body.done, body

    def _end(
        self,
        request: Request,
        reason: BaseException,
        body: BodyRelay,
        model_id: str,
    ) -> None:
        """
        Finish the client's response, or cut it if the upstream's was truncated
        (recorded as 502: the client saw a 200 status line, not a whole answer).
        """
        if client_gone(request):
            return  # the client left (recorded as 499); the upstream socket is closed
        info = request_info(request)
        info.usage = body.usage()
        if isinstance(reason, (ResponseDone, PotentialDataLoss)):
            request.finish()
            return
        info.outcome = TRUNCATED
        _log.error(
            "model {model}: upstream failed after {bytes} bytes of {method} {uri}: {reason}",
            model=model_id,
            bytes=body.bytes,
            method=request.method.decode("ascii", "replace"),
            uri=request.uri.decode("utf-8", "replace"),
            reason=describe(reason),
        )
        request.loseConnection()  # never a clean-looking end for a truncated answer

    def _error(self, request: Request, failure: Failure) -> ProxyError:
        """
        The error to answer for a failed exchange (the client is still there):
        a L{ProxyError} as it is (logged as a warning), anything else a 500.
        """
        if failure.check(ProxyError):
            error = failure.value
            assert isinstance(error, ProxyError)
            warn_refused(request, error)
        else:
            _log.failure("proxying {uri} failed", failure, uri=request.uri)
            error = ProxyError("internal error while proxying the request", 500)
        if request.startedWriting:
            # A loading stream said 200 already: send_error can only cut it.
            request_info(request).outcome = error.status
        return error
