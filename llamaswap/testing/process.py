# -*- test-case-name: tests.test_process,tests.test_supervisor -*-
"""
Fakes for unit-testing L{llamaswap.process} and L{llamaswap.supervisor}
without real processes, sockets or time.

 - L{FakeProcessReactor}: a L{MemoryReactorClock} whose C{spawnProcess}
   records a L{FakeChild} (cf. Twisted's C{test_procmon}), and whose
   C{connectTCP} (the port check before a spawn) is refused at once unless the
   test says the port is taken, or that connections hang.
 - L{FakeKill}: the injected C{kill(pgid, sig)}; records signals and makes the
   matching child exit when it "dies" of that signal.
 - L{FakeHealth}: the injected HTTP client for health checks; each URL answers
   a status code, refuses the connection, or hangs.
"""

from __future__ import annotations

import signal
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import (
    ConnectionRefusedError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IConnector, IProcessTransport, IReactorProcess
from twisted.internet.protocol import ClientFactory, ProcessProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from llamaswap.config import Config, parse_config


@implementer(IProcessTransport)
class FakeChild:
    """A spawned child: the transport its protocol sees, driven by the test."""

    def __init__(
        self,
        proto: ProcessProtocol,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str | None,
        child_fds: dict[int, Any] | None,
        pid: int,
    ) -> None:
        self.proto = proto
        self.executable = executable
        self.args = args
        self.env = env
        self.path = path
        self.child_fds = child_fds
        self.pid: int | None = pid
        self.original_pid = pid
        self.signals: list[Any] = []  # via transport.signalProcess
        self.dies_on: set[int] = {signal.SIGTERM, signal.SIGKILL}
        self.exited = False
        self.ended = False
        self.lost_connection = False
        self.stdin_closed = False

    # --- test controls ---------------------------------------------------------

    def output(self, data: bytes, fd: int = 1) -> None:
        self.proto.childDataReceived(fd, data)

    def exit(self, code: int = 0, sig: int | None = None, *, end: bool = True) -> None:
        """Reap the child (processExited) and, unless C{end=False}, processEnded."""
        if self.exited:
            if end:
                self.end()
            return
        self.exited = True
        self.pid = None
        if code == 0 and sig is None:
            self._reason = Failure(ProcessDone(0))
        else:
            self._reason = Failure(ProcessTerminated(None if sig else code, sig, None))
        self.proto.processExited(self._reason)
        if end:
            self.end()

    def end(self) -> None:
        """All pipes closed: processEnded."""
        if not self.ended:
            self.ended = True
            self.proto.processEnded(self._reason)

    # --- IProcessTransport ---------------------------------------------------

    def signalProcess(self, signalID: Any) -> None:
        if self.exited:
            raise ProcessExitedAlready()
        sig = getattr(signal, "SIG" + signalID) if isinstance(signalID, str) else signalID
        self.signals.append(sig)
        if sig in self.dies_on:
            self.exit(sig=sig)

    def loseConnection(self) -> None:
        self.lost_connection = True
        if self.exited:
            self.end()

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, descriptor: int) -> None:
        pass

    def writeToChild(self, childFD: int, data: bytes) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def writeSequence(self, data: Iterable[bytes]) -> None:
        pass

    def getPeer(self) -> Any:
        return None

    def getHost(self) -> Any:
        return None


@implementer(IReactorProcess)
class FakeProcessReactor(MemoryReactorClock):
    """MemoryReactorClock plus a C{spawnProcess} that records children."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[FakeChild] = []
        self._next_pid = 1000
        self.spawn_error: Exception | None = None
        self.taken_ports: set[int] = set()  # connections to these are accepted
        self.hang_connects = False  # connections neither succeed nor fail
        self.accepted: list[StringTransport] = []  # connections accepted on taken ports

    def connectTCP(
        self,
        host: str,
        port: int,
        factory: ClientFactory,
        timeout: float = 30,
        bindAddress: Any = None,
    ) -> IConnector:
        connector: IConnector = super().connectTCP(host, port, factory, timeout, bindAddress)
        if self.hang_connects:
            return connector
        if port in self.taken_ports:
            protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
            assert protocol is not None
            transport = StringTransport()
            self.accepted.append(transport)
            protocol.makeConnection(transport)
        else:
            factory.clientConnectionFailed(connector, Failure(ConnectionRefusedError()))
        return connector

    # The protocol is narrowed to ProcessProtocol (what llamaswap passes), whose
    # childDataReceived and processEnded the fake children call.
    def spawnProcess(  # type: ignore[override]
        self,
        processProtocol: ProcessProtocol,
        executable: bytes | str,
        args: Any = (),
        env: Any = None,
        path: Any = None,
        uid: Any = None,
        gid: Any = None,
        usePTY: bool = False,
        childFDs: Any = None,
    ) -> FakeChild:
        if self.spawn_error is not None:
            raise self.spawn_error
        self._next_pid += 1
        child = FakeChild(
            processProtocol,
            str(executable),
            [str(a) for a in args],
            dict(env or {}),
            path,
            childFDs,
            self._next_pid,
        )
        self.children.append(child)
        processProtocol.makeConnection(child)
        return child

    def live(self) -> list[FakeChild]:
        """Children not yet reaped."""
        return [c for c in self.children if not c.exited]


class FakeKill:
    """The injected C{kill(pgid, sig)}: records, and kills matching children."""

    def __init__(self, reactor: FakeProcessReactor) -> None:
        self._reactor = reactor
        self.sent: list[tuple[int, int]] = []

    def __call__(self, pgid: int, sig: int) -> None:
        child = next((c for c in self._reactor.children if c.original_pid == pgid), None)
        if child is None or child.ended:
            raise ProcessLookupError(pgid)
        self.sent.append((pgid, sig))
        if not child.exited and sig in child.dies_on:
            child.exit(sig=sig)


class FakeResponse:
    def __init__(self, code: int) -> None:
        self.code = code

    def content(self) -> Deferred[bytes]:
        return succeed(b"")


class FakeHealth:
    """
    Stands in for the treq client used for health checks.

    C{codes[url]}: an int status, C{"refused"} (default) or C{"hang"}.
    """

    def __init__(self, clock: Any) -> None:
        self._clock = clock
        self.codes: dict[str, int | str] = {}
        self.calls: list[tuple[float, str]] = []
        self.hanging: list[Deferred[Any]] = []

    def set(self, url: str, code: int | str) -> None:
        self.codes[url] = code

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((self._clock.seconds(), url))
        code = self.codes.get(url, "refused")
        if code == "refused":
            return fail(ConnectionRefusedError())
        if code == "hang":
            d: Deferred[Any] = Deferred()
            self.hanging.append(d)
            return d
        assert isinstance(code, int)
        return succeed(FakeResponse(code))


def make_config(text: str, base_dir: str = ".") -> Config:
    return parse_config(text, base_dir=base_dir)
