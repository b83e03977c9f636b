# -*- test-case-name: tests.test_process -*-
"""
Is a starting server ours, and healthy yet?

L{HealthPoller} does both checks of one start: before the spawn, whether
something else already accepts connections on the model's address (it would
answer our health checks and requests); after it, polling C{proxy +
checkEndpoint} until it answers exactly 200, or the health timeout. It owns
its timers and its one request in flight; L{HealthPoller.stop} cancels them
all, after which it calls nobody.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IAddress, IConnector, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from llamaswap.errors import StartFailed
from llamaswap.process.waiting import Timers

if TYPE_CHECKING:
    from llamaswap.config import ModelConfig

# Health polling: fast at first, so readiness is noticed within ~50 ms, then
# backing off gently for slow loaders, to four polls a second: a poll is one
# loopback GET, while every moment a loaded model goes unnoticed leaves the GPU idle
# and its waiting requests unanswered (at 1 s, a start slowed past 3 s by a busy
# machine was noticed up to half a second late).
POLL_FAST = 0.05
POLL_FAST_PERIOD = 3.0
POLL_BACKOFF = 1.25
POLL_MAX = 0.25
PROBE_TIMEOUT = 2.0  # one health request (a server that accepts but never answers)
# Before a spawn, a connection to the model's address is tried for this long: if
# something accepts it, another server owns the port (and would answer our health
# checks and requests). Refused or timed out: the port is free.
PORT_CHECK_TIMEOUT = 1.0


class HealthPoller:
    """The port check and health polling of one start of C{model}."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        reactor: Any,
        clock: IReactorTime,
        http: Any,
        timeout: float,
    ) -> None:
        self._model = model
        self._reactor = reactor
        self._clock = clock
        self._http = http
        self._timeout = timeout
        self._on_healthy: Callable[[], None] = _nobody
        self._on_timeout: Callable[[str], None] = _nobody
        self._timers = Timers(clock)
        self._pending: Deferred[Any] | None = None  # the port check or one probe
        self._stopped = False
        self._started = 0.0
        self._delay = POLL_FAST
        self.address = proxy_address(model.proxy)  # host and port, if the URL has them

    def check_port(self) -> Deferred[StartFailed | None]:
        """
        Check that nothing accepts connections on L{address} yet.

        @return: fires with C{None} if the port is free, or with the error to
            fail the start with if it is taken; errbacks only if cancelled
            (by L{stop}).
        """
        if self.address is None:
            return succeed(None)
        host, port = self.address
        d = port_in_use(self._reactor, host, port, timeout=PORT_CHECK_TIMEOUT)
        self._pending = d

        def checked(in_use: bool) -> StartFailed | None:
            self._pending = None
            if not in_use:
                return None
            return StartFailed(
                f"cannot start model {self._model.id}: port {port} on {host} is already in "
                f"use by another process; stop that process or give the model another port "
                f"(proxy: {self._model.proxy})"
            )

        return d.addCallback(checked)

    def poll(self, on_healthy: Callable[[], None], on_timeout: Callable[[str], None]) -> None:
        """
        Poll until the server answers 200 (C{on_healthy()}) or the health
        timeout passed (C{on_timeout(message)}). C{checkEndpoint: none}:
        healthy at once.
        """
        self._on_healthy, self._on_timeout = on_healthy, on_timeout
        if self._model.check_endpoint is None:
            on_healthy()
            return
        self._started = self._clock.seconds()
        self._timers.later("deadline", self._timeout, self._timed_out)
        self._timers.later("probe", POLL_FAST, self._probe)

    def stop(self) -> None:
        """Cancel every timer and the request in flight; nobody is called after this."""
        self._stopped = True
        self._timers.cancel_all()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _probe(self) -> None:
        url = self._model.proxy + (self._model.check_endpoint or "")
        try:
            d: Deferred[Any] = self._http.get(url, allow_redirects=False)
        except Exception as e:
            d = fail(e)

        def read(response: Any) -> Deferred[int]:
            # Drain the body, or the connection stays checked out of the pool.
            body: Deferred[Any] = response.content()
            return body.addCallback(lambda _: int(response.code))

        d.addCallback(read)
        d.addTimeout(PROBE_TIMEOUT, self._clock)
        self._pending = d
        d.addBoth(self._probed)

    def _probed(self, result: int | Failure) -> None:
        if self._stopped:
            return  # our own cancellation
        self._pending = None
        if result == 200:
            self.stop()
            self._on_healthy()
            return
        if self._clock.seconds() - self._started >= POLL_FAST_PERIOD:
            self._delay = min(POLL_MAX, self._delay * POLL_BACKOFF)
        self._timers.later("probe", self._delay, self._probe)

    def _timed_out(self) -> None:
        self.stop()
        self._on_timeout(
            f"model {self._model.id} did not become healthy within "
            f"{self._timeout:g}s (health check timed out)"
        )


def _nobody(*args: object) -> None:
    pass


def ignore_cancelled(failure: Failure) -> Failure | None:
    """An errback for a Deferred that L{HealthPoller.stop} may cancel."""
    return None if isinstance(failure.value, CancelledError) else failure


def proxy_address(url: str) -> tuple[str, int] | None:
    """The host and port of a model's C{proxy} URL (None if it has none)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, port


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class _PortProbe(ClientFactory):
    """Fires C{result} with whether a connection was accepted."""

    noisy = False  # one probe per start: "Starting factory" lines are noise

    def __init__(self) -> None:
        self.connector: IConnector | None = None
        self.result: Deferred[bool] = Deferred(self._cancel)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        # Called once the connection is established: somebody listens.
        if not self.result.called:
            self.result.callback(True)
        return _Hangup()

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.result.called:
            self.result.callback(False)

    def _cancel(self, _: Deferred[bool]) -> None:
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:
                pass  # connected or failed meanwhile


def port_in_use(reactor: Any, host: str, port: int, *, timeout: float) -> Deferred[bool]:
    """
    Whether something accepts TCP connections on C{host:port}: a connection
    is opened and closed at once. Refused, unreachable or no answer within
    C{timeout} seconds: C{False}. Cancelling it stops the attempt.
    """
    probe = _PortProbe()
    try:
        probe.connector = reactor.connectTCP(host, port, probe, timeout=timeout)
    except Exception:
        return succeed(False)  # e.g. an unusable address: the health check will tell
    return probe.result
