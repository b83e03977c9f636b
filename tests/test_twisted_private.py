"""
One test per private Twisted name in llamaswap._twisted: each pins the behaviour we rely on,
so a Twisted upgrade that changes one fails here, by name, before it fails anywhere else.
"""

from __future__ import annotations

import io
import os
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogPublisher, jsonFileLogObserver, textFileLogObserver
from twisted.python.logfile import DailyLogFile, LogFile
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, Agent
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from llamaswap._twisted import (
    ChannelHooks,
    HookedConnectionPool,
    HTTP11ClientFactory,
    ReplayingConnection,
    RequestNotSent,
    pending_request_line,
    publisher_observers,
    quiescent_callback,
    rotating_log_file,
    standard_endpoint_factory,
    tcp_server_address,
    wrap_channel,
)


class _RecordingEndpoint:
    def __init__(self) -> None:
        self.factories: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        self.factories.append(factory)
        return Deferred()


class _Connection:
    """A stand-in for a kept HTTP11ClientProtocol."""

    def __init__(self, state: str = "QUIESCENT", answer: Any = None) -> None:
        self.state = state
        self.answer = answer
        self.requests = 0

    def request(self, request: Any) -> Deferred[Any]:
        self.requests += 1
        return self.answer if self.answer is not None else succeed("answered")


class _Request:
    method = b"POST"
    bodyProducer = None

    def _setPersistent(self, persistent: bool) -> None:
        pass


class ClientSideTests(SynchronousTestCase):
    def test_factory_and_quiescent_callback(self) -> None:
        """
        The pool builds its connections with the factory we choose, handing it the
        callback through which a connection reports it is idle again.
        """

        class Factory(HTTP11ClientFactory):
            pass

        pool = HookedConnectionPool(Clock())
        pool.use_protocol_factory(Factory)
        endpoint = _RecordingEndpoint()
        pool.new_connection("key", endpoint)
        [factory] = endpoint.factories
        self.assertIsInstance(factory, Factory)
        self.assertTrue(callable(quiescent_callback(factory)))

    def test_take_idle_keep_and_put_hook(self) -> None:
        """
        A finished connection goes through put_connection; kept ones come back from
        take_idle, stale ones are dropped, and their cache timeouts are cancelled.
        """
        clock = Clock()
        put: list[Any] = []

        class Pool(HookedConnectionPool):
            def put_connection(self, key: Any, connection: Any) -> None:
                put.append(connection)
                self.keep_connection(key, connection)

        pool = Pool(clock)
        stale, idle = _Connection(), _Connection()
        pool._putConnection("key", stale)  # what a connection's quiescent callback calls
        pool._putConnection("key", idle)
        self.assertEqual(put, [stale, idle])
        stale.state = "CONNECTION_LOST"  # the server closed it while it sat in the cache
        self.assertEqual(len(clock.getDelayedCalls()), 2)
        self.assertIs(pool.take_idle("key"), idle)
        self.assertIsNone(pool.take_idle("key"))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_replaying_connection_asks_should_replay(self) -> None:
        """A request failing on a kept connection goes to a fresh one when the rule says so."""
        fresh = _Connection()
        asked: list[tuple[bytes, type[Exception]]] = []

        class Replaying(ReplayingConnection):
            def should_replay(self, method: bytes, exception: Exception, producer: Any) -> bool:
                asked.append((method, type(exception)))
                return True

        broken = _Connection(answer=fail(RequestNotSent()))
        wrapper = Replaying(broken, lambda: succeed(fresh))  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(wrapper.request(_Request())), "answered")
        self.assertEqual(asked, [(b"POST", RequestNotSent)])
        self.assertEqual((broken.requests, fresh.requests), (1, 1))

    def test_standard_endpoint_factory(self) -> None:
        """Agent's own endpoint factory builds an endpoint for a URI."""
        agent = Agent(MemoryReactorClock())  # type: ignore[no-untyped-call]
        endpoint = standard_endpoint_factory(agent).endpointForURI(
            URI.fromBytes(b"http://example.invalid:8080/")
        )
        self.assertTrue(hasattr(endpoint, "connect"))


class ServerSideTests(SynchronousTestCase):
    def _channel(self, channel: HTTPChannel) -> tuple[HTTPChannel, StringTransport]:
        channel.site = Site(Resource())  # type: ignore[no-untyped-call]
        channel.requestFactory = Request
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_wrap_channel(self) -> None:
        """The wrapper hands bytes to our channel, which answers them."""
        channel = HTTPChannel()
        channel.site = Site(Resource())  # type: ignore[no-untyped-call]
        channel.requestFactory = Request
        protocol = wrap_channel(channel)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /missing HTTP/1.1\r\nHost: localhost\r\n\r\n")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 404"))

    def test_bad_request_hook(self) -> None:
        """A request line that does not parse reaches bad_request instead of Twisted's 400."""
        calls: list[bool] = []

        class Hooked(ChannelHooks):
            def bad_request(self) -> None:
                calls.append(True)
                assert self.transport is not None
                self.transport.loseConnection()

        channel, transport = self._channel(Hooked())
        channel.dataReceived(b"NOT A REQUEST LINE AT ALL\r\n\r\n")
        self.assertEqual(calls, [True])
        self.assertEqual(transport.value(), b"")

    def test_pending_request_line(self) -> None:
        """While headers still arrive, the channel knows the method and path."""
        channel, _ = self._channel(HTTPChannel())
        self.assertEqual(pending_request_line(channel), (None, None))
        channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")
        self.assertEqual(pending_request_line(channel), (b"POST", b"/v1/chat/completions"))


class LogTests(SynchronousTestCase):
    def test_publisher_observers_is_the_live_list(self) -> None:
        """Replacing an entry of the list changes who receives the publisher's events."""
        first: list[dict[str, Any]] = []
        second: list[dict[str, Any]] = []
        publisher = LogPublisher(first.append)
        observers = publisher_observers(publisher)
        assert observers is not None
        self.assertEqual(observers, [first.append])
        observers[0] = second.append
        publisher({"log_format": "x"})
        self.assertEqual((len(first), len(second)), (0, 1))

    def test_rotating_log_file(self) -> None:
        """
        twistd's --logfile observer (textFileLogObserver on a LogFile) gives its
        LogFile; other files and observers give None.
        """
        folder = self.mktemp()
        os.makedirs(folder)
        log_file = LogFile("x.log", folder)
        self.addCleanup(log_file.close)
        self.assertIs(rotating_log_file(textFileLogObserver(log_file)), log_file)
        self.assertIs(rotating_log_file(jsonFileLogObserver(log_file)), log_file)
        daily = DailyLogFile("d.log", folder)
        self.addCleanup(daily.close)
        self.assertIsNone(rotating_log_file(textFileLogObserver(daily)))
        self.assertIsNone(rotating_log_file(textFileLogObserver(io.StringIO())))
        self.assertIsNone(rotating_log_file(print))


class EndpointTests(SynchronousTestCase):
    def test_tcp_server_address(self) -> None:
        """A TCP server endpoint's interface and port, before it listens; None for others."""
        reactor = MemoryReactorClock()
        cases = {
            "tcp:8080:interface=127.0.0.1": ("127.0.0.1", 8080),
            "tcp:0": ("", 0),
            "tcp6:9000:interface=\\:\\:1": ("::1", 9000),
            "unix:/run/x.sock": None,
        }
        for description, address in cases.items():
            endpoint = serverFromString(reactor, description)  # type: ignore[no-untyped-call]
            self.assertEqual(tcp_server_address(endpoint), address, description)
