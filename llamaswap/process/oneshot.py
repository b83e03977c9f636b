# -*- test-case-name: tests.test_metrics -*-
"""
Short-lived helper programs (C{nvidia-smi}): run one, collect its stdout,
and kill it if it takes too long, so a hung driver never leaves a child behind
or a caller waiting.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


class _Collect(ProcessProtocol):
    """Collects a short-lived child's stdout; fires C{done} with it (or None on failure)."""

    def __init__(self, ended: Callable[[], None] | None = None) -> None:
        self.out = b""
        self.done: Deferred[bytes | None] = Deferred()
        self.timer: IDelayedCall | None = None
        self._ended = ended

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        # A cancelled run (its caller gave up) has been told already; this is ignored then.
        self.done.callback(self.out if isinstance(reason.value, ProcessDone) else None)
        # After the caller had its answer: a next run it starts at once counts before this
        # one stops counting, so "settled" never fires between two runs of one reading.
        if self._ended is not None:
            self._ended()

    def kill(self) -> None:
        if self.transport is not None:
            self.transport.signalProcess("KILL")


def run_briefly(reactor: Any, argv: Sequence[str], timeout: float) -> Deferred[bytes | None]:
    """
    Run C{argv} (through C{reactor}, an L{IReactorProcess} and clock) with our
    environment; fire with its stdout, or None if it could not start, failed,
    or ran longer than C{timeout} seconds (it is killed then).
    """
    return BriefRuns(reactor).run(argv, timeout)


class BriefRuns:
    """
    Runs of short programs that can be waited for until every one has ended
    (L{settled}): a stopping service must not leave one behind. Cancelling a
    run kills its program.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._live = 0
        self._waiters: list[Deferred[None]] = []

    def run(self, argv: Sequence[str], timeout: float) -> Deferred[bytes | None]:
        collect = _Collect(self._ended)
        collect.done = Deferred(lambda _: collect.kill())
        try:
            IReactorProcess(self._reactor).spawnProcess(
                collect, argv[0], list(argv), env=dict(os.environ)
            )
        except OSError:
            return succeed(None)
        self._live += 1
        collect.timer = self._reactor.callLater(timeout, collect.kill)
        return collect.done

    def settled(self) -> Deferred[None]:
        """Fire once no program runs (at once if none does)."""
        if not self._live:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append(waiter)
        return waiter

    def _ended(self) -> None:
        self._live -= 1
        if not self._live:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(None)
