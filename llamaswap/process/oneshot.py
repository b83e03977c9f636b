# -*- test-case-name: tests.test_metrics -*-
"""
Short-lived helper programs (C{nvidia-smi}): run one, collect its stdout,
and kill it if it takes too long, so a hung driver never leaves a child behind
or a caller waiting.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure


class _Collect(ProcessProtocol):
    """Collects a short-lived child's stdout; fires C{done} with it (or None on failure)."""

    def __init__(self) -> None:
        self.out = b""
        self.done: Deferred[bytes | None] = Deferred()
        self.timer: IDelayedCall | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.done.callback(self.out if isinstance(reason.value, ProcessDone) else None)

    def kill(self) -> None:
        if self.transport is not None:
            self.transport.signalProcess("KILL")


def run_briefly(reactor: Any, argv: Sequence[str], timeout: float) -> Deferred[bytes | None]:
    """
    Run C{argv} (through C{reactor}, an L{IReactorProcess} and clock) with our
    environment; fire with its stdout, or None if it could not start, failed,
    or ran longer than C{timeout} seconds (it is killed then).
    """
    collect = _Collect()
    try:
        IReactorProcess(reactor).spawnProcess(collect, argv[0], list(argv), env=dict(os.environ))
    except OSError:
        return succeed(None)
    collect.timer = reactor.callLater(timeout, collect.kill)
    return collect.done
