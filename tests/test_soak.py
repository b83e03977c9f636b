"""
Soak: 10,000 requests through the real proxy, alternating between two real
fake-upstream models, with concurrent streaming clients and clients that
leave early. Nothing may be lost or answered by the wrong model, and file
descriptors, memory and child processes must stay flat.

Alternating means swapping (only one model runs at a time), and a swap costs
a server start (some 0.3-1 s for the fake server on a busy 2-core machine),
so the models alternate in runs: C{RUN} requests to one, then C{RUN} to the
other. That still swaps 39 times in 10,000 requests.

Skip it in quick runs with C{LLAMASWAP_SKIP_SOAK=1}; it runs by default (and in CI).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.error import ConnectingCancelledError, DNSLookupError
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseDone
from twisted.web.iweb import IResponse

from llamaswap.http import make_http
from tests.fakeserver_helper import fake_model, make_config
from tests.live_proxy import RunningProxy
from tests.proctools import open_fds, our_children, rss_kib, sleep

SOAK_REQUESTS = 10_000
RUN = 250  # requests to one model before switching to the other
PLAIN_CLIENTS = 6  # concurrent clients asking for whole answers...
STREAM_CLIENTS = 2  # ... and for streams
LEAVE_RATE = 0.02  # share of requests whose client disconnects early
# "Flat" means: after the warm-up (both models started once), at most this
# much more at the end.
FD_SLACK = 8
RSS_SLACK_KIB = 24 * 1024
SKIP = (
    "LLAMASWAP_SKIP_SOAK=1: the 10,000-request soak test is skipped in quick runs"
    if os.environ.get("LLAMASWAP_SKIP_SOAK") == "1"
    else None
)


class Collect(Protocol):
    """Receives a response body; optionally leaves after the first bytes."""

    def __init__(self, leave: bool) -> None:
        self.leave = leave
        self.data = b""
        self.done: Deferred[bool] = Deferred()  # True: the whole body arrived

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if self.leave and self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]  # closes the connection

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        if not self.done.called:
            self.done.callback(reason.check(ResponseDone) is not None)


def cancelled(error: Exception) -> bool:
    """
    Whether a request failed because we cancelled it: while resolving the
    host (HostnameEndpoint turns that into a DNSLookupError), connecting,
    sending or waiting for the answer.
    """
    if isinstance(error, (CancelledError, ConnectingCancelledError, DNSLookupError)):
        return True
    reasons: list[Failure] = getattr(error, "reasons", None) or []  # ResponseNeverReceived...
    return bool(reasons) and all(r.check(CancelledError) for r in reasons)


@attrs.define
class Tally:
    """What the clients saw."""

    ok: Counter[str] = attrs.field(factory=Counter)  # model -> verified answers
    left: int = 0  # requests whose client left on purpose
    wrong: list[str] = attrs.field(factory=list)  # anything else, described


class SoakTests(TestCase):
    timeout = 600

    async def test_soak(self) -> None:
        """
        10,000 requests in runs of 250 alternating between models C{a} and
        C{b} (39 swaps), 6 clients asking for whole answers and 2 for streams
        at all times, 2 % of them leaving early (before the answer or
        mid-stream). Every other request is answered completely by the model
        it named; the proxy saw every request that reached it; open file
        descriptors and RSS are flat after the warm-up (within 8 fds and
        24 MiB); one server per run was started, and none survives.
        """
        proxy = RunningProxy(self, make_config({"a": fake_model("a"), "b": fake_model("b")}))
        http, pool = make_http(reactor)
        pool.maxPersistentPerHost = PLAIN_CLIENTS + STREAM_CLIENTS
        self.addCleanup(pool.closeCachedConnections)
        # Clients that leave use connections of their own: a connection closed
        # by stopProducing() in the body's last dataReceived would otherwise go
        # back to the pool and fail the next request on it (a client-side race).
        leaving_http, leaving_pool = make_http(reactor, persistent=False)
        self.addCleanup(leaving_pool.closeCachedConnections)
        url = f"http://127.0.0.1:{proxy.port}/v1/chat/completions".encode()
        seen: Counter[tuple[str, int]] = Counter()  # the proxy's "request" events
        proxy.service.events.subscribe(
            lambda kind, data: (
                seen.update([(data["model"], data["status"])]) if kind == "request" else None
            )
        )
        tally = Tally()
        rng = random.Random(20240611)

        async def one(model: str, stream: bool) -> None:
            tokens = rng.randint(3, 20) if stream else 2
            leave = rng.random() < LEAVE_RATE
            body: dict[str, Any] = {
                "model": model,
                "messages": [{"role": "user", "content": "soak"}],
                "stream": stream,
                "fake_tokens": tokens,
            }
            early = leave and (not stream or rng.random() < 0.5)
            if leave and not early:  # leaves mid-stream: a stream still going when it does
                body.update(fake_tokens=200, fake_token_delay=0.002)
            client = leaving_http if leave else http
            d = client.post(url, data=json.dumps(body).encode(), unbuffered=True)
            if early:  # before the answer (or, if it was quick, before reading it)
                reactor.callLater(rng.random() * 0.005, d.cancel)
            try:
                response: IResponse = await d
            except Exception as e:
                if early and cancelled(e):
                    tally.left += 1
                else:
                    tally.wrong.append(f"{model} (early={early}): request failed: {e!r}")
                return
            collect = Collect(leave)
            response.deliverBody(collect)
            complete = await collect.done
            if leave:
                tally.left += 1
                return
            served_by = response.headers.getRawHeaders(b"x-served-by", [b"?"])[0].decode()
            problem = None
            if response.code != 200 or served_by != model:
                problem = f"status {response.code} served by {served_by}"
            elif not complete:
                problem = "truncated"
            elif stream:
                data = collect.data
                if data.count(f"Hello from {model} (token ".encode()) != tokens:
                    problem = f"expected {tokens} tokens"
                elif not data.endswith(b"data: [DONE]\n\n"):
                    problem = "no [DONE]"
            elif json.loads(collect.data).get("served_by") != model:
                problem = "served_by"
            if problem is None:
                tally.ok[model] += 1
            else:
                tally.wrong.append(f"{model} stream={stream}: {problem}: {collect.data[:200]!r}")

        async def client(model: str, stream: bool, queue: list[int]) -> None:
            while queue:
                queue.pop()
                await one(model, stream)

        samples: list[tuple[int, int]] = []  # (open fds, RSS KiB) after each run
        started = time.monotonic()
        runs = SOAK_REQUESTS // RUN
        for run in range(runs):
            model = "ab"[run % 2]
            queue = list(range(RUN))
            clients = [
                Deferred.fromCoroutine(client(model, i < STREAM_CLIENTS, queue))
                for i in range(PLAIN_CLIENTS + STREAM_CLIENTS)
            ]
            await DeferredList(clients, fireOnOneErrback=True, consumeErrors=True)
            self.assertEqual(tally.wrong, [], f"run {run}")
            await sleep(0.05)  # let closed connections finish closing
            samples.append((open_fds(), rss_kib()))
        took = time.monotonic() - started

        answered = sum(tally.ok.values())
        self.assertEqual(answered + tally.left, SOAK_REQUESTS)  # none lost
        self.assertEqual(tally.ok["a"] + tally.ok["b"], answered)
        self.assertGreater(tally.left, 0)
        # The proxy saw every request it was sent (some early leavers never got
        # to send theirs), each for the model named, ending 200 or 499.
        self.assertLessEqual(set(seen), {("a", 200), ("b", 200), ("a", 499), ("b", 499)}, seen)
        for model in "ab":
            self.assertGreaterEqual(seen[(model, 200)], tally.ok[model])
        self.assertGreaterEqual(sum(seen.values()), answered)
        self.assertLessEqual(sum(seen.values()), SOAK_REQUESTS)
        # Flat: the last sample against the one after the warm-up (runs 0 and 1).
        fds = [f for f, _ in samples]
        rss = [r for _, r in samples]
        self.assertLessEqual(fds[-1] - fds[1], FD_SLACK, fds)
        self.assertLessEqual(rss[-1] - rss[1], RSS_SLACK_KIB, rss)
        # Swapping: one server per run, only the last one still running.
        self.assertEqual(len(proxy.pids), runs)
        self.assertEqual(len(our_children() - proxy.children_before), 1)
        self.assertEqual(proxy.service.supervisor.status("b").in_flight, 0)
        await proxy.stop_and_check(self)
        print(
            f"\nsoak: {SOAK_REQUESTS} requests in {took:.1f}s, {runs - 1} swaps, "
            f"{tally.left} left early; fds {fds[1]}->{fds[-1]}, "
            f"RSS {rss[1] // 1024}->{rss[-1] // 1024} MiB"
        )

    test_soak.skip = SKIP  # type: ignore[attr-defined]
