# -*- test-case-name: tests.test_logs -*-
# twisted.web's Request and Resource are unannotated; everything else stays strict.
# mypy: disable-error-code="no-untyped-call"
"""
HTTP views of the log hub and the event bus, and the static web UI.

  - C{/logs}: the combined history as text (C{Accept: text/html} redirects to
    the UI's log page, C{/ui/#logs}, like llama-swap HEAD's redirect to C{/ui/});
  - C{/logs/stream[/proxy|/upstream|/<model id or alias>]}: history, then live
    lines, one chunk per line, until the client or the server goes away;
  - C{/api/events}: Server-Sent Events for the UI;
  - C{/ui/}: the static UI files in C{llamaswap/ui/}.

Every live client is the push producer of its own request: while its socket
is full Twisted pauses it and it drops lines (counting them) instead of
buffering, so a client that never reads costs at most the transport's buffer.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from llamaswap.config import Config
from llamaswap.errors import ProxyError
from llamaswap.events import EventBus
from llamaswap.jsonweb import JSONResource, respond_error
from llamaswap.logs import COMBINED, PROXY, UPSTREAM, LogHub

if TYPE_CHECKING:
    from llamaswap.supervisor import Supervisor

UI_DIR = Path(__file__).parent / "ui"
UI_FILES = {
    "index.html": b"text/html; charset=utf-8",
    "app.js": b"text/javascript; charset=utf-8",
    "style.css": b"text/css; charset=utf-8",
}
# How many request summaries /api/events replays to a newly connected UI.
RECENT_REQUESTS = 200
# Per-client bytes of SSE frames held while the client's socket is full.
SSE_BUFFER_BYTES = 256 * 1024
# How often /api/events looks for status changes no event announced.
POLL_SECONDS = 1.0

_STREAM_HEADERS = {
    b"content-type": b"text/plain; charset=utf-8",
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


def _alive(request: Request) -> bool:
    return request.channel is not None and not request.finished


# --- /logs ---------------------------------------------------------------------


@implementer(IPushProducer)
class LogTail:
    """
    One C{/logs/stream} client: writes each line as it comes, or, while the
    client's socket is full (paused), drops it and later says how many went.
    """

    def __init__(self, request: Request) -> None:
        self._request = request
        self._paused = False
        self._closed = False
        self.dropped = 0
        self._unsubscribe: Callable[[], None] | None = None

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
        if _alive(self._request):
            self._request.unregisterProducer()
            self._request.finish()

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

    def __init__(self, logs: LogHub, config: Config) -> None:
        super().__init__()
        self._logs = logs
        self._config = config

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
        finished = request.notifyFinish()  # ask first: asked later it may never fire
        tail = LogTail(request)
        request.registerProducer(tail, True)
        request.write(b"")  # status and headers now, even with an empty history
        if not _has_query_key(request, b"no-history"):
            history = self._logs.history(stream_name)
            if history:
                request.write(history)
        tail.attach(self._logs.subscribe(stream_name, tail.line, tail.close))
        finished.addBoth(tail.detach)
        return NOT_DONE_YET


def build_logs_resource(logs: LogHub, config: Config) -> IResource:
    """The resource mounted at C{/logs}."""
    return LogsResource(logs, config)


# --- /api/events -----------------------------------------------------------------


def _frame(kind: str, data: Any) -> bytes:
    payload = json.dumps({"type": kind, "data": data}, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


@implementer(IPushProducer)
class EventClient:
    """
    One SSE client. Frames wait in a byte-bounded queue while the socket is
    full; beyond the bound they are dropped, and the client is told with a
    C{dropped} event followed by a fresh model snapshot.
    """

    def __init__(self, request: Request, snapshot: Callable[[], bytes]) -> None:
        self._request = request
        self._snapshot = snapshot
        self._paused = False
        self._closed = False
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self.dropped = 0
        self._cleanups: list[Callable[[], None]] = []

    def on_close(self, cleanup: Callable[[], None]) -> None:
        self._cleanups.append(cleanup)

    def detach(self, _: object = None) -> None:
        self._closed = True
        self._queue.clear()
        self._queued = 0
        cleanups, self._cleanups = self._cleanups, []
        for cleanup in cleanups:
            cleanup()

    def close(self) -> None:
        self.detach()
        if _alive(self._request):
            self._request.unregisterProducer()
            self._request.finish()

    def send(self, frame: bytes) -> None:
        if self._closed:
            return
        if not self._paused:
            self._request.write(frame)
            return
        if self._queued + len(frame) > SSE_BUFFER_BYTES:
            self.dropped += 1
            return
        self._queue.append(frame)
        self._queued += len(frame)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        while self._queue and not self._paused and not self._closed:
            frame = self._queue.popleft()
            self._queued -= len(frame)
            self._request.write(frame)
        if self.dropped and not self._paused and not self._closed:
            count, self.dropped = self.dropped, 0
            self._request.write(_frame("dropped", {"count": count}))
            # Dropped frames may have been state changes: resynchronise.
            self._request.write(self._snapshot())

    def stopProducing(self) -> None:
        self.detach()


class EventsResource(Resource):
    """
    C{GET /api/events}: the UI's live feed (see docs/logs-and-ui.md).

    Model snapshots go out on every C{modelStatus} and C{request} event, and
    also whenever a once-a-second look at the supervisor sees a change no
    event announced (a lease released, a TTL countdown restarted).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        events: EventBus,
        supervisor: Supervisor,
        logs: LogHub,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__()
        self._events = events
        self._supervisor = supervisor
        self._logs = logs
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self._clock = clock
        self.clients: set[EventClient] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self._last_key: tuple[Any, ...] | None = None
        self._poll = LoopingCall(self._look)
        self._poll.clock = clock
        # One long-lived subscription for all clients (the resource lives as
        # long as the service).
        events.subscribe(self._on_event)

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "request":
            # Stamp it, so a UI connecting later shows when it happened.
            data = {"time": round(self._clock.seconds(), 3), **data}
            self.recent.append(data)
            if self.clients:  # the JSON costs ~4 % of a small proxied request
                self._broadcast(_frame("request", data))
            # Its end may have released a lease and restarted a TTL.
            self._broadcast_snapshot()
        elif kind == "modelStatus":
            self._broadcast_snapshot()

    def _broadcast(self, frame: bytes) -> None:
        for client in list(self.clients):
            client.send(frame)

    def _broadcast_snapshot(self) -> None:
        if self.clients:
            models = self.models()
            self._last_key = self._key(models)
            self._broadcast(_frame("modelStatus", models))

    def _key(self, models: list[dict[str, Any]]) -> tuple[Any, ...]:
        now = self._clock.seconds()
        return tuple(
            (
                m["id"],
                m["state"],
                m["pid"],
                m["in_flight"],
                m["last_error"],
                # The deadline, not the countdown: changes only when the TTL restarts.
                None if m["ttl_remaining"] is None else round(now + m["ttl_remaining"]),
            )
            for m in models
        )

    def _look(self) -> None:
        try:
            models = self.models()
            key = self._key(models)
            if key != self._last_key:
                self._last_key = key
                self._broadcast(_frame("modelStatus", models))
        except Exception:
            self.log.failure("model status poll failed")

    def models(self) -> list[dict[str, Any]]:
        """The model list the UI shows: supervisor status plus config details."""
        config = self._supervisor.config
        out: list[dict[str, Any]] = []
        for status in self._supervisor.statuses():
            model = config.models.get(status.model_id)
            out.append(
                {
                    "id": status.model_id,
                    "name": model.name if model else "",
                    "description": model.description if model else "",
                    "aliases": list(model.aliases) if model else [],
                    "unlisted": model.unlisted if model else False,
                    "state": status.state,
                    "pid": status.pid,
                    "in_flight": status.in_flight,
                    "ttl": status.ttl,
                    "ttl_remaining": status.ttl_remaining,
                    "last_error": status.last_error,
                }
            )
        return out

    def snapshot_frame(self) -> bytes:
        models = self.models()
        self._last_key = self._key(models)
        return _frame("modelStatus", models)

    def _add(self, client: EventClient) -> None:
        self.clients.add(client)
        if not self._poll.running:
            self._poll.start(POLL_SECONDS, now=False)

    def _remove(self, client: EventClient) -> None:
        self.clients.discard(client)
        if not self.clients and self._poll.running:
            self._poll.stop()

    def render(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return _error(request, 405, "method not allowed")
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-accel-buffering", b"no")
        finished = request.notifyFinish()
        client = EventClient(request, self.snapshot_frame)
        request.registerProducer(client, True)
        request.write(b"retry: 2000\n\n")
        # Initial burst: models, log histories, recent requests.
        client.send(self.snapshot_frame())
        for source in (PROXY, UPSTREAM):
            lines = _lines(self._logs.history(source))
            if lines:
                client.send(_frame("logData", {"source": source, "lines": lines}))
        if self.recent:
            client.send(_frame("requests", list(self.recent)))
        self._add(client)
        client.on_close(lambda: self._remove(client))
        for source in (PROXY, UPSTREAM):
            client.on_close(self._logs.subscribe(source, _log_sender(client, source), client.close))
        finished.addBoth(client.detach)
        return NOT_DONE_YET


def _lines(history: bytes) -> list[str]:
    return history.decode("utf-8", "replace").splitlines()


def _log_sender(client: EventClient, source: str) -> Callable[[bytes], None]:
    def send(entry: bytes) -> None:
        client.send(_frame("logData", {"source": source, "lines": _lines(entry)}))

    return send


def build_events_resource(
    events: EventBus,
    supervisor: Supervisor,
    logs: LogHub,
    *,
    clock: IReactorTime | None = None,
) -> IResource:
    """The resource mounted at C{/api/events} (C{clock}: the global reactor by default)."""
    return EventsResource(events, supervisor, logs, clock)


# --- /ui -------------------------------------------------------------------------


class UIResource(JSONResource):
    """
    The static UI. C{/ui} redirects to C{/ui/}; extension-less paths get
    C{index.html} (the UI routes with C{#fragments}); other unknown files 404.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes | int:
        segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
        if not segments:
            request.redirect(b"/ui/")
            return b""
        name = "/".join(segments) or "index.html"
        if name not in UI_FILES:
            if "." in segments[-1]:
                return _error(request, 404, f"not found: /ui/{name}")
            name = "index.html"
        try:
            body = (UI_DIR / name).read_bytes()
        except OSError:
            return _error(request, 404, f"not found: /ui/{name}")
        request.setHeader(b"content-type", UI_FILES[name])
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        return b"" if request.method == b"HEAD" else body


def build_ui_resource() -> IResource:
    """The resource mounted at C{/ui}."""
    return UIResource()
