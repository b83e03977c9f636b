# -*- test-case-name: tests.test_twisted_private -*-
"""
Every private Twisted name llamaswap leans on, in one place, under our own names.

Each exists because the public API cannot do what we need (said at each). The rest of the
package imports these names from here and never reaches into Twisted's privates itself
(tests/test_architecture.py checks that); tests/test_twisted_private.py pins each one with
its own test, and pyproject.toml caps Twisted below its next major version, so upgrading
Twisted is a deliberate step: raise the cap, run those tests, adapt this module.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.logger import FileLogObserver, LogPublisher
from twisted.python.logfile import LogFile
from twisted.web._newclient import HTTP11ClientProtocol, RequestNotSent
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol

__all__ = [
    "ChannelHooks",
    "HTTP11ClientFactory",
    "HTTP11ClientProtocol",
    "HookedConnectionPool",
    "ReplayingConnection",
    "RequestNotSent",
    "pending_request_line",
    "publisher_observers",
    "rotating_log_file",
    "standard_endpoint_factory",
    "tcp_server_address",
    "wrap_channel",
]

# --- the upstream client ---------------------------------------------------------------

# The factory the pool builds connections with; subclassed to make it quiet and to size
# the socket's reads (llamaswap.http). Twisted has no public way to choose it.
HTTP11ClientFactory = _HTTP11ClientFactory


def quiescent_callback(factory: Any) -> Callable[[Any], None]:
    """The callback an L{HTTP11ClientFactory} hands its protocols: "I am idle again"."""
    callback: Callable[[Any], None] = factory._quiescentCallback
    return callback


class HookedConnectionPool(HTTPConnectionPool):
    """
    L{HTTPConnectionPool} with the steps of its connection cache under public names.

    Twisted's pool decides alone whether a finished connection is kept, and its
    C{getConnection} names its own retrying wrapper; llamaswap.http's pool needs to
    decide both (close a connection a waiting request may need; replay any method).
    """

    def use_protocol_factory(self, factory: type[_HTTP11ClientFactory]) -> None:
        """Build new connections with C{factory} (a subclass of L{HTTP11ClientFactory})."""
        self._factory = factory

    def take_idle(self, key: Any) -> Any | None:
        """An idle kept connection for C{key}, taken out of the cache, or None."""
        connections = self._connections.get(key)
        while connections:
            cached = connections.pop(0)
            self._timeouts.pop(cached).cancel()
            if cached.state == "QUIESCENT":
                return cached
        return None

    def new_connection(self, key: Any, endpoint: Any) -> Deferred[Any]:
        """A new connection to C{endpoint}, kept under C{key} once it is idle."""
        connection: Deferred[Any] = self._newConnection(key, endpoint)
        return connection

    def put_connection(self, key: Any, connection: Any) -> None:
        """A connection finished its answer: keep it (override to decide otherwise)."""
        self.keep_connection(key, connection)

    def keep_connection(self, key: Any, connection: Any) -> None:
        """Cache C{connection} for reuse under C{key}, as Twisted's pool does."""
        HTTPConnectionPool._putConnection(self, key, connection)  # type: ignore[no-untyped-call]

    def _putConnection(self, key: Any, connection: Any) -> None:
        self.put_connection(key, connection)


class ReplayingConnection(_RetryingHTTP11ClientProtocol):
    """
    Twisted's wrapper of a reused connection that retries a failed request on a new one,
    with the retry rule under a public name: Twisted's retries only idempotent methods
    without a body, and llamaswap.http replays any method whose body is in memory.
    """

    def __init__(
        self, connection: HTTP11ClientProtocol, fresh: Callable[[], Deferred[Any]]
    ) -> None:
        super().__init__(connection, fresh)  # type: ignore[no-untyped-call]

    def should_replay(self, method: bytes, exception: Exception, body_producer: Any) -> bool:
        """Whether a request that failed with C{exception} is sent again (once)."""
        return False

    def _shouldRetry(self, method: bytes, exception: Exception, bodyProducer: Any) -> bool:
        return self.should_replay(method, exception, bodyProducer)


def standard_endpoint_factory(agent: Agent) -> Any:
    """The endpoint factory L{Agent} built for itself (host name resolution, TLS)."""
    return agent._endpointFactory


# --- the server side -------------------------------------------------------------------


def wrap_channel(channel: HTTPChannel) -> Any:
    """
    C{channel} wrapped the way L{Site}'s default protocol wraps a plain L{HTTPChannel}:
    Twisted's wrapper keeps the HTTP/2 negotiation hook, and only the channel class
    is ours.
    """
    return _GenericHTTPChannelProtocol(channel)


class ChannelHooks(HTTPChannel):
    """L{HTTPChannel} whose answer to a malformed request is ours to write."""

    def bad_request(self) -> None:
        """A request line or header did not parse (Twisted answers a bare 400)."""
        HTTPChannel._respondToBadRequestAndDisconnect(self)  # type: ignore[no-untyped-call]

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_request()


def pending_request_line(channel: HTTPChannel) -> tuple[bytes | None, bytes | None]:
    """
    The method and path of the request C{channel} is reading, or None where unknown.

    While the headers are still arriving (say, a body we refuse by its
    Content-Length) the request object does not know them yet; the channel does.
    """
    return getattr(channel, "_command", None), getattr(channel, "_path", None)


# --- the log ---------------------------------------------------------------------------


def publisher_observers(publisher: LogPublisher) -> list[Any] | None:
    """
    The live list of C{publisher}'s observers, or None if Twisted changed its layout.

    twistd registers its log file observer before our service starts, and the public
    API can only add or remove observers, not reach one we did not register: to filter
    what twistd's log receives (C{logToStdout}) we wrap those in place.
    """
    observers = getattr(publisher, "_observers", None)
    return observers if isinstance(observers, list) else None


def rotating_log_file(observer: object) -> LogFile | None:
    """
    The size-rotated file C{observer} writes to, if it is a file observer on one.

    twistd opens its C{--logfile} as a L{LogFile} with no bound on the rotated files
    it keeps, and no option to set one; the file is only reachable through the
    observer twistd registers (its C{_outFile}). llamaswap.logs sets the bounds on it.
    """
    if not isinstance(observer, FileLogObserver):
        return None
    out = getattr(observer, "_outFile", None)
    return out if isinstance(out, LogFile) else None


# --- listening ---------------------------------------------------------------------------


def tcp_server_address(endpoint: object) -> tuple[str, int] | None:
    """
    The (interface, port) a TCP server endpoint will bind, or None for other endpoints.

    The public API tells the address only once listening; llamaswap.listen checks it
    before twistd daemonizes, which is before the service listens.
    """
    if not isinstance(endpoint, TCP4ServerEndpoint | TCP6ServerEndpoint):
        return None
    interface, port = getattr(endpoint, "_interface", None), getattr(endpoint, "_port", None)
    if not isinstance(interface, str) or not isinstance(port, int):
        return None
    return interface, port
