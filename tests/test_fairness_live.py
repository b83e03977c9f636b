"""
The scheduler's guarantees with real processes: the whole service on a real port, fake model
servers that take 0.3 s to start, ordinary streaming clients (docs/swapping.md, "Fairness").

Bounds are short here (maxWait 2 s, minResidency 0.5 s) so that the tests take seconds; the
assertions are on what users see (every answer complete and from the model asked for, waits
within the bound, how many times models were started), never on throughput.
"""

from __future__ import annotations

import random
import sys
import time

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from llamaswap.config import parse_config
from tests.chat_clients import ChatAnswer, ChatClients, gather
from tests.fakeserver_helper import port_block
from tests.live_proxy import RunningProxy
from tests.proctools import sleep

PY = sys.executable
MAX_WAIT = 2.0
LOAD = 0.3
STREAM = 1.0  # each answer: 10 tokens, 0.1 s apart
# What a waiting request may add to the bound on a busy machine: the spawn of a Python
# fake server (about 0.2 s), health polling, scheduling noise.
SLACK = 2.5


def config_text(*names: str, queue: str) -> str:
    # A block of free ports for ${PORT}: other tests and benchmarks may run beside us.
    lines = [f"queue: {queue}", f"startPort: {port_block(len(names))}", "healthCheckTimeout: 30"]
    lines.append("models:")
    for name in names:
        lines += [
            f"  {name}:",
            f"    cmd: {PY} -m llamaswap.fakeserver --quiet --name {name} --port ${{PORT}}"
            f" --startup-delay {LOAD} --tokens 10 --token-delay {STREAM / 10}",
            "    unloadTimeout: 5",
        ]
    return "\n".join(lines) + "\n"


FAIR = f"{{maxWait: {MAX_WAIT}, minResidency: 0.5}}"


class Timed:
    """One request's answer and how long the client waited for all of it."""

    def __init__(self, model: str, answer: ChatAnswer, seconds: float) -> None:
        self.model = model
        self.answer = answer
        self.seconds = seconds


class FairnessTests(TestCase):
    timeout = 120

    def start(self, *names: str, queue: str = FAIR) -> ChatClients:
        self.proxy = RunningProxy(self, parse_config(config_text(*names, queue=queue)))
        return ChatClients(self, f"http://127.0.0.1:{self.proxy.port}")

    async def timed(self, clients: ChatClients, model: str) -> Timed:
        began = time.monotonic()
        answer = await clients.chat(model, stream=True)
        return Timed(model, answer, answer.ended - began)

    def check_answers(self, done: list[Timed]) -> None:
        """Every answer is a complete stream from the model asked for."""
        wrong = [
            (t.model, t.answer)
            for t in done
            if t.answer.code != 200 or not t.answer.complete or t.answer.served_by != t.model
        ]
        self.assertEqual(wrong, [])

    def starts(self) -> dict[str, int]:
        swaps = self.proxy.service.supervisor.stats.swaps
        return {m: n for (m, reason), n in swaps.items() if reason == "request"}

    async def test_a_busy_model_does_not_starve_another(self) -> None:
        """
        8 clients keep a busy with overlapping streams; b is asked for every 2 s. Each b
        request is answered within maxWait + a stream in flight + its load + its own
        stream (+ slack); a reloads at most once per b swap.
        """
        clients = self.start("a", "b")
        done: list[Timed] = []
        stop = False

        async def hot(delay: float) -> None:
            await sleep(delay)
            while not stop:
                done.append(await self.timed(clients, "a"))

        async def rare() -> None:
            await sleep(3)  # a is loaded and busy
            for _ in range(4):
                done.append(await self.timed(clients, "b"))
                await sleep(2)

        hot_clients = [Deferred.fromCoroutine(hot(i * STREAM / 8)) for i in range(8)]
        await rare()
        stop = True
        await gather(hot_clients)
        self.check_answers(done)
        b_waits = [t.seconds for t in done if t.model == "b"]
        self.assertEqual(len(b_waits), 4)
        bound = MAX_WAIT + STREAM + LOAD + STREAM + SLACK
        self.assertLessEqual(max(b_waits), bound, f"b waited {b_waits}")
        a_served = sum(1 for t in done if t.model == "a")
        self.assertGreater(a_served, 40)  # a kept serving: 8 clients, about 20 s
        self.assertLessEqual(self.starts().get("a", 0), 1 + len(b_waits))
        await self.proxy.stop_and_check(self)

    async def test_weighted_load_swaps_little_and_waits_are_bounded(self) -> None:
        """
        16 clients, each request picks a, b or c with weights 70/20/10, for 12 s: every
        answer is complete and right, every wait within the bound, and a model start
        serves four requests or more.
        """
        clients = self.start("a", "b", "c")
        done: list[Timed] = []
        deadline = time.monotonic() + 12

        async def client(seed: int) -> None:
            pick = random.Random(seed)
            while time.monotonic() < deadline:
                model = pick.choices("abc", weights=(70, 20, 10))[0]
                done.append(await self.timed(clients, model))

        await gather(client(seed) for seed in range(16))
        self.check_answers(done)
        # A request may wait for every other model's due swap and its own load.
        bound = MAX_WAIT + STREAM + 3 * (LOAD + STREAM) + SLACK
        waits = sorted(t.seconds for t in done)
        self.assertLessEqual(waits[-1], bound, f"longest waits {waits[-5:]}")
        starts = sum(self.starts().values())
        self.assertLessEqual(starts * 4, len(done), f"{starts} starts for {len(done)} requests")
        await self.proxy.stop_and_check(self)
