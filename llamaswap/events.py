# -*- test-case-name: tests.test_logs -*-
"""
A tiny in-process event bus: model state changes, request summaries, log lines.

Publishers never wait for subscribers; a subscriber that raises is dropped from
that delivery only (it must not break the publisher, e.g. the supervisor).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

Subscriber = Callable[[str, dict[str, Any]], None]


class EventBus:
    """Fan out C{(type, data)} events to subscribers, synchronously."""

    log = Logger()

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Add C{subscriber}; return a function that removes it (idempotent)."""
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def publish(self, kind: str, data: dict[str, Any]) -> None:
        """Deliver an event to every current subscriber."""
        for subscriber in list(self._subscribers):
            try:
                subscriber(kind, data)
            except Exception:
                # Never let a broken listener (a dead UI client) break the publisher.
                self.log.failure("event subscriber failed on {kind}", kind=kind)
