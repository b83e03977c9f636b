"""
Memory admission with real processes (docs/swapping.md, "Memory"): the whole
service on a real port, fake model servers that allocate on a fake GPU (a
folder the fake C{nvidia-smi} reads, L{llamaswap.testing.fake_gpu}) and fail
with CUDA's out-of-memory error when it is full, as llama-server does. Their
memory lingers a moment after they exit, as a real driver's does.

What users see is asserted: every answer complete and from the model asked
for (so no start ever ran out of memory), models that fit running together,
and measured figures surviving a restart of the proxy.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from llamaswap.config import parse_config
from llamaswap.http import make_http
from llamaswap.testing.fake_gpu import ENV_VAR, device_usage, write_devices
from tests.chat_clients import ChatAnswer, ChatClients, gather
from tests.fakeserver_helper import port_block
from tests.live_proxy import RunningProxy
from tests.proctools import sleep

PY = sys.executable
LINGER = 1.0  # seconds a stopped fake server's memory stays used
GIB = 2**30


def config_text(
    gpu: str, state: str, sizes: dict[str, tuple[int, bool]], gate: float, placed: bool = False
) -> str:
    """
    Models by name: (GiB they allocate, whether the config declares it);
    C{placed}: each is started on the device memory admission picks.
    """
    smi = f"env {ENV_VAR}={gpu} {PY} -m llamaswap.testing.nvidia_smi"
    lines = [
        f"memory: {{reserve: 0, releaseTimeout: {gate}, stateFile: {state}, nvidiaSmi: '{smi}'}}",
        "queue: {minResidency: 0.5, maxWait: 3}",
        f"startPort: {port_block(len(sizes))}",
        "healthCheckTimeout: 30",
        "models:",
    ]
    for name, (gib, declared) in sizes.items():
        lines += [
            f"  {name}:",
            f"    cmd: {PY} -m llamaswap.fakeserver --quiet --name {name} --port ${{PORT}}"
            f" --startup-delay 0.2 --tokens 8 --token-delay 0.05"
            f" --gpu-memory {gib}GiB --gpu-release-delay {LINGER}",
            f"    env: ['{ENV_VAR}={gpu}'"
            + (", 'CUDA_VISIBLE_DEVICES=${GPU}']" if placed else "]"),
            "    unloadTimeout: 5",
        ]
        if declared:
            lines.append(f"    memory: {gib}GiB")
    return "\n".join(lines) + "\n"


class MemoryLiveTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.gpu = os.path.abspath(self.mktemp())
        write_devices(self.gpu, {"0": 64 * 1024})
        self.state = os.path.abspath(self.mktemp())

    def start(
        self, sizes: dict[str, tuple[int, bool]], gate: float = 20, placed: bool = False
    ) -> ChatClients:
        text = config_text(self.gpu, self.state, sizes, gate, placed)
        self.proxy = RunningProxy(self, parse_config(text))
        self.most_ready = 0
        self.proxy.service.events.subscribe(self._count_ready)
        return ChatClients(self, f"http://127.0.0.1:{self.proxy.port}")

    def _count_ready(self, kind: str, data: dict[str, object]) -> None:
        if kind == "modelStatus":
            ready = [s for s in self.proxy.service.supervisor.statuses() if s.state == "ready"]
            self.most_ready = max(self.most_ready, len(ready))

    def check_answers(self, done: list[tuple[str, ChatAnswer]]) -> None:
        wrong = [
            (model, answer)
            for model, answer in done
            if answer.code != 200 or not answer.complete or answer.served_by != model
        ]
        self.assertEqual(wrong, [])

    async def test_mixed_load_never_runs_out_of_memory(self) -> None:
        """
        Five models on a 64 GiB GPU: three of 20 GiB (declared), one of 20 GiB
        measured at its first load, one of 40 GiB. First in turn: a, b and c
        run together, then big stops two of them and its start meets their
        memory, which lingers for a second. Then 12 clients for 8 s, streaming
        and not, over all five: nothing fails.
        """
        sizes = {"a": (20, True), "b": (20, True), "c": (20, True), "d": (20, False)}
        sizes["big"] = (40, True)
        clients = self.start(sizes)
        for model in ("a", "b", "c"):
            self.assertEqual((await clients.chat(model, stream=False)).code, 200)
        self.assertEqual(self.most_ready, 3)  # they share the GPU
        self.assertEqual((await clients.chat("big", stream=True)).code, 200)
        done: list[tuple[str, ChatAnswer]] = []
        deadline = time.monotonic() + 8

        async def client(seed: int) -> None:
            pick = random.Random(seed)
            while time.monotonic() < deadline:
                model = pick.choices(list(sizes), weights=(30, 25, 20, 15, 10))[0]
                done.append((model, await clients.chat(model, stream=pick.random() < 0.7)))

        await gather(client(seed) for seed in range(12))
        self.check_answers(done)
        self.assertGreaterEqual(len(done), 12)
        summary = self.proxy.service.supervisor.memory_summary()
        assert summary is not None
        self.assertGreater(summary["gateWaits"], 0)  # lingering memory was waited for
        self.assertEqual(summary["gateTimeouts"], 0)
        status = self.proxy.service.supervisor.status("d")
        self.assertEqual(status.memory["measured"], {"0": 20 * GIB})  # type: ignore[index]
        await self.proxy.stop_and_check(self)

    async def test_least_recently_used_idle_model_makes_room_never_a_busy_one(self) -> None:
        """
        a, b and c (20 GiB each) run together on 64 GiB; a is streaming and
        was used longest ago, b idle longer than c: a request for d stops b
        only, and a's stream goes on to its end.
        """
        sizes = {name: (20, True) for name in ("a", "b", "c", "d")}
        clients = self.start(sizes)
        for model in ("a", "b", "c"):
            self.assertEqual((await clients.chat(model, stream=False)).code, 200)
        pids = {model: self.proxy.pid(model) for model in ("a", "b", "c")}
        long = ChatClients(self, f"http://127.0.0.1:{self.proxy.port}", fake_tokens=60)
        streaming = Deferred.fromCoroutine(long.chat("a", stream=True))  # 60 x 0.05 s
        await sleep(0.5)
        self.assertEqual(self.proxy.service.supervisor.status("a").in_flight, 1)
        d = await clients.chat("d", stream=False)
        self.assertEqual((d.code, d.served_by), (200, "d"))
        self.assertEqual(
            self.proxy.states(), {"a": "ready", "b": "stopped", "c": "ready", "d": "ready"}
        )
        self.assertEqual(
            {m: self.proxy.pid(m) for m in ("a", "c")}, {"a": pids["a"], "c": pids["c"]}
        )
        a = await streaming
        self.assertEqual((a.code, a.complete, a.served_by), (200, True, "a"))
        await self.proxy.stop_and_check(self)

    async def test_placed_models_share_two_gpus(self) -> None:
        """${GPU}: two 16 GiB models on two 24 GiB GPUs run one on each, as nvidia-smi shows."""
        write_devices(self.gpu, {"0": 24 * 1024, "1": 24 * 1024})
        clients = self.start({"x": (16, True), "y": (16, True)}, placed=True)
        for model in ("x", "y"):
            self.assertEqual((await clients.chat(model, stream=False)).code, 200)
        self.assertEqual(self.proxy.states(), {"x": "ready", "y": "ready"})
        self.assertEqual(device_usage(self.gpu), {"0": 16 * 1024, "1": 16 * 1024})
        await self.proxy.stop_and_check(self)

    async def test_without_the_gate_a_start_meets_lingering_memory(self) -> None:
        """
        The failure the gate prevents: with C{releaseTimeout: 0}, a swap from
        one 40 GiB model to another starts the second while the first's memory
        is still held; it fails with CUDA's error, which the client reads.
        """
        clients = self.start({"x": (40, True), "y": (40, True)}, gate=0)
        first = await clients.chat("x", stream=False)
        self.assertEqual(first.code, 200)
        failed = await clients.chat("y", stream=False)
        self.assertEqual(failed.code, 502, failed)
        self.assertIn(b"CUDA error: out of memory", failed.body)
        await self.proxy.stop_and_check(self)

    async def test_measured_memory_is_remembered_across_restarts(self) -> None:
        """d's size is measured at its first load; the next proxy knows it before loading it."""
        sizes = {"a": (20, True), "d": (30, False)}
        clients = self.start(sizes)
        self.assertEqual((await clients.chat("d", stream=False)).code, 200)
        await self.wait_for_measure("d")
        await self.proxy.stop_and_check(self)
        await sleep(LINGER)  # the fake GPU frees d's memory

        clients = self.start(sizes)
        metrics = await self.metrics()
        self.assertIn(f'model="d",device="0",source="measured"}} {30 * GIB}', metrics)
        for model in ("d", "a"):  # known to fit together: no eviction
            self.assertEqual((await clients.chat(model, stream=False)).code, 200)
        self.assertEqual(self.proxy.states(), {"a": "ready", "d": "ready"})
        self.assertEqual(device_usage(self.gpu), {"0": 50 * 1024})
        await self.wait_for_measure("a")
        running = json.loads(await self.get("/running"))
        memory = {m["model"]: m["memory"] for m in running["running"]}
        self.assertEqual(
            memory,
            {
                "a": {
                    "declared": {"*": 20 * GIB},
                    "measured": {"0": 20 * GIB},
                    "holds": {"0": 20 * GIB},
                },
                "d": {"declared": None, "measured": {"0": 30 * GIB}, "holds": {"0": 30 * GIB}},
            },
        )
        device = {"device": "0", "total": 64 * GIB, "budget": 64 * GIB, "allocated": 50 * GIB}
        self.assertEqual(running["memory"]["devices"], [device])
        await self.proxy.stop_and_check(self)

    async def wait_for_measure(self, model: str) -> None:
        for _ in range(200):
            memory = self.proxy.service.supervisor.status(model).memory
            if memory is not None and memory["measured"] is not None:
                return
            await sleep(0.05)
        self.fail(f"{model} was never measured")

    async def get(self, path: str) -> bytes:
        http, pool = make_http(reactor)
        self.addCleanup(pool.closeCachedConnections)
        response = await http.get(f"http://127.0.0.1:{self.proxy.port}{path}")
        body: bytes = await response.content()
        return body

    async def metrics(self) -> str:
        """The memory lines of C{/metrics}."""
        text = (await self.get("/metrics")).decode()
        return "\n".join(line for line in text.splitlines() if "_memory_" in line)
