"""
Memory admission in the supervisor (docs/swapping.md, "Memory"), on fake
processes and a fake probe whose device usage follows the fake children:
models run together while they fit, the least recently used idle model makes
room, a busy one never does, a start waits for memory to come back, and
measured figures outlive the proxy.
"""

from __future__ import annotations

import json
import os
from typing import Any

from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError
from llamaswap.errors import ModelTooLarge
from llamaswap.supervisor import Lease
from tests.test_supervisor import SupervisorHarness, yaml_for

GIB = 2**30


class MemoryFixture(SynchronousTestCase):
    def harness(
        self,
        names: tuple[str, ...] = ("a", "b", "c", "d"),
        *,
        memory: str = "",
        groups: str = "",
        extra: dict[str, str] | None = None,
        totals: dict[str, int] | None = None,
        usage: dict[str, dict[str, int]] | None = None,
        **probe: Any,
    ) -> SupervisorHarness:
        """
        Models C{names} of 20 GiB each (declared and held) on one 64 GiB
        device with no reserve, unless told otherwise.
        """
        self.state_file = getattr(self, "state_file", None) or os.path.abspath(self.mktemp())
        extra = extra if extra is not None else {name: "memory: 20GiB" for name in names}
        top = (
            f"memory: {{reserve: 0, releaseTimeout: 10, stateFile: {self.state_file}{memory}}}\n"
            "queue: {minResidency: 0}\n" + (f"groups: {groups}" if groups else "")
        )
        h = SupervisorHarness(
            yaml_for(*names, top=top, extra=extra),
            memory={
                "totals": totals or {"0": 64 * GIB},
                "usage": usage or {name: {"0": 20 * GIB} for name in names},
                **probe,
            },
        )
        h.healthy()
        self.h = h
        return h

    def lease(self, name: str) -> Lease:
        d = self.h.sup.acquire_by_name(name)
        self.h.tick(3)
        return self.successResultOf(d)

    def running(self) -> list[str]:
        return [s.model_id for s in self.h.sup.statuses() if s.state == "ready"]

    def killed(self) -> list[str]:
        """Model names that were sent a signal, in order."""
        by_pid = {c.original_pid: c for c in self.h.reactor.children}
        args = [by_pid[pgid].args for pgid, _ in self.h.kill.sent]
        return [a[a.index("--name") + 1] for a in args]


class AdmissionTests(MemoryFixture):
    def test_models_that_fit_run_together(self) -> None:
        """Three 20 GiB models on a 64 GiB device: no swap, no signal."""
        self.harness()
        for name in ("a", "b", "c"):
            self.lease(name).release()
        self.assertEqual(self.running(), ["a", "b", "c"])
        self.assertEqual(self.h.kill.sent, [])
        devices = self.h.sup.memory.devices_view()  # type: ignore[union-attr]
        self.assertEqual(
            devices, [{"device": "0", "total": 64 * GIB, "budget": 64 * GIB, "allocated": 60 * GIB}]
        )

    def test_fourth_evicts_least_recently_used_idle(self) -> None:
        self.harness()
        leases = {name: self.lease(name) for name in ("a", "b", "c")}
        for name in ("b", "a", "c"):  # b has been idle longest
            self.h.reactor.advance(1)
            leases[name].release()
        d = self.h.sup.acquire_by_name("d")
        self.h.tick(3)
        self.assertEqual(self.successResultOf(d).model.id, "d")
        self.assertEqual(self.killed(), ["b"])
        self.assertEqual(self.running(), ["a", "c", "d"])
        self.assertEqual(self.h.sup.status("b").state, "stopped")

    def test_busy_model_is_never_evicted(self) -> None:
        """The LRU idle one goes, though a busy one is older; with all busy, the start waits."""
        self.harness()
        a = self.lease("a")  # busy, least recently used of all
        b, c = self.lease("b"), self.lease("c")
        b.release()
        self.h.reactor.advance(1)
        c.release()
        d = self.lease("d")
        self.assertEqual(self.killed(), ["b"])
        # Now a, c (busy again) and d are busy: a fourth must wait for one of them.
        c2 = self.lease("c")
        b2 = self.h.sup.acquire_by_name("b")
        self.h.reactor.advance(100)
        self.assertNoResult(b2)
        self.assertEqual(self.killed(), ["b"])
        c2.release()  # c is idle now (a and d still busy): it makes room
        self.h.tick(3)
        self.assertEqual(self.successResultOf(b2).model.id, "b")
        self.assertEqual(self.killed(), ["b", "c"])
        self.assertEqual(sorted(self.running()), ["a", "b", "d"])
        for lease in (a, d):
            lease.release()

    def test_due_request_holds_back_memory_victim(self) -> None:
        """Requests for a busy victim queue behind a due request (maxWait), then it drains."""
        self.harness(
            names=("a", "b"),
            extra={"a": "memory: 40GiB", "b": "memory: 40GiB"},
            usage={"a": {"0": 40 * GIB}, "b": {"0": 40 * GIB}},
        )
        held = self.lease("a")
        b = self.h.sup.acquire_by_name("b")
        for _ in range(59):  # a is kept busy; b is not due yet
            self.h.reactor.advance(1)
            fresh = self.h.sup.acquire_by_name("a")
            held.release()
            held = self.successResultOf(fresh)
        self.h.reactor.advance(1)  # b waited maxWait (60 s): due
        late = self.h.sup.acquire_by_name("a")
        self.assertNoResult(late)
        held.release()
        self.h.tick(3)
        self.assertEqual(self.successResultOf(b).model.id, "b")
        self.assertEqual(self.killed(), ["a"])

    def test_groups_still_apply(self) -> None:
        """The budget applies on top of groups: a swap group's members never run together."""
        self.harness(groups="{pair: {members: [a, b], exclusive: false}}")
        for name in ("a", "c", "d"):
            self.lease(name).release()
        self.assertEqual(self.h.kill.sent, [])  # 60 of 64 GiB
        self.lease("b").release()
        self.assertEqual(self.killed(), ["a"])  # its group, though c is older and memory is short
        self.assertEqual(self.running(), ["b", "c", "d"])


class GateTests(MemoryFixture):
    def test_start_waits_for_memory_to_come_back(self) -> None:
        """A stopped server's memory lingers 2 s: the next start spawns only after it is free."""
        self.harness(
            names=("a", "b"),
            extra={"a": "memory: 40GiB", "b": "memory: 40GiB"},
            usage={"a": {"0": 40 * GIB}, "b": {"0": 40 * GIB}},
            linger=2.0,
        )
        lines: list[str] = []
        observer = lambda event: lines.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.lease("a").release()
        b = self.h.sup.acquire_by_name("b")
        self.h.tick(3)  # a stopped at once (SIGTERM kills the fake)
        self.assertEqual(self.h.sup.status("a").state, "stopped")
        self.assertEqual(self.h.spawned(), ["a"])  # b waits at the gate
        self.assertEqual(self.h.sup.status("b").state, "starting")
        self.h.reactor.advance(1.5)
        self.assertEqual(self.h.spawned(), ["a"])
        self.h.reactor.advance(0.6)
        self.h.tick(3)
        self.assertEqual(self.h.spawned(), ["a", "b"])
        self.assertEqual(self.successResultOf(b).model.id, "b")
        self.assertTrue(any("b waits for memory to come back" in line for line in lines), lines)
        self.assertTrue(any("b starts after 2." in line for line in lines), lines)
        self.assertEqual(self.h.sup.memory.gate_waits, 1)  # type: ignore[union-attr]

    def test_start_goes_ahead_after_release_timeout(self) -> None:
        """Memory held by something else: the start waits releaseTimeout, then goes ahead."""
        self.harness(names=("a",), extra={"a": "memory: 40GiB"}, usage={"a": {"0": 40 * GIB}})
        assert self.h.probe is not None
        self.h.probe.foreign["0"] = 30 * GIB
        a = self.h.sup.acquire_by_name("a")
        self.h.reactor.advance(9.9)
        self.assertEqual(self.h.spawned(), [])
        self.h.reactor.advance(0.5)
        self.h.tick(3)
        self.assertEqual(self.h.spawned(), ["a"])
        self.successResultOf(a)
        self.assertEqual(self.h.sup.memory.gate_timeouts, 1)  # type: ignore[union-attr]

    def test_failed_readings_are_tried_again(self) -> None:
        """A reading that fails says nothing: the gate looks again instead of going ahead."""
        self.harness(names=("a",), extra={"a": "memory: 40GiB"}, usage={"a": {"0": 40 * GIB}})
        assert self.h.probe is not None
        self.h.probe.failures = 3
        a = self.h.sup.acquire_by_name("a")
        self.h.reactor.advance(0.3)
        self.assertEqual(self.h.spawned(), [])  # two readings failed: no start yet
        for _ in range(8):
            self.h.reactor.advance(0.25)
        self.assertEqual(self.h.spawned(), ["a"])
        self.assertEqual((self.h.probe.failures, self.h.probe.reads), (0, 5))  # + the measure
        self.successResultOf(a)

    def test_unload_during_gate_spawns_nothing(self) -> None:
        self.harness(names=("a",), extra={"a": "memory: 40GiB"}, usage={"a": {"0": 40 * GIB}})
        assert self.h.probe is not None
        self.h.probe.foreign["0"] = 30 * GIB
        a = self.h.sup.acquire_by_name("a")
        self.h.reactor.advance(1)
        self.h.sup.unload("a")
        self.h.reactor.advance(20)
        self.assertEqual(self.h.spawned(), [])
        self.failureResultOf(a)
        self.assertEqual(self.h.sup.status("a").state, "stopped")
        self.assertEqual(self.h.sup.memory.holding, {})  # type: ignore[union-attr]


class MeasuredTests(MemoryFixture):
    def test_unknown_model_loads_alone_then_its_measure_is_used(self) -> None:
        """No figure: the first load takes the whole device; once measured, others join it."""
        self.harness(
            names=("a", "b", "x"),
            extra={"a": "memory: 20GiB", "b": "memory: 20GiB"},
            usage={"a": {"0": 20 * GIB}, "b": {"0": 20 * GIB}, "x": {"0": 10 * GIB}},
        )
        self.lease("a").release()
        self.lease("b").release()
        self.lease("x").release()
        self.assertEqual(self.killed(), ["a", "b"])  # x's size was unknown
        view = self.h.sup.status("x").memory
        self.assertEqual(
            view, {"declared": None, "measured": {"0": 10 * GIB}, "holds": {"0": 10 * GIB}}
        )
        self.lease("a").release()
        self.lease("b").release()
        self.assertEqual(self.killed(), ["a", "b"])  # no more evictions: 50 of 64 GiB
        with open(self.state_file) as f:
            saved = json.load(f)
        self.assertEqual(saved["models"]["x"]["bytes"], {"0": 10 * GIB})

    def test_measured_figure_outlives_the_proxy(self) -> None:
        names = ("a", "x")
        usage = {"a": {"0": 20 * GIB}, "x": {"0": 10 * GIB}}
        self.harness(names=names, extra={"a": "memory: 20GiB"}, usage=usage)
        self.lease("x").release()
        self.successResultOf(self.h.sup.stopService())
        self.harness(names=names, extra={"a": "memory: 20GiB"}, usage=usage)  # a new proxy
        self.assertEqual(self.h.sup.status("x").memory["measured"], {"0": 10 * GIB})  # type: ignore[index]
        self.lease("a").release()
        self.lease("x").release()
        self.assertEqual(self.h.kill.sent, [])  # known to fit beside a: no eviction

    def test_changed_command_is_measured_again(self) -> None:
        usage = {"x": {"0": 10 * GIB}}
        self.harness(names=("x",), extra={}, usage=usage)
        self.lease("x").release()
        self.successResultOf(self.h.sup.stopService())
        self.harness(names=("x",), extra={"x": "env: [LLAMA_ARG_CTX_SIZE=32768]"}, usage=usage)
        self.assertIsNone(self.h.sup.status("x").memory["measured"])  # type: ignore[index]

    def test_device_delta_without_per_process_figures(self) -> None:
        self.harness(names=("x",), extra={}, usage={"x": {"0": 12 * GIB}}, per_process=False)
        self.h.probe.foreign["0"] = GIB  # type: ignore[union-attr]
        x = self.h.sup.acquire_by_name("x")
        self.h.reactor.advance(10)  # unknown: it waits for the whole device (releaseTimeout)
        self.h.tick(3)
        self.successResultOf(x).release()
        self.assertEqual(self.h.sup.status("x").memory["measured"], {"0": 12 * GIB})  # type: ignore[index]

    def test_larger_than_budget_is_refused_after_first_load(self) -> None:
        self.harness(names=("x",), extra={}, usage={"x": {"0": 70 * GIB}})
        self.lease("x").release()  # served: the first load is what tells its size
        failure = self.failureResultOf(self.h.sup.acquire_by_name("x"), ModelTooLarge)
        self.assertIn("more than its whole budget", str(failure.value))
        self.assertEqual(failure.value.status, 500)


class PlacementTests(MemoryFixture):
    def test_placed_models_go_where_there_is_room(self) -> None:
        """${GPU}: two 16 GiB models on two 24 GiB devices, one each; the env names the device."""
        extra = {name: "memory: 16GiB\nenv: ['CUDA_VISIBLE_DEVICES=${GPU}']" for name in ("x", "y")}
        self.harness(
            names=("x", "y"),
            extra=extra,
            totals={"0": 24 * GIB, "1": 24 * GIB},
            usage={"x": {"0": 16 * GIB}, "y": {"0": 16 * GIB}},
        )
        self.lease("x").release()
        self.lease("y").release()
        envs = [c.env for c in self.h.reactor.children]
        self.assertEqual([e["CUDA_VISIBLE_DEVICES"] for e in envs], ["0", "1"])
        self.assertEqual([e["CUDA_DEVICE_ORDER"] for e in envs], ["PCI_BUS_ID"] * 2)
        self.assertEqual(self.h.kill.sent, [])
        self.assertEqual(self.h.sup.status("y").memory["holds"], {"1": 16 * GIB})  # type: ignore[index]


class ConfigTests(SynchronousTestCase):
    def test_declared_larger_than_device_is_a_load_error(self) -> None:
        from llamaswap.config import parse_config

        with self.assertRaises(ConfigError) as e:
            parse_config(
                "memory: {source: none, devices: {0: 24GiB}, reserve: 1GiB}\n"
                "models: {a: {cmd: 'x --port ${PORT}', memory: 24GiB}}\n"
            )
        self.assertEqual(
            str(e.exception),
            "models.a.memory: 24.0 GiB is more than the whole budget (23.0 GiB: the device's "
            "memory less memory.reserve)",
        )
