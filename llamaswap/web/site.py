# -*- test-case-name: tests.test_resources -*-
"""
The HTTP server side: a L{Site} whose requests enforce the body limit early,
never answer with twisted.web's HTML error pages (errors are ours: JSON unless
C{Accept} asks for text or HTML), and log/publish themselves.

twisted.web reads the whole request body (into memory, or a temp file above
100 kB) before any resource runs, so a size limit in a resource comes too late
for a 10 GB upload. L{LlamaSwapRequest} refuses the body as soon as the headers
announce too much (C{Content-Length}), or as soon as a chunked body grows past
the limit: it answers 413 straight away, stops storing data, and closes.
"""

from __future__ import annotations

import time
from typing import Any

from attrs import define
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET, Request, Site

from llamaswap._twisted import ChannelHooks, pending_request_line, wrap_channel
from llamaswap.config import Config
from llamaswap.errors import BodyTooLarge, ProxyError, ShuttingDown, error_body
from llamaswap.events import EventBus
from llamaswap.names import Target
from llamaswap.web import sse
from llamaswap.web.base import client_gone, error_payload, request_accept

# After answering 413 we keep reading (and discarding) this long before
# aborting, so a client busy sending its body still gets to read the answer
# instead of a connection reset (what nginx calls a lingering close).
REFUSED_BODY_LINGER = 2.0
SWEEP_SECONDS = 1.0  # how often slow request heads and stalled bodies are looked for
CLIENT_CLOSED_REQUEST = 499  # nginx's status for "the client left first"
CUT_BY_US = 500  # a started response we cut, when whoever cut it named no status

_access_log = Logger(namespace="llamaswap.http")


def is_ui_asset(method: str, path: str) -> bool:
    """
    A browser fetching the UI's own files (C{/ui/...}, C{/favicon.ico}): not
    proxy traffic, so C{logRequests} leaves these at debug level (each page load
    fetches four, which buried the requests people look for).
    """
    if method not in ("GET", "HEAD"):
        return False
    return path in ("/ui", "/favicon.ico") or path.startswith("/ui/")


@define
class RequestInfo:
    """What the routes learn about a request, for the access log and events."""

    model: str | None = None
    # What the model route resolved the requested name to (once, at the edge).
    target: Target | None = None
    proxied: bool = False  # a model route or /upstream: publish a "request" event
    usage: dict[str, Any] | None = None
    # The status we record when it differs from the status line sent: once the
    # 200 is out, an answer that ends badly is recorded as what went wrong (502:
    # the relay's upstream body was cut short; the error's status when a loading
    # stream ends with an error event; 500: any other response we cut). The
    # client leaving first (499) is decided by LlamaSwapRequest itself, unless
    # an outcome was set before it left.
    outcome: int | None = None
    # A feed that ends only when its client leaves (/api/events, /logs/stream):
    # a graceful stop closes it at once instead of waiting for it.
    endless: bool = False
    # Who sent it (llamaswap.web.guard.Client), once the root checked its key.
    client: Any = None


def request_info(request: Request) -> RequestInfo:
    """The L{RequestInfo} of C{request}: a throwaway one if our site did not make it."""
    if isinstance(request, LlamaSwapRequest):
        return request.llamaswap_info
    return RequestInfo()


class LlamaSwapRequest(Request):
    """A L{Request} with an early body limit, JSON-only fallbacks and an access log."""

    log = Logger(namespace="llamaswap.http")

    def __init__(self, channel: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(channel, *args, parsePOSTFormSubmission=False, **kwargs)
        site = channel.site
        self._site: LlamaSwapSite | None = site if isinstance(site, LlamaSwapSite) else None
        self._limit: int | None = self._site.max_body_size if self._site else None
        self._received = 0
        self._refused = False
        self._linger: IDelayedCall | None = None
        self._ended = False
        self._started = self._now()
        self.llamaswap_info = RequestInfo()

    # --- the body limit ---------------------------------------------------

    def gotLength(self, length: int | None) -> None:
        if self._limit is not None and length is not None and length > self._limit:
            # Say no before "100 Continue" would invite the body.
            self.requestHeaders.removeHeader(b"expect")
            self._refuse_body()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        self._received += len(data)
        if self._limit is not None and self._received > self._limit:
            self._refuse_body()
            return
        super().handleContentChunk(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._refused:
            # The whole (refused) body has arrived during the linger: close cleanly.
            self._cancel_linger()
            if self.channel is not None:
                self.channel.loseConnection()
            return
        if self._site is not None:
            self._site.active.add(self)
        super().requestReceived(command, path, version)

    def _refuse_body(self) -> None:
        self._refused = True
        channel = self.channel
        method, uri = pending_request_line(channel)
        self.method = method or self.method
        self.uri = uri or self.uri
        self.path = self.uri.split(b"?", 1)[0]
        self.code = 413
        content = self.content
        if content is not None:
            content.close()
        self.content = None
        error = BodyTooLarge(f"request body exceeds the limit of {self._limit} bytes")
        content_type, body = error_payload(error, request_accept(self))
        self.sentLength = len(body)
        transport: Any = channel.transport
        transport.write(
            b"HTTP/1.1 413 Request Entity Too Large\r\n"
            b"Content-Type: %s\r\n"
            b"Content-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (content_type, len(body), body)
        )
        channel.persistent = False
        half_close = getattr(transport, "loseWriteConnection", None)
        if callable(half_close):
            half_close()  # FIN after the answer; keep reading to avoid a reset
        assert self._site is not None
        self._linger = self._site.reactor.callLater(REFUSED_BODY_LINGER, self._abort)
        self._end()

    def _abort(self) -> None:
        self._linger = None
        if self.channel is not None:
            transport: Any = self.channel.transport
            transport.abortConnection()

    def _cancel_linger(self) -> None:
        if self._linger is not None and self._linger.active():
            self._linger.cancel()
        self._linger = None

    # --- never an HTML page -----------------------------------------------

    def render(self, resrc: IResource) -> None:
        if self._site is not None and self._site.draining:
            # Stopping: nothing new starts, and the connection does not stay open.
            self.setHeader(b"Connection", b"close")
            self._answer_error(ShuttingDown("llamaswap is shutting down"))
            return
        try:
            body = resrc.render(self)
        except UnsupportedMethod as e:
            if self.method == b"HEAD" and b"GET" in e.allowedMethods:
                super().render(resrc)  # twisted.web fakes HEAD with GET
                return
            error = ProxyError(f"method {self.method.decode('ascii', 'replace')} not allowed", 405)
            self.setHeader(b"Allow", b", ".join(e.allowedMethods))
            self._answer_error(error)
            return
        if body is NOT_DONE_YET:
            return
        if not isinstance(body, bytes):
            self.log.error("resource {resource!r} returned {body!r}", resource=resrc, body=body)
            self._answer_error(ProxyError("internal error", 500))
            return
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(b"" if self.method == b"HEAD" else body)
        self.finish()

    def processingFailed(self, reason: Failure) -> Failure:
        self.log.failure(
            "error processing {method} {uri}", reason, method=self.method, uri=self.uri
        )
        if self.startedWriting:
            self.loseConnection()
        elif not client_gone(self):
            self._answer_error(ProxyError("internal error", 500))
        return reason

    def _answer_error(self, error: ProxyError) -> None:
        content_type, body = error_payload(error, request_accept(self))
        self.setResponseCode(error.status)
        self.setHeader(b"Content-Type", content_type)
        self.setHeader(b"Content-Length", b"%d" % len(body))
        self.write(b"" if self.method == b"HEAD" else body)
        self.finish()

    # --- access log and "request" events ------------------------------------

    def finish(self) -> None:
        super().finish()
        self._end()

    def loseConnection(self) -> None:
        """
        Cut the response: ours to record (500 unless the caller set an outcome
        first, as the relay does with 502), never the client's 499.
        """
        if self.startedWriting and not self.finished:
            info = request_info(self)
            if info.outcome is None:
                info.outcome = CUT_BY_US
        super().loseConnection()

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_linger()
        # Fires notifyFinish's errbacks first: the relay stops, releases its lease
        # (and may set an outcome) before the end is recorded.
        super().connectionLost(reason)
        self._end(lost=True)

    def _now(self) -> float:
        return float(self._site.reactor.seconds()) if self._site is not None else 0.0

    def _end(self, lost: bool = False) -> None:
        """
        Record the end (once): an outcome if one was set, else 499 for a
        connection lost (C{lost}: before C{finish()}) before the status line
        went out, or during a proxied answer (the client left before the end);
        else the status line's code. Non-proxied streams (C{/api/events},
        C{/logs/stream}) end only when their client leaves: 200, not 499.
        """
        if self._ended or self._site is None:
            return
        self._ended = True
        self._site.ended(self)
        info = self.llamaswap_info
        if info.outcome is not None:
            status: int = info.outcome
        elif lost and (not self.startedWriting or info.proxied):
            status = CLIENT_CLOSED_REQUEST
        else:
            status = self.code
        self._site.request_ended(self, status, self._now() - self._started)


class LlamaSwapChannel(ChannelHooks):
    """
    An C{HTTPChannel} whose own refusals are JSON too.

    twisted.web answers requests it cannot parse (bad request line, bad
    Content-Length, too many headers) with a bare C{400} and no body, and
    drops a header line over C{MAX_LENGTH} without any answer. Clients then
    see nothing they can parse; these overrides answer in OpenAI's shape.

    It also bounds slow clients (C{security.headerTimeout}, C{bodyTimeout}):
    a request's head must arrive whole within its time from its first byte (a
    client sending a header line every few seconds never trips twisted.web's
    idle timeout), and a body upload may not stall longer than its own. Both
    answer 408 and close.
    """

    # Slow clients: since when this connection waits for the rest of a request's head
    # (from its first byte), or for its body's next byte; None: neither. The site looks
    # once a second (LlamaSwapSite._sweep): two timers per request would cost more.
    head_since: float | None = None
    body_since: float | None = None
    _in_head = True
    _clock: Any = None  # the site's reactor, once connected

    def dataReceived(self, data: bytes) -> None:
        if self._in_head and self.head_since is None:
            self.head_since = self._seconds()
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._in_head = False
        self.head_since = None
        self.body_since = self._seconds()
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self.body_since is not None:
            self.body_since = self._seconds()
        super().rawDataReceived(data)

    def allContentReceived(self) -> None:
        self.body_since = None
        self._in_head = True  # the next request's head: its time runs from its first byte
        super().allContentReceived()

    def _seconds(self) -> float:
        return float(self._clock.seconds()) if self._clock is not None else time.time()

    def too_slow(self, now: float, header_timeout: float, body_timeout: float) -> None:
        """Answer 408 and close if the head or the body waited past its bound."""
        if header_timeout and self.head_since is not None:
            if now - self.head_since > header_timeout:
                self.head_since = None
                self._refuse(
                    408,
                    "Request Timeout",
                    f"the request head did not arrive within {header_timeout:g} s "
                    "(security.headerTimeout)",
                )
        elif body_timeout and self.body_since is not None:
            if now - self.body_since > body_timeout:
                self.body_since = None
                self._refuse(
                    408,
                    "Request Timeout",
                    f"the request body stalled for {body_timeout:g} s (security.bodyTimeout)",
                )

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        site = getattr(self, "site", None)
        if isinstance(site, LlamaSwapSite):
            site.channels.discard(self)
        super().connectionLost(reason)

    def connectionMade(self) -> None:
        super().connectionMade()
        site = getattr(self, "site", None)
        if isinstance(site, LlamaSwapSite):
            site.channels.add(self)
            self._clock = site.reactor
        # Each streamed event must leave at once. With Nagle's algorithm a write
        # waits for the ACK of the previous one, which a reading client delays
        # up to 40 ms: tokens would arrive in bursts. llama-server sets it too.
        set_no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if set_no_delay is not None:
            try:
                set_no_delay(True)
            except OSError:
                pass  # not TCP (a Unix socket from systemd): no Nagle there

    def bad_request(self) -> None:
        self._refuse(400, "Bad Request", "malformed HTTP request")

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(
            431,
            "Request Header Fields Too Large",
            f"request line or header longer than {self.MAX_LENGTH} bytes",
        )

    def _refuse(self, status: int, phrase: str, message: str) -> None:
        body = error_body(status, message)
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (status, phrase.encode("ascii"), len(body), body)
        )
        self.loseConnection()


def _json_channel(site: Site) -> Any:
    return wrap_channel(LlamaSwapChannel())


class LlamaSwapSite(Site):
    """
    The proxy's L{Site}: builds L{LlamaSwapRequest}s with the configured body limit,
    logs one line per request and publishes C{"request"} events for proxied ones.
    """

    requestFactory = LlamaSwapRequest
    protocol = _json_channel
    displayTracebacks = False

    def __init__(
        self,
        resource: IResource,
        *,
        max_body_size: int,
        log_requests: bool = False,
        log_debug: bool = True,
        events: EventBus | None = None,
        reactor: Any = None,
        header_timeout: float = 0.0,
        body_timeout: float = 0.0,
    ) -> None:
        super().__init__(resource, reactor=reactor, parsePOSTFormSubmission=False)
        # Slow clients (LlamaSwapChannel): seconds, 0 for no bound; looked at once a second.
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.channels: set[LlamaSwapChannel] = set()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = self.reactor
        self.max_body_size = max_body_size
        self.log_requests = log_requests
        # Whether a debug access line can be seen at all (logLevel: debug). Emitting
        # one nobody keeps costs ~4 % of a small proxied request (docs/performance.md).
        self.log_debug = log_debug
        self.events = events
        self.noisy = False
        self._next_id = 0
        # A graceful stop (llamaswap.shutdown): requests being answered, and whether
        # new ones get 503.
        self.draining = False
        self.active: set[LlamaSwapRequest] = set()
        self._idle: list[Deferred[None]] = []

    def configure(self, config: Config) -> None:
        """The config's settings for requests from now (at start-up, and on a reload)."""
        self.max_body_size = config.max_body_size
        self.log_requests = config.log_requests
        self.log_debug = config.log_level.lower() == "debug"
        self.header_timeout = config.security.header_timeout
        self.body_timeout = config.security.body_timeout

    def startFactory(self) -> None:
        super().startFactory()
        # Always: a reload may set bounds the start-up config did not have.
        if not self._sweeper.running:
            self._sweeper.start(SWEEP_SECONDS, now=False)

    def stopFactory(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        super().stopFactory()

    def _sweep(self) -> None:
        if not (self.header_timeout or self.body_timeout):
            return
        now = self.reactor.seconds()
        for channel in list(self.channels):
            channel.too_slow(now, self.header_timeout, self.body_timeout)

    # --- graceful stop -------------------------------------------------------

    def drain(self) -> None:
        """Answer new requests with 503 from now, and close the endless feeds."""
        self.draining = True
        for request in list(self.active):
            if request.llamaswap_info.endless:
                request.loseConnection()

    def when_idle(self) -> Deferred[None]:
        """Fire once no request is being answered (at once if none is)."""
        if not self.active:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._idle.append(waiter)
        return waiter

    def cut(self, message: str) -> int:
        """
        Cut every answer still going: an event stream gets an error event
        first, so the client knows why; recorded as 503. Returns how many.
        """
        cut = list(self.active)
        error = ShuttingDown(message)
        for request in cut:
            request.llamaswap_info.outcome = error.status
            if not request.startedWriting:
                request.setHeader(b"Connection", b"close")
                request._answer_error(error)
                continue
            content_type = request.responseHeaders.getRawHeaders(b"content-type", [b""])[0]
            if b"text/event-stream" in content_type.lower():
                request.write(sse.frame(error.body()))
            request.loseConnection()
        return len(cut)

    def ended(self, request: LlamaSwapRequest) -> None:
        self.active.discard(request)
        if not self.active and self._idle:
            waiters, self._idle = self._idle, []
            for waiter in waiters:
                waiter.callback(None)

    def log(self, request: Any) -> None:
        """twisted.web's access log is replaced by L{request_ended}."""

    def request_ended(self, request: LlamaSwapRequest, status: int, duration: float) -> None:
        """Emit the access log line, and a C{"request"} event for proxied requests."""
        info = request_info(request)
        method = request.method.decode("ascii", "replace")
        # path is None when the request line never arrived or did not parse.
        path = "-" if request.path is None else request.path.decode("utf-8", "replace")
        sent = int(request.sentLength)
        client = request.getClientAddress()
        loud = self.log_requests and not is_ui_asset(method, path)
        if loud or self.log_debug:
            emit = _access_log.info if loud else _access_log.debug
            emit(
                '{client} "{method} {path}" {status} {bytes} model={model} {duration:.3f}s',
                client=getattr(client, "host", "-"),
                method=method,
                path=path,
                status=status,
                bytes=sent,
                model=info.model or "-",
                duration=duration,
            )
        if info.proxied and self.events is not None:
            self._next_id += 1
            self.events.publish(
                "request",
                {
                    "id": self._next_id,
                    "method": method,
                    "path": path,
                    "model": info.model,
                    # The canonical name: the model's id or the peer's
                    # <peer>/<model>, "" when the name matched nothing.
                    "target": "" if info.target is None else info.target.canonical,
                    "status": status,
                    "bytes": sent,
                    "duration": round(duration, 6),
                    "usage": info.usage,
                },
            )
