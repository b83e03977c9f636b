# -*- test-case-name: tests.test_daemon -*-
"""
The daemon's signals (installed once the reactor runs, over Twisted's own):
SIGHUP reloads the config; SIGTERM and SIGINT stop gracefully, and a second
one stops at once.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from twisted.logger import Logger

log = Logger(namespace="llamaswap.signals")


def install(reactor: Any, reload: Callable[[str], None], hurry: Callable[[], None]) -> None:
    """
    Handlers run between two bytecodes of whatever runs: they only hand work
    to the reactor thread.
    """
    stops = 0

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stops
        stops += 1
        name = signal.Signals(signum).name
        if stops == 1:
            # The reactor's own handler: it stops, and twistd then exits by this signal
            # (what systemd expects of a clean stop).
            (reactor.sigInt if signum == signal.SIGINT else reactor.sigTerm)(signum, frame)
            reactor.callFromThread(
                log.info, "{signal}: stopping gracefully (again to stop at once)", signal=name
            )
        else:
            reactor.callFromThread(log.warn, "{signal} again: stopping now", signal=name)
            reactor.callFromThread(hurry)

    def hangup(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(reload, "SIGHUP")

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
