# -*- test-case-name: tests.test_relay -*-
"""The loading stream: what a streamed chat request sees while its model loads."""

from __future__ import annotations

import json
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.web.server import Request

from llamaswap.web.base import client_gone
from llamaswap.web.site import request_info
from llamaswap.web.sse import DONE, frame

LOADING_TICK = 0.75  # seconds between the "." frames of a loading stream


class LoadingStream:
    """
    The answer to a streamed chat request while its model loads: status 200 and
    event-stream headers at once, then C{reasoning_content} deltas (the model's
    name, its place in the queue whenever that changes, else a dot every
    L{LOADING_TICK} seconds, how long it took). Afterwards the
    upstream's own events are appended (L{Relay}), or L{fail} ends it with an
    error event.
    """

    def __init__(
        self,
        request: Request,
        model_id: str,
        clock: IReactorTime,
        where: Callable[[], tuple[int, int] | None] = lambda: None,
    ) -> None:
        self._request = request
        self._model_id = model_id
        self._clock = clock
        self._where = where  # (requests ahead, requests queued), None when not queued
        self._told: tuple[int, int] | None = None
        self._started = clock.seconds()
        request.setResponseCode(200)
        request.setHeader(b"Content-Type", b"text/event-stream")
        request.setHeader(b"Cache-Control", b"no-cache")
        request.setHeader(b"X-Accel-Buffering", b"no")
        self.send(f"llamaswap loading model: {model_id}\n")
        self._tell_place()
        self._ticker = LoopingCall(self._tick)
        self._ticker.clock = clock
        self._ticker.start(LOADING_TICK, now=False)

    def _tick(self) -> None:
        """A dot, or the request's place in the queue when it changed."""
        if not self._tell_place():
            self.send(".")

    def _tell_place(self) -> bool:
        """Send the request's place in the queue if it changed; whether it did."""
        place = self._where()
        if place is None or place == self._told or (self._told is None and place[0] == 0):
            return False  # not queued, no change, or first in line (just loading)
        self._told = place
        ahead, queued = place
        self.send(f"\nqueued: {ahead} ahead of this request, {queued} waiting\n")
        return True

    def send(self, text: str) -> None:
        """One C{chat.completion.chunk} whose delta carries C{text} as reasoning."""
        chunk = {
            "object": "chat.completion.chunk",
            "model": self._model_id,
            "choices": [{"index": 0, "delta": {"reasoning_content": text}, "finish_reason": None}],
        }
        self._write(frame(json.dumps(chunk, ensure_ascii=False).encode("utf-8")))

    def _write(self, data: bytes) -> None:
        if not client_gone(self._request):
            self._request.write(data)

    def stop(self) -> None:
        """No more dots (idempotent)."""
        if self._ticker.running:
            self._ticker.stop()

    def ready(self) -> None:
        """The model is ready: say how long it took."""
        self.stop()
        self.send(f"\nDone! ({self._clock.seconds() - self._started:.1f}s)\n\n")

    def fail(self, error: bytes, status: int) -> None:
        """
        End the stream with an error event (OpenAI's envelope) and C{[DONE]};
        the request is recorded with the error's C{status}, not the 200 sent.
        """
        self.stop()
        if not client_gone(self._request):
            request_info(self._request).outcome = status
            self._write(frame(error) + DONE)
            self._request.finish()
