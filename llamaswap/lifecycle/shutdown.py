# -*- test-case-name: tests.test_shutdown -*-
"""
A graceful stop (docs/deployment.md, "Stopping"): no new requests (new
connections are refused once the port is closed; new requests on open ones get
503), queued requests fail with 503, and the answers in flight go on for up to
C{shutdownTimeout} seconds. What is still running then is cut, an event stream
with an error event first. A second signal (L{Drain.hurry}) cuts at once.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="llamaswap.shutdown")


class DrainableSite(Protocol):
    @property
    def active(self) -> Collection[object]:
        """The requests being answered."""

    def drain(self) -> None: ...

    def when_idle(self) -> Deferred[None]: ...

    def cut(self, message: str) -> int: ...


class DrainableSupervisor(Protocol):
    def drain(self) -> None: ...


class Drain:
    """One graceful stop; L{run} it once."""

    def __init__(
        self,
        site: DrainableSite,
        supervisor: DrainableSupervisor,
        clock: IReactorTime,
        timeout: float,
    ) -> None:
        self._site = site
        self._supervisor = supervisor
        self._clock = clock
        self._timeout = timeout
        self._over: Deferred[None] = Deferred()

    def hurry(self) -> None:
        """Stop waiting: cut what is still running now."""
        if not self._over.called:
            self._over.callback(None)

    async def run(self) -> None:
        self._site.drain()
        self._supervisor.drain()
        busy = len(self._site.active)
        if busy and self._timeout > 0 and not self._over.called:
            log.info(
                "stopping: {busy} request(s) in flight may finish within {timeout:g}s "
                "(shutdownTimeout); send the signal again to stop at once",
                busy=busy,
                timeout=self._timeout,
            )
            timer = self._clock.callLater(self._timeout, self.hurry)
            self._site.when_idle().addCallback(lambda _: self.hurry())
            await self._over
            if timer.active():
                timer.cancel()
        if self._site.active:
            cut = self._site.cut("llamaswap is shutting down: the answer was cut")
            log.warn("stopping: cut {cut} answer(s) still running", cut=cut)
