"""
What is recorded for answers that do not end well, end to end: the real
service on a real port, real fake-upstream children, many clients at once.

The status line (200) reaches the client before the answer does, so it cannot
say how the answer ended; the records must: a client that hangs up before the
end is a 499, a model server that dies mid-answer a 502, in the C{"request"}
events (the UI's request list) and in C{/metrics}, while every other client
gets its whole answer and is recorded as the 200 it is. The unit tests are
C{tests.test_relay.OutcomeTests}.
"""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from io import BytesIO
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers

from tests.exposition import parse_exposition
from tests.fakeserver_helper import fake_model, make_config
from tests.live_proxy import RunningProxy
from tests.proctools import wait_until

# A stream that cannot end during the test (10,000 tokens 50 ms apart: over 8
# minutes): a client leaving it, or a server killed during it, is always mid-stream.
ENDLESS = {"stream": True, "fake_tokens": 10_000, "fake_token_delay": 0.05}
SHORT_STREAM = {"stream": True, "fake_tokens": 30, "fake_token_delay": 0.01}
TOKEN = b"(token "


class Reader(Protocol):
    """
    Reads a response body. C{first_token} fires at the first token; with
    C{leave}, the client then hangs up (closes its connection). C{done} fires
    with whether the body ended cleanly.
    """

    def __init__(self, leave: bool = False) -> None:
        self.leave = leave
        self.data = b""
        self.first_token: Deferred[None] = Deferred()
        self.done: Deferred[bool] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if not self.first_token.called and TOKEN in self.data:
            self.first_token.callback(None)
            if self.leave and self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]  # hangs up

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.callback(reason.check(ResponseDone) is not None)


class Client:
    """Plain HTTP/1.1 clients of the proxy, one connection per request."""

    def __init__(self, case: TestCase, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}".encode()
        pool = HTTPConnectionPool(reactor, persistent=False)
        case.addCleanup(pool.closeCachedConnections)
        self.agent = Agent(reactor, pool=pool)

    async def chat(self, model: str, reader: Reader, **body: Any) -> tuple[int, bool, bytes]:
        """POST a chat request; read the answer with C{reader}: (status, clean end, body)."""
        payload = json.dumps({"model": model, "messages": [], **body}).encode()
        response = await self.agent.request(
            b"POST",
            self.base + b"/v1/chat/completions",
            Headers({b"Content-Type": [b"application/json"]}),
            FileBodyProducer(BytesIO(payload)),
        )
        response.deliverBody(reader)
        clean = await reader.done
        return response.code, clean, reader.data

    async def get(self, path: str) -> bytes:
        response = await self.agent.request(b"GET", self.base + path.encode())
        reader = Reader()
        response.deliverBody(reader)
        assert await reader.done and response.code == 200, (response.code, reader.data)
        return reader.data


class ConcurrentOutcomeTests(TestCase):
    timeout = 180

    async def test_mixed_clients_hang_ups_and_a_killed_server(self) -> None:
        """
        Three models side by side; at once, on alpha and beta: whole streams,
        whole plain answers and streams whose clients hang up after the first
        token; on gamma one endless stream whose server is SIGKILLed after the
        first token. Every other client gets its whole answer; the hang-ups
        are 499 and the killed stream 502 (logged at error level), in the
        events and in /metrics; the rest 200; no process survives the proxy.
        """
        config = make_config(
            {name: fake_model(name) for name in ("alpha", "beta", "gamma")},
            groups={"together": {"swap": False, "members": ["alpha", "beta", "gamma"]}},
        )
        proxy = RunningProxy(self, config)
        events: list[dict[str, Any]] = []
        self.addCleanup(
            proxy.service.events.subscribe(
                lambda kind, data: events.append(data) if kind == "request" else None
            )
        )
        errors: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") == LogLevel.error:
                errors.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        client = Client(self, proxy.port)

        streams = [(model, Reader()) for model in ("alpha", "beta") for _ in range(4)]
        plains = [(model, Reader()) for model in ("alpha", "beta") for _ in range(2)]
        leavers = [(model, Reader(leave=True)) for model in ("alpha", "beta") for _ in range(2)]
        victim = Reader()

        async def kill_gamma_mid_stream() -> None:
            await victim.first_token
            os.kill(proxy.pid("gamma"), signal.SIGKILL)

        answers = gatherResults(
            [
                *(Deferred.fromCoroutine(client.chat(m, r, **SHORT_STREAM)) for m, r in streams),
                *(Deferred.fromCoroutine(client.chat(m, r)) for m, r in plains),
                *(Deferred.fromCoroutine(client.chat(m, r, **ENDLESS)) for m, r in leavers),
                Deferred.fromCoroutine(client.chat("gamma", victim, **ENDLESS)),
            ],
            consumeErrors=True,
        )
        killed = Deferred.fromCoroutine(kill_gamma_mid_stream())
        results = await answers
        await killed
        n_streams, n_plains = len(streams), len(plains)
        stream_results = results[:n_streams]
        plain_results = results[n_streams : n_streams + n_plains]
        leaver_results = results[n_streams + n_plains : -1]
        victim_result = results[-1]

        # What the clients saw: whole answers, except where they or the server left.
        for (model, _), (status, clean, body) in zip(streams, stream_results, strict=True):
            self.assertEqual((status, clean), (200, True), body)
            self.assertTrue(body.endswith(b"data: [DONE]\n\n"), body[-200:])
            self.assertEqual(body.count(TOKEN), 30)
            self.assertIn(f"Hello from {model}".encode(), body)
        for (model, _), (status, clean, body) in zip(plains, plain_results, strict=True):
            self.assertEqual((status, clean), (200, True), body)
            self.assertEqual(json.loads(body)["served_by"], model)
        for status, clean, body in leaver_results:
            self.assertEqual((status, clean), (200, False))
            self.assertIn(TOKEN, body)
        status, clean, body = victim_result
        self.assertEqual((status, clean), (200, False))  # a 200 line, then no clean end
        self.assertIn(TOKEN, body)
        self.assertNotIn(b"[DONE]", body)

        # What was recorded: one "request" event per client (published when
        # the proxy sees each connection end, so wait for all of them).
        total = len(results)
        await wait_until(lambda: len(events) >= total, 60, f"{total} request events")
        expected = Counter(
            {("alpha", 200): 6, ("beta", 200): 6, ("alpha", 499): 2, ("beta", 499): 2}
        )
        expected[("gamma", 502)] = 1
        self.assertEqual(Counter((e["model"], e["status"]) for e in events), expected)
        for event in events:
            self.assertGreater(event["bytes"], 0, event)  # the bytes actually sent
        samples = parse_exposition((await client.get("/metrics")).decode())
        counted = {
            key: value for key, value in samples.items() if key.startswith("llamaswap_requests")
        }
        self.assertEqual(
            counted,
            {
                f'llamaswap_requests_total{{model="{model}",status="{status}"}}': float(n)
                for (model, status), n in expected.items()
            },
        )
        relay_errors = [e for e in errors if e.get("log_namespace") == "llamaswap.relay.Relay"]
        self.assertEqual([e["model"] for e in relay_errors], ["gamma"], relay_errors)

        # Nothing else was disturbed: alpha and beta still serve.
        for model in ("alpha", "beta"):
            status, clean, body = await client.chat(model, Reader(), **SHORT_STREAM)
            self.assertEqual((status, clean, body.count(TOKEN)), (200, True, 30))
        await proxy.stop_and_check(self)
