# -*- test-case-name: tests.test_process -*-
"""
What a model process has pending: L{Waiters} (the Deferreds it hands out, one
per waiter) and L{Timers} (the delayed calls it holds, cancelled together).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class Waiters:
    """
    Everyone waiting for one kind of moment, each with a Deferred of its own
    (one Deferred shared by two consumers gives the second C{None}).
    """

    def __init__(self) -> None:
        self._waiting: list[Deferred[None]] = []

    def wait(self, clock: IReactorTime | None = None, timeout: float = 0.0) -> Deferred[None]:
        """
        A new waiter, fired by the next L{fire} or L{fail}, or (with a
        C{clock}) with C{None} after C{timeout} seconds. Cancelling it only
        withdraws it.
        """
        d: Deferred[None] = Deferred(self._withdraw)
        self._waiting.append(d)
        if clock is not None:
            timer = clock.callLater(timeout, self._release, d)
            d.addBoth(_cancel_call, timer)
        return d

    def fire(self) -> None:
        for d in self._take():
            d.callback(None)

    def fail(self, error: Exception) -> None:
        for d in self._take():
            d.errback(error)

    def _take(self) -> list[Deferred[None]]:
        pending, self._waiting = self._waiting, []
        return pending

    def _withdraw(self, d: Deferred[None]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)

    def _release(self, d: Deferred[None]) -> None:
        if d in self._waiting:
            self._waiting.remove(d)
            d.callback(None)


def _cancel_call(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


class Timers:
    """Named delayed calls on one clock: setting a name again replaces its call."""

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._calls: dict[str, IDelayedCall] = {}

    def later(self, name: str, delay: float, f: Callable[[], object]) -> None:
        self.cancel(name)

        def run() -> None:
            del self._calls[name]
            f()

        self._calls[name] = self._clock.callLater(delay, run)

    def remaining(self, name: str) -> float | None:
        """Seconds until C{name} runs, or C{None} when it is not set."""
        call = self._calls.get(name)
        if call is None:
            return None
        return max(0.0, call.getTime() - self._clock.seconds())

    def cancel(self, name: str) -> None:
        call = self._calls.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def cancel_all(self) -> None:
        for name in list(self._calls):
            self.cancel(name)
