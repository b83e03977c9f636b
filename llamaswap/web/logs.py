# -*- test-case-name: tests.test_logs -*-
"""
HTTP views of the log hub:

  - C{/logs}: the combined history as text (C{Accept: text/html} redirects to
    the UI's log page, C{/ui/#logs}, like llama-swap HEAD's redirect to C{/ui/});
  - C{/logs/stream[/proxy|/upstream|/<model id or alias>]}: history, then live
    lines, one chunk per line, until the client or the server goes away.

Every live client is the push producer of its own request: while its socket
is full Twisted pauses it and it drops lines (counting them) instead of
buffering, so a client that never reads costs at most the transport's buffer.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import IResource
from twisted.web.server import Request
from zope.interface import implementer

from llamaswap.errors import ProxyError
from llamaswap.logs import COMBINED, LogHub
from llamaswap.web.base import TEXT_TYPE, JSONResource, client_gone, render_async, respond_error
from llamaswap.web.site import request_info

_STREAM_HEADERS = {
    b"content-type": TEXT_TYPE,
    b"x-content-type-options": b"nosniff",
    b"x-accel-buffering": b"no",
    b"cache-control": b"no-cache",
}


def _error(request: Request, status: int, message: str) -> bytes:
    # JSON, or text/HTML when Accept asks for it: as on every other route.
    return respond_error(request, ProxyError(message, status))


def _has_query_key(request: Request, key: bytes) -> bool:
    # request.args drops keys without a value (?no-history), so read the raw query.
    query = (request.uri or b"").partition(b"?")[2]
    return any(part.partition(b"=")[0] == key for part in query.split(b"&"))


@implementer(IPushProducer)
class LogTail:
    """
    One C{/logs/stream} client: writes each line as it comes, or, while the
    client's socket is full (paused), drops it and later says how many went.
    C{done} fires when the hub closes the stream; cancelling it (the client
    left) unsubscribes.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self._paused = False
        self._closed = False
        self.dropped = 0
        self._unsubscribe: Callable[[], None] | None = None
        self.done: Deferred[None] = Deferred(lambda _: self.detach())

    def attach(self, unsubscribe: Callable[[], None]) -> None:
        self._unsubscribe = unsubscribe

    def detach(self, _: object = None) -> None:
        """Stop receiving lines (client left or server stopping). Idempotent."""
        self._closed = True
        unsubscribe, self._unsubscribe = self._unsubscribe, None
        if unsubscribe is not None:
            unsubscribe()

    def line(self, entry: bytes) -> None:
        if self._closed:
            return
        if self._paused:
            self.dropped += 1
            return
        self._request.write(entry)

    def close(self) -> None:
        """The hub is stopping: end the response cleanly."""
        self.detach()
        if not client_gone(self._request):
            self._request.unregisterProducer()
            self._request.finish()
        if not self.done.called:
            self.done.callback(None)

    def _flush_marker(self) -> None:
        if self.dropped and not self._closed:
            marker = f"[{self.dropped} lines dropped]\n".encode()
            self.dropped = 0
            self._request.write(marker)

    # IPushProducer
    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._flush_marker()

    def stopProducing(self) -> None:
        self.detach()


class LogsResource(JSONResource):
    """C{/logs} and everything below it (see the module docstring)."""

    isLeaf = True

    def __init__(self, logs: LogHub) -> None:
        super().__init__()
        self._logs = logs

    def render_GET(self, request: Request) -> bytes | int:
        segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
        if segments in ([], [""]):
            return self._history(request)
        if segments[0] == "stream":
            return self._stream(request, "/".join(segments[1:]))
        return _error(request, 404, "not found: " + (request.path or b"").decode())

    def _history(self, request: Request) -> bytes:
        accept = (request.getHeader(b"accept") or b"").decode("latin-1")
        if "text/html" in accept:
            request.redirect(b"/ui/#logs")
            return b""
        for name, value in _STREAM_HEADERS.items():
            request.setHeader(name, value)
        body = self._logs.history(COMBINED)
        return b"" if request.method == b"HEAD" else body

    def _stream(self, request: Request, name: str) -> bytes | int:
        stream_name = self._logs.resolve(name)
        if stream_name is None:
            return _error(request, 400, "invalid logger. Use 'proxy', 'upstream' or a model's ID")
        for header, value in _STREAM_HEADERS.items():
            request.setHeader(header, value)
        if request.method == b"HEAD":
            return b""
        return render_async(request, lambda: self._follow(request, stream_name))

    def _follow(self, request: Request, stream_name: str) -> Deferred[None]:
        request_info(request).endless = True
        tail = LogTail(request)
        request.registerProducer(tail, True)
        request.write(b"")  # status and headers now, even with an empty history
        if not _has_query_key(request, b"no-history"):
            history = self._logs.history(stream_name)
            if history:
                request.write(history)
        tail.attach(self._logs.subscribe(stream_name, tail.line, tail.close))
        return tail.done


def build_logs_resource(logs: LogHub) -> IResource:
    """The resource mounted at C{/logs}."""
    return LogsResource(logs)
