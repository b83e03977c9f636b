# -*- test-case-name: tests.test_logs -*-
"""
C{/api/events}: Server-Sent Events for the UI (see docs/logs-and-ui.md).

Every live client is the push producer of its own request: while its socket is
full, frames wait in a byte-bounded queue; beyond the bound they are dropped
and the client is told so, then resynchronised.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from llamaswap.config import Config
from llamaswap.events import EventBus
from llamaswap.logs import PROXY, UPSTREAM, LogHub
from llamaswap.supervisor import StatusSource
from llamaswap.web import sse
from llamaswap.web.base import JSONResource, client_gone, render_async
from llamaswap.web.site import request_info

# How many request summaries /api/events replays to a newly connected UI.
RECENT_REQUESTS = 200
# Per-client bytes of SSE frames held while the client's socket is full.
SSE_BUFFER_BYTES = 256 * 1024
# How often /api/events looks for status changes no event announced.
POLL_SECONDS = 1.0


def _frame(kind: str, data: Any) -> bytes:
    payload = json.dumps({"type": kind, "data": data}, separators=(",", ":"))
    return sse.frame(payload.encode())


@implementer(IPushProducer)
class EventClient:
    """
    One SSE client. Frames wait in a byte-bounded queue while the socket is
    full; beyond the bound they are dropped, and the client is told with a
    C{dropped} event followed by a fresh model snapshot. C{done} fires when
    the feed ends on our side; cancelling it (the client left) unsubscribes.
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
        self.done: Deferred[None] = Deferred(lambda _: self.detach())

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
        if not client_gone(self._request):
            self._request.unregisterProducer()
            self._request.finish()
        if not self.done.called:
            self.done.callback(None)

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


class EventsResource(JSONResource):
    """
    C{GET /api/events}: the UI's live feed (see docs/logs-and-ui.md).

    Model snapshots go out on every C{modelStatus} and C{request} event, on a
    C{queue} event that changed what the snapshot shows (a model's queue grew
    or shrank), and also whenever a once-a-second look at the supervisor sees a
    change no event announced (a lease released, a TTL countdown restarted).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        config: Config,
        events: EventBus,
        supervisor: StatusSource,
        logs: LogHub,
        clock: IReactorTime,
    ) -> None:
        super().__init__()
        self._config = config
        self._events = events
        self._supervisor = supervisor
        self._logs = logs
        self._clock = clock
        self.clients: set[EventClient] = set()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_REQUESTS)
        self._last_key: tuple[Any, ...] | None = None
        self.config_state: dict[str, Any] | None = None  # the last reload's outcome
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
        elif kind == "queue":
            self._look()
        elif kind == "config":
            # A reload: its outcome (the UI shows a failed one as a banner), and the model
            # list may have changed.
            self.config_state = data
            self._broadcast(_frame("config", data))
            self._broadcast_snapshot()

    def reconfigure(self, config: Config) -> None:
        """A reload applied C{config}: model names and details come from it from now."""
        self._config = config

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
                m["reason"],
                m["queued"],
                # The deadline, not the countdown: changes only when the TTL restarts.
                None if m["ttl_remaining"] is None else round(now + m["ttl_remaining"]),
                # When the oldest queued request came, not its wait: changes only when it leaves.
                None if m["oldest_wait"] is None else round(now - m["oldest_wait"]),
                repr(m["memory"]),
            )
            for m in models
        )

    def _look(self) -> None:
        """Send a snapshot if it differs from the last one sent (by L{_key})."""
        if not self.clients:
            return
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
        config = self._config
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
                    "queued": status.queued,
                    "oldest_wait": status.oldest_wait,
                    "reason": status.stop_reason,
                    "memory": None if status.memory is None else dict(status.memory),
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

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"content-type", b"text/event-stream")
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-content-type-options", b"nosniff")
        request.setHeader(b"x-accel-buffering", b"no")
        if request.method == b"HEAD":
            return b""
        return render_async(request, lambda: self._follow(request))

    def _follow(self, request: Request) -> Deferred[None]:
        request_info(request).endless = True
        client = EventClient(request, self.snapshot_frame)
        request.registerProducer(client, True)
        request.write(sse.RETRY_2S)
        # Initial burst: models, log histories, recent requests.
        client.send(self.snapshot_frame())
        for source in (PROXY, UPSTREAM):
            lines = _lines(self._logs.history(source))
            if lines:
                client.send(_frame("logData", {"source": source, "lines": lines}))
        if self.recent:
            client.send(_frame("requests", list(self.recent)))
        if self.config_state is not None:
            client.send(_frame("config", self.config_state))
        self._add(client)
        client.on_close(lambda: self._remove(client))
        for source in (PROXY, UPSTREAM):
            client.on_close(self._logs.subscribe(source, _log_sender(client, source), client.close))
        return client.done


def _lines(history: bytes) -> list[str]:
    return history.decode("utf-8", "replace").splitlines()


def _log_sender(client: EventClient, source: str) -> Callable[[bytes], None]:
    def send(entry: bytes) -> None:
        client.send(_frame("logData", {"source": source, "lines": _lines(entry)}))

    return send


def build_events_resource(
    config: Config,
    events: EventBus,
    supervisor: StatusSource,
    logs: LogHub,
    *,
    clock: IReactorTime,
) -> EventsResource:
    """The resource mounted at C{/api/events}."""
    return EventsResource(config, events, supervisor, logs, clock)
