# -*- test-case-name: tests.test_orphans,tests.test_reliability,tests.test_daemon -*-
"""
Watching and launching real processes from tests: what C{/proc} says about a
pid, process groups and children, polling the reactor until something holds,
recording the pids the reactor spawns, how to run C{twistd llamaswap}, and a
ProcessProtocol that collects a child's output.

Liveness is read from C{/proc/<pid>/stat}: a zombie counts as dead (it only
waits to be reaped), and a start time tells a reused pid from the original.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from collections.abc import Callable, Collection
from typing import Any, NamedTuple

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from tests.fakeserver_helper import fakeserver_env

# twistd has no __main__ (and `python -m twisted` is the newer `twist` runner,
# which has no pidfile or daemon mode): run its entry point as its script does.
TWISTD = [
    sys.executable,
    "-c",
    "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()",
]


def twistd_env(**extra: str) -> dict[str, str]:
    """
    The environment for a child that must find the llamaswap twistd plugin:
    ours, with the checkout on C{PYTHONPATH} and without systemd's socket
    activation variables (a test sets them itself), plus C{extra}.
    """
    env = fakeserver_env()
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(name, None)
    env.update(extra)
    return env


Status = tuple[int | None, int | None]  # (exit code, signal): one of them is None


class ChildOutput(ProcessProtocol):
    """
    A child spawned by the reactor: all it writes (stdout and stderr, in
    order) in C{output}, and its end.
    """

    def __init__(self) -> None:
        self.output = bytearray()
        self.done = False  # processEnded was called
        self.status: Status | None = None
        self._reason: Failure | None = None  # an end that is not an exit status
        self._seen: list[tuple[bytes, Deferred[None], int]] = []
        self._ended: list[Deferred[Status]] = []

    @property
    def pid(self) -> int:
        pid = self.transport.pid  # type: ignore[union-attr]
        assert isinstance(pid, int)
        return pid

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        self.output += data
        for item in list(self._seen):
            if self.output.find(item[0], item[2]) != -1:
                self._seen.remove(item)
                item[1].callback(None)

    def wait_for(self, text: bytes, after: int = 0) -> Deferred[None]:
        """Fires once the output contains C{text} (starting at or after byte C{after})."""
        if self.output.find(text, after) != -1:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._seen.append((text, d, after))
        return d

    def processEnded(self, reason: Failure) -> None:
        self.done = True
        value = reason.value
        if isinstance(value, (ProcessDone, ProcessTerminated)):
            self.status = (value.exitCode, value.signal)
        else:
            self._reason = reason
        waiters, self._ended = self._ended, []
        for waiter in waiters:
            if self.status is not None:
                waiter.callback(self.status)
            else:
                waiter.errback(reason)

    def ended(self) -> Deferred[Status]:
        """Fires with (exit code, signal) once the child has ended and was reaped."""
        if self.status is not None:
            return succeed(self.status)
        if self._reason is not None:
            return fail(self._reason)
        waiter: Deferred[Status] = Deferred()
        self._ended.append(waiter)
        return waiter


class ProcStat(NamedTuple):
    """The fields of C{/proc/<pid>/stat} the tests look at."""

    state: str  # "Z" for a zombie
    ppid: int
    pgid: int
    starttime: int  # clock ticks after boot: tells a reused pid apart


def proc_stat(pid: int) -> ProcStat | None:
    """What C{/proc} says about C{pid}, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after it.
    fields = text.rsplit(")", 1)[1].split()
    return ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def alive(pid: int, starttime: int | None = None) -> bool:
    """
    Whether C{pid} runs (a zombie has ended: it only waits to be reaped);
    with C{starttime}, only if it is still that same process.
    """
    stat = proc_stat(pid)
    if stat is None or stat.state == "Z":
        return False
    return starttime is None or stat.starttime == starttime


def live_pids(match: Callable[[ProcStat], bool]) -> set[int]:
    """Every live process whose stat C{match}es."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat.state != "Z" and match(stat):
                found.add(int(entry))
    return found


def group(pgid: int) -> list[int]:
    """Live members of process group C{pgid}, in pid order."""
    return sorted(live_pids(lambda stat: stat.pgid == pgid))


def children_of(pid: int) -> list[int]:
    """Live children of C{pid}, in pid order."""
    return sorted(live_pids(lambda stat: stat.ppid == pid))


def our_children() -> set[int]:
    """Live children of this process (the test's, and the proxy's it runs)."""
    return set(children_of(os.getpid()))


def survivors(pids: Collection[int]) -> set[int]:
    """Processes still alive among C{pids} or in their process groups (guards, grandchildren)."""
    return {p for p in pids if alive(p)} | live_pids(lambda stat: stat.pgid in pids)


def command(pid: int) -> str:
    """C{pid}'s command line, space-separated ("?" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return "?"


def send_signal(pid: int, signum: int) -> None:
    """C{kill(pid, signum)}; a process that is already gone is not an error."""
    try:
        os.kill(pid, signum)
    except OSError as e:
        if e.errno != errno.ESRCH:
            raise


def rss_kib() -> int:
    """This process's resident set size (the proxy runs in it), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02
) -> None:
    """Let the reactor run until C{check()} is true; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await sleep(interval)


def record_spawns(case: SynchronousTestCase) -> list[int]:
    """
    The pids of every process the reactor spawns during C{case}, in order
    (recorded at C{spawnProcess}: a server that dies while starting never
    shows its pid anywhere else).
    """
    pids: list[int] = []
    spawn = reactor.spawnProcess

    def recording_spawn(*args: Any, **kwargs: Any) -> Any:
        transport = spawn(*args, **kwargs)
        pids.append(transport.pid)
        return transport

    case.patch(reactor, "spawnProcess", recording_spawn)  # type: ignore[no-untyped-call]
    return pids
