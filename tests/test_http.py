# -*- test-case-name: tests.test_http -*-
"""
The upstream HTTP client (llamaswap.http): connection reuse and its one replay.

A raw in-process server stands in for a model server whose sockets die under a
kept-alive connection (what llama-server does after every streamed answer), so
each test decides exactly which bytes a connection gets before it closes.
"""

from __future__ import annotations

import socket
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web._newclient import ResponseFailed
from twisted.web.resource import Resource

from llamaswap.http import make_http
from llamaswap.web.site import LlamaSwapSite

_OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"


class _Scripted(Protocol):
    """
    Reads requests (head + Content-Length body) and acts per the factory's
    C{script}: for the Nth request on this connection, C{"answer"} echoes
    the body back, C{"close"} closes without a byte, C{"half"} sends part of
    a status line and closes.
    """

    factory: _ScriptedFactory

    def connectionMade(self) -> None:
        self._buffer = b""
        self._served = 0
        self.factory.connections += 1

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            head, rest = self._buffer.split(b"\r\n\r\n", 1)
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(rest) < length:
                return
            body, self._buffer = rest[:length], rest[length:]
            self.factory.bodies.append(body)
            self.factory.heads.append(head)
            action = self.factory.script[min(self._served, len(self.factory.script) - 1)]
            self._served += 1
            assert self.transport is not None
            if action == "answer" and body.startswith(b"slow"):
                answer = _OK % (len(body), body)
                reactor.callLater(0.3, self.transport.write, answer)  # type: ignore[attr-defined]
            elif action == "answer":
                self.transport.write(_OK % (len(body), body))
            elif action == "half":
                self.transport.write(b"HTTP/1.1 2")
                self.transport.loseConnection()
                return
            else:
                self.transport.loseConnection()
                return

    def connectionLost(self, reason: Any = None) -> None:
        self.factory.closed += 1


class _ScriptedFactory(Factory):
    protocol = _Scripted
    noisy = False

    def __init__(self, script: list[str]) -> None:
        self.script = script
        self.connections = 0
        self.closed = 0
        self.bodies: list[bytes] = []
        self.heads: list[bytes] = []


class _ServerCase(TestCase):
    """A scripted server and the proxy's upstream client."""

    def serve(self, script: list[str]) -> tuple[_ScriptedFactory, str]:
        factory = _ScriptedFactory(script)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return factory, f"http://127.0.0.1:{port.getHost().port}/v1/chat/completions"

    def client(self, *, persistent: bool = True) -> Any:
        http, pool = make_http(reactor, persistent=persistent)
        self.addCleanup(pool.closeCachedConnections)
        return http

    @inlineCallbacks
    def post(self, http: Any, url: str, body: bytes) -> Any:
        response = yield http.request("POST", url.encode("ascii"), data=body, unbuffered=True)
        content = yield treq.content(response)
        return response.code, content


class ReuseTests(_ServerCase):
    """A request on a reused connection is replayed once when it dies unanswered."""

    @inlineCallbacks
    def test_post_replayed_on_a_fresh_connection(self) -> Any:
        """
        The server answers the first request of each connection and closes the
        kept-alive socket when the second arrives: that POST is sent again, with
        its body, on a new connection, and the caller sees only the answer.
        """
        factory, url = self.serve(["answer", "close"])
        http = self.client()
        for i in range(5):
            code, content = yield self.post(http, url, b'{"n": %d}' % i)
            self.assertEqual((code, content), (200, b'{"n": %d}' % i))
        # Requests 2..5 each went to a dead reused socket first, then to a new one.
        self.assertEqual(
            factory.bodies, [b'{"n": 0}'] + [b'{"n": %d}' % i for i in range(1, 5) for _ in (0, 1)]
        )
        self.assertEqual(factory.connections, 5)

    @inlineCallbacks
    def test_fresh_connection_is_not_retried(self) -> Any:
        """A new connection that dies unanswered is the server's real answer: one try, an error."""
        factory, url = self.serve(["close"])
        http = self.client()
        yield self.assertFailure(self.post(http, url, b"{}"), ResponseFailed)
        self.assertEqual(factory.bodies, [b"{}"])

    @inlineCallbacks
    def test_partial_answer_is_not_retried(self) -> Any:
        """Once a byte of the answer came, a replay could double it: no retry on a reused socket."""
        factory, url = self.serve(["answer", "half"])
        http = self.client()
        code, _ = yield self.post(http, url, b"{}")
        self.assertEqual(code, 200)
        failure = yield self.assertFailure(self.post(http, url, b'{"n": 1}'), ResponseFailed)
        self.assertNotIn("ResponseNeverReceived", type(failure).__name__)
        self.assertEqual(factory.bodies, [b"{}", b'{"n": 1}'])
        self.assertEqual(factory.connections, 1)

    @inlineCallbacks
    def test_no_reuse_sends_connection_close(self) -> Any:
        """Without keep-alive each request has its own connection, with Connection: close."""
        factory, url = self.serve(["answer", "close"])
        http = self.client(persistent=False)
        for i in range(3):
            code, _ = yield self.post(http, url, b"%d" % i)
            self.assertEqual(code, 200)
        self.assertEqual(factory.connections, 3)
        self.assertEqual(factory.bodies, [b"0", b"1", b"2"])
        for head in factory.heads:
            self.assertIn(b"connection: close", head.lower())

    @inlineCallbacks
    def test_concurrent_posts_on_dying_sockets(self) -> Any:
        """
        Eight callers at once, four rounds, on a server that never answers twice on a
        socket: every POST is answered with its own body, none fails.
        """
        factory, url = self.serve(["answer", "close"])
        http = self.client()
        for round_ in range(4):
            calls: list[Deferred[Any]] = [
                self.post(http, url, b"%d-%d" % (round_, i)) for i in range(8)
            ]
            results = yield gatherResults(calls)
            self.assertEqual(
                sorted(results), sorted((200, b"%d-%d" % (round_, i)) for i in range(8))
            )
        self.assertGreater(factory.connections, 8)


class OverlapTests(_ServerCase):
    """Keep-alive only while requests to a server do not overlap."""

    @inlineCallbacks
    def test_sequential_requests_share_a_connection(self) -> Any:
        factory, url = self.serve(["answer"])
        http = self.client()
        for i in range(3):
            code, _ = yield self.post(http, url, b"%d" % i)
            self.assertEqual(code, 200)
        self.assertEqual(factory.connections, 1)
        self.assertEqual(factory.closed, 0)

    @inlineCallbacks
    def test_connection_closed_while_another_request_waits(self) -> Any:
        """
        A quick answer that ends while a slow request still waits for its own:
        its connection is closed at once (on llama-server it may hold the thread
        the slow one needs). Once nothing waits, the next connection is kept.
        """
        factory, url = self.serve(["answer"])
        http = self.client()
        slow = self.post(http, url, b"slow")
        code, _ = yield self.post(http, url, b"quick")
        self.assertEqual(code, 200)
        self.assertFalse(slow.called)
        yield _until(lambda: factory.closed == 1)  # closed by us, before the slow answer
        self.assertFalse(slow.called)
        self.assertEqual((yield slow), (200, b"slow"))
        code, _ = yield self.post(http, url, b"after")
        self.assertEqual(code, 200)
        self.assertEqual((factory.connections, factory.closed), (2, 1))


@inlineCallbacks
def _until(check: Any, timeout: float = 5.0) -> Any:
    from twisted.internet.task import deferLater

    for _ in range(int(timeout / 0.01)):
        if check():
            return
        yield deferLater(reactor, 0.01)  # type: ignore[arg-type]
    raise AssertionError("condition not met in time")


class ClientSocketTests(TestCase):
    """The proxy's own listening side."""

    @inlineCallbacks
    def test_client_connections_have_no_delay(self) -> Any:
        """
        Connections from clients have TCP_NODELAY (as llama-server's do): a
        streamed token event is not held back waiting for the ACK of the last.
        """
        site = LlamaSwapSite(Resource(), max_body_size=1024, reactor=reactor)
        accepted: Deferred[Any] = Deferred()
        build = site.buildProtocol

        def recording(addr: Any) -> Any:
            protocol = build(addr)
            reactor.callLater(0, accepted.callback, protocol)  # type: ignore[attr-defined]
            return protocol

        site.buildProtocol = recording  # type: ignore[method-assign]
        port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        protocol = yield accepted
        self.assertTrue(protocol._channel.transport.getTcpNoDelay())  # the wrapped channel
