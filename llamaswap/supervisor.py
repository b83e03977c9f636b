# -*- test-case-name: tests.test_supervisor -*-
"""
The swap scheduler: decides which model servers run, and hands out leases.

(Skeleton: signatures are final, the implementation follows.)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from attrs import frozen
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from llamaswap.config import Config, ModelConfig, Target
from llamaswap.errors import ShuttingDown
from llamaswap.events import EventBus


@frozen(kw_only=True)
class ModelStatus:
    """A snapshot of one configured model, for C{/running} and the UI."""

    model_id: str
    state: str  # "stopped" | "starting" | "ready" | "stopping" | "failed"
    pid: int | None
    in_flight: int
    ttl: int
    ttl_remaining: float | None  # seconds until the TTL unload, None if not applicable
    last_error: str | None


class Lease:
    """The right to send requests to a ready model until L{release}."""

    def __init__(self, model: ModelConfig, target: Target, release: Callable[[], None]) -> None:
        self.model = model
        self.target = target
        self.url = model.proxy
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        """End this lease (idempotent): the in-flight count drops, the TTL starts."""
        release, self._release = self._release, None
        if release is not None:
            release()


class Supervisor(Service):
    """Starts, stops and swaps model servers; see docs/swapping.md."""

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        events: EventBus | None = None,
        clock: IReactorTime | None = None,
        kill: Callable[[int, int], None] | None = None,
        http: HTTPClient | None = None,
    ) -> None:
        self.config = config
        self._reactor = reactor
        self._events = events if events is not None else EventBus()
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._kill = kill if kill is not None else os.killpg
        self._http = http

    def acquire(self, requested: str) -> Deferred[Lease]:
        """Fire with a L{Lease} on a ready model for C{requested}."""
        return fail(ShuttingDown("not implemented yet"))

    def unload(self, model_id: str | None = None) -> Deferred[None]:
        """Stop one model (or all, for C{None}); fires when the processes have exited."""
        return succeed(None)

    def statuses(self) -> list[ModelStatus]:
        """One status per configured model, in config order."""
        return [self.status(model_id) for model_id in self.config.models]

    def status(self, model_id: str) -> ModelStatus:
        """The status of one model (by id)."""
        model = self.config.models[model_id]
        return ModelStatus(
            model_id=model_id,
            state="stopped",
            pid=None,
            in_flight=0,
            ttl=model.ttl,
            ttl_remaining=None,
            last_error=None,
        )
