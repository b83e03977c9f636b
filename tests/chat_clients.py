# -*- test-case-name: tests.test_upstream_connections,tests.test_e2e_llama_server -*-
"""
Ordinary chat clients of a running proxy, for the concurrency tests: kept-alive
connections as curl, httpx and the SDKs use them, and no retries (raw treq), so
that no failure is hidden; each answer is checked the way a user would.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Iterable
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool


class ChatAnswer:
    """
    What one client saw of one chat request: the status, who answered (the
    answer's C{model} and, from the fake server, C{served_by}), whether the
    answer is complete (one finish reason; a stream then ends with C{[DONE]}),
    and when its last byte came (C{time.monotonic()}).
    """

    def __init__(self, code: int, body: bytes, stream: bool, ended: float) -> None:
        self.code = code
        self.body = body
        self.stream = stream
        self.ended = ended
        self.model: str | None = None
        self.served_by: str | None = None
        self.complete = False
        if code != 200:
            return
        text = body.decode("utf-8", "replace")
        if stream:
            events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
            chunks = [json.loads(e) for e in events if e != "[DONE]"]
            finished = [c for c in chunks if c.get("choices") and c["choices"][0]["finish_reason"]]
            self.complete = events[-1:] == ["[DONE]"] and len(finished) == 1
            last = chunks[-1] if chunks else {}
        else:
            last = json.loads(text)
            self.complete = last["choices"][0]["finish_reason"] is not None
        self.model = last.get("model")
        self.served_by = last.get("served_by")

    def __repr__(self) -> str:
        return f"<{self.code} stream={self.stream} model={self.model} {self.body[-200:]!r}>"


class ChatClients:
    """Clients of the proxy at C{base}, sharing a pool of kept-alive connections."""

    def __init__(
        self, case: TestCase, base: str, *, headers: dict[str, str] | None = None, **defaults: Any
    ) -> None:
        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        pool.maxPersistentPerHost = 64
        pool.retryAutomatically = False
        case.addCleanup(pool.closeCachedConnections)
        self._http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]
        self._url = f"{base}/v1/chat/completions"
        self._defaults = defaults  # body fields for every request
        self._headers = headers or {}  # and headers (an API key)

    async def chat(self, model: str, stream: bool) -> ChatAnswer:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        body.update(self._defaults)
        if stream:
            body["stream"] = True
        try:
            response = await self._http.post(self._url, json=body, headers=self._headers)
            content = await response.content()
        except Exception as e:  # a failed request is an answer the test counts
            return ChatAnswer(-1, repr(e).encode(), stream, time.monotonic())
        return ChatAnswer(response.code, content, stream, time.monotonic())

    async def get_json(self, url: str) -> Any:
        """GET any URL (a model server's own routes too) on the same pool; its JSON."""
        response = await self._http.get(url)
        return json.loads(await response.content())


async def gather(calls: Iterable[Awaitable[Any]]) -> list[Any]:
    """Run coroutines concurrently; their results in order."""

    async def run(call: Awaitable[Any]) -> Any:
        return await call

    results: list[Any] = await gatherResults(
        [Deferred.fromCoroutine(run(c)) for c in calls], consumeErrors=True
    )
    return results
