"""
How the proxy uses its connections to model servers that act like llama-server
(the fake with C{--like-llama-server}: it closes after every streamed answer
without saying so, pins one of its 5 worker "threads" to each open connection,
and closes idle ones after 5 s). The real service on a real port, real fake
children, many clients at once; the same checks with the real llama-server are
in C{tests.test_e2e_llama_server.LlamaServerConcurrencyTests}.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakeserver_helper import fake_model, make_config
from tests.test_reliability import RunningProxy

LIKE_LLAMA = "--like-llama-server"


class _Clients:
    """Clients of the proxy on kept-alive connections, as curl, httpx or the SDKs; no retries."""

    def __init__(self, case: TestCase, port: int) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        pool.maxPersistentPerHost = 32
        pool.retryAutomatically = False
        case.addCleanup(pool.closeCachedConnections)
        self._http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]
        self._url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def chat(self, model: str, stream: bool) -> tuple[int, str | None, bool, float]:
        """(status, who answered, complete, time.monotonic() at the last byte)."""
        body: dict[str, Any] = {"model": model, "messages": [], "fake_tokens": 4}
        if stream:
            body["stream"] = True
        try:
            response = await self._http.post(self._url, json=body)
            content = (await response.content()).decode()
        except Exception as e:  # a failed request is an outcome the test counts
            return -1, repr(e), False, time.monotonic()
        ended = time.monotonic()
        if response.code != 200:
            return response.code, content[-300:], False, ended
        if stream:
            events = [line[6:] for line in content.split("\n") if line.startswith("data: ")]
            chunks = [json.loads(e) for e in events[:-1]]
            finished = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
            complete = events[-1:] == ["[DONE]"] and len(finished) == 1
            served = content.split("Hello from ", 1)[-1].split(" ", 1)[0]
        else:
            answer = json.loads(content)
            complete = answer["choices"][0]["finish_reason"] is not None
            served = answer["served_by"]
        return response.code, served, complete, ended


async def _gather(calls: Iterable[Any]) -> list[Any]:
    results: list[Any] = await gatherResults(
        [Deferred.fromCoroutine(c) for c in calls], consumeErrors=True
    )
    return results


class LlamaServerLikeUpstreamTests(TestCase):
    timeout = 120

    async def test_concurrent_streams_never_fail_on_reuse(self) -> None:
        """
        8 clients, 400 requests, mostly streamed, on two models side by side:
        one with the default (keep-alive, whose sockets the server closes after
        every stream), one with C{reuseConnections: false} (a connection per
        request). Every request is a complete 200 from its model: a request
        sent into a socket the server just closed is replayed.
        """
        config = make_config(
            {
                "reused": fake_model("reused", LIKE_LLAMA),
                "fresh": fake_model("fresh", LIKE_LLAMA, reuseConnections=False),
            },
            groups={"both": {"swap": False, "members": ["fresh", "reused"]}},
        )
        proxy = RunningProxy(self, config)
        clients = _Clients(self, proxy.port)
        results: list[tuple[str, tuple[int, str | None, bool, float]]] = []

        async def client(index: int) -> None:
            for n in range(index, 400, 8):
                model = ("fresh", "reused")[n % 2]
                results.append((model, await clients.chat(model, stream=n % 5 != 0)))

        await _gather(client(i) for i in range(8))
        bad = [(m, r) for m, r in results if r[:3] != (200, m, True)]
        self.assertEqual(len(results), 400)
        self.assertEqual(bad, [])

    async def test_swap_burst_is_answered_at_once(self) -> None:
        """
        Six times, 8 whole (non-streamed) requests wait for a swap to a server
        with 5 worker threads: all are answered within 0.5 s of the model
        becoming ready. Connections kept open after an answer would each pin a
        worker while 3 requests wait unread in the server's accept queue,
        until the proxy or the server dropped them (2 to 5 s); the pool closes
        a finished connection while another request still waits for its answer.
        """
        config = make_config(
            {
                name: fake_model(name, LIKE_LLAMA, "--startup-delay", "0.2")
                for name in ("one", "two")
            }
        )
        proxy = RunningProxy(self, config)
        clients = _Clients(self, proxy.port)
        ready: dict[str, float] = {}

        def observe(kind: str, data: dict[str, Any]) -> None:
            if kind == "modelStatus" and data["state"] == "ready":
                ready[data["model"]] = time.monotonic()

        self.addCleanup(proxy.service.events.subscribe(observe))
        lags = []
        for round_ in range(6):
            model = ("one", "two")[round_ % 2]
            ready.pop(model, None)
            results = await _gather(clients.chat(model, stream=False) for _ in range(8))
            self.assertEqual([r[:3] for r in results], [(200, model, True)] * 8)
            lags.append(max(r[3] for r in results) - ready[model])
        self.assertLess(max(lags), 0.5, [round(lag, 3) for lag in lags])
