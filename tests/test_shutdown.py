"""
A graceful stop (docs/deployment.md, "Stopping"), on the whole service with
real fake-server children: answers in flight finish, new connections are
refused, new requests on open connections get 503, queued requests fail with
503, and at C{shutdownTimeout} (or on L{hurry}) what still runs is cut, an
event stream with an error event.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers

from llamaswap.config import parse_config
from tests.fakeserver_helper import port_block
from tests.live_proxy import RunningProxy
from tests.proctools import sleep

PY = sys.executable


def config_text(shutdown: float) -> str:
    return (
        f"shutdownTimeout: {shutdown}\n"
        f"startPort: {port_block(2)}\n"
        "healthCheckTimeout: 30\n"
        "groups: {both: {swap: false, members: [a, b]}}\n"
        "models:\n"
        + "".join(
            f"  {name}:\n"
            f"    cmd: {PY} -m llamaswap.fakeserver --quiet --name {name} --port ${{PORT}}\n"
            "    unloadTimeout: 5\n"
            for name in ("a", "b")
        )
    )


class Stream(Protocol):
    """An answer's body as it arrives; C{first} fires at the first bytes, C{done} at the end."""

    def __init__(self) -> None:
        self.data = b""
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure) -> None:
        self.done.callback(self.data)


class ShutdownTests(TestCase):
    timeout = 60

    def start(self, shutdown: float = 30) -> None:
        self.proxy = RunningProxy(self, parse_config(config_text(shutdown)))
        self.base = f"http://127.0.0.1:{self.proxy.port}"
        self.pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.pool.retryAutomatically = False
        self.addCleanup(self.pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=self.pool)  # type: ignore[no-untyped-call]

    async def stream(self, model: str, tokens: int, delay: float) -> Stream:
        """A streamed chat answer, once its first bytes came."""
        body = {
            "model": model,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "fake_tokens": tokens,
            "fake_token_delay": delay,
        }
        response = await self.agent.request(
            b"POST",
            f"{self.base}/v1/chat/completions".encode(),
            Headers({b"content-type": [b"application/json"]}),
            FileBodyProducer(BytesIO(json.dumps(body).encode())),
        )
        self.assertEqual(response.code, 200)
        stream = Stream()
        response.deliverBody(stream)
        await stream.first
        return stream

    async def test_answers_in_flight_finish_new_ones_are_refused(self) -> None:
        self.start()
        stream = await self.stream("a", tokens=20, delay=0.1)  # 2 s
        began = time.monotonic()
        stopped = self.proxy.stop()
        await sleep(0.3)
        # The port is closed: a new connection is refused.
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", self.proxy.port), timeout=2).close()
        # A request on a connection that was already open gets 503 (the connection
        # made for the stream is busy; the site answers any new request the same).
        self.assertEqual(self.proxy.service.site.draining, True)
        text = (await stream.done).decode()
        self.assertTrue(text.rstrip().endswith("data: [DONE]"), text[-300:])
        self.assertEqual(text.count("Hello from a"), 20)
        await stopped
        self.assertGreater(time.monotonic() - began, 1.0)  # it waited for the stream
        await self.proxy.stop_and_check(self)

    async def test_deadline_cuts_with_an_error_event(self) -> None:
        self.start(shutdown=0.5)
        stream = await self.stream("a", tokens=100, delay=0.1)  # 10 s
        began = time.monotonic()
        await self.proxy.stop()
        text = (await stream.done).decode()
        self.assertLess(time.monotonic() - began, 8)
        self.assertNotIn("[DONE]", text)
        last = [line for line in text.splitlines() if line.startswith("data: ")][-1]
        error = json.loads(last[6:])["error"]
        self.assertEqual((error["code"], error["type"]), ("service_unavailable", "server_error"))
        self.assertIn("shutting down", error["message"])
        await self.proxy.stop_and_check(self)

    async def test_hurry_cuts_at_once(self) -> None:
        self.start(shutdown=30)
        stream = await self.stream("a", tokens=100, delay=0.1)
        began = time.monotonic()
        stopped = self.proxy.stop()
        await sleep(0.2)
        self.proxy.service.hurry()
        await stopped
        self.assertLess(time.monotonic() - began, 5)
        self.assertIn("shutting down", (await stream.done).decode())

    async def test_new_request_on_open_connection_gets_503(self) -> None:
        self.start()
        stream = await self.stream("a", tokens=20, delay=0.1)
        # A kept-alive connection, in use before the stop.
        sock = socket.create_connection(("127.0.0.1", self.proxy.port))
        sock.setblocking(False)
        self.addCleanup(sock.close)
        first = await self.exchange(sock, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(first.startswith(b"HTTP/1.1 200"), first)
        stopped = self.proxy.stop()
        await sleep(0.2)
        reply = await self.exchange(sock, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(reply.startswith(b"HTTP/1.1 503"), reply)
        self.assertIn(b"Connection: close", reply)
        self.assertIn(b"shutting down", reply)
        await stream.done
        await stopped

    async def exchange(self, sock: socket.socket, request: bytes) -> bytes:
        """Send one request on a raw socket; its whole answer (by Content-Length)."""
        sock.sendall(request)
        reply = b""
        for _ in range(200):
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                await sleep(0.02)
                continue
            reply += chunk
            head, _, body = reply.partition(b"\r\n\r\n")
            length = [
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ]
            if not chunk or (length and len(body) >= length[0]):
                break
        return reply
