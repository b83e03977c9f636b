# -*- test-case-name: tests.test_reload -*-
"""
C{--watch-config}: look at the config file twice a second and reload once a
change has held still for one look (an editor writes in several steps, or
writes a new file and renames it over the old one: both are seen, since the
file is looked up by its path each time).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall

POLL_SECONDS = 0.5

Signature = tuple[int, int, int, int]


def signature(path: str) -> Signature | None:
    """What tells one version of the file from another; None while it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ConfigWatcher:
    """Calls C{changed()} after the file at C{path} changed and then held still."""

    def __init__(self, path: str, clock: IReactorTime, changed: Callable[[], None]) -> None:
        self._path = path
        self._changed = changed
        self._seen = signature(path)
        self._pending: Signature | None = None
        self._loop = LoopingCall(self._look)
        self._loop.clock = clock

    def start(self) -> None:
        self._loop.start(POLL_SECONDS, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def _look(self) -> None:
        now = signature(self._path)
        if now is None or now == self._seen:
            self._pending = None  # missing (mid-rename) or unchanged: nothing to do yet
            return
        if now != self._pending:
            self._pending = now  # changed: reload once it holds still for one look
            return
        self._seen, self._pending = now, None
        self._changed()
