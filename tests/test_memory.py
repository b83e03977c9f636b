"""
The pure pieces of memory admission: sizes, the C{memory} config, reading
nvidia-smi and /proc, the admission rule, the measured-figure store, and
C{${GPU}} in a command line.
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config
from llamaswap.config.sizes import format_size, parse_size
from llamaswap.memory.admission import BUSY, IDLE, STOPPING, Holder, need, options, plan
from llamaswap.memory.probe import MemInfo, group_pids, parse_apps, parse_gpus, parse_uuids
from llamaswap.memory.store import MeasuredStore
from llamaswap.process.spawn import model_env, server_command

GIB = 2**30
MIB = 2**20


class SizeTests(SynchronousTestCase):
    def test_units_are_binary_and_a_number_is_mib(self) -> None:
        cases = {
            "24GiB": 24 * GIB,
            "24G": 24 * GIB,
            "1.5 GiB": int(1.5 * GIB),
            "512MiB": 512 * MIB,
            "100M": 100 * MIB,
            "1T": 2**40,
            "2048": 2048 * MIB,
            "4096B": 4096,
        }
        for text, size in cases.items():
            self.assertEqual(parse_size("x", text), size, text)
        self.assertEqual(parse_size("x", 1024), GIB)

    def test_bad_sizes_say_what_is_wanted(self) -> None:
        for bad in ("lots", "-1G", True, [1]):
            with self.assertRaises(ConfigError) as e:
                parse_size("models.a.memory", bad)
            self.assertTrue(str(e.exception).startswith("models.a.memory: "), str(e.exception))

    def test_format(self) -> None:
        self.assertEqual((format_size(24 * GIB), format_size(512 * MIB)), ("24.0 GiB", "512 MiB"))


def config(memory: str, model: str = "", cmd: str = "x --port ${PORT}") -> str:
    return f"memory: {memory}\nmodels:\n  a:\n    cmd: {cmd}\n" + "".join(
        f"    {line}\n" for line in model.splitlines()
    )


class ConfigTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        c = parse_config("models: {a: {cmd: 'x --port ${PORT}'}}")
        self.assertIsNone(c.memory)

    def test_defaults_and_paths(self) -> None:
        c = parse_config(config("{}"), base_dir="/etc/llamaswap")
        assert c.memory is not None
        self.assertEqual(
            (c.memory.source, c.memory.reserve, c.memory.release_timeout), ("nvidia-smi", GIB, 30.0)
        )
        self.assertEqual(c.memory.state_file, "/etc/llamaswap/llamaswap-memory.json")

    def test_model_memory_forms(self) -> None:
        c = parse_config(
            config("{source: none, devices: {0: 24G, 1: 24G}}", "memory: {0: 10GiB, 1: 12GiB}")
        )
        self.assertEqual(dict(c.models["a"].memory or {}), {"0": 10 * GIB, "1": 12 * GIB})

    def test_errors(self) -> None:
        cases = [
            (config("{source: none}"), "memory.devices: required with source: none"),
            (
                config("{source: none, devices: {0: 8G}}", "memory: {2: 1G}"),
                "models.a.memory.2: no such device (devices: 0)",
            ),
            (
                config("{source: none, devices: {0: 8G}}", "memory: {0: 8G}"),
                "models.a.memory.0: 8.0 GiB is more than the device's whole budget (7.0 GiB: its "
                "memory less memory.reserve)",
            ),
            (
                "models: {a: {cmd: 'x --port ${PORT} --gpu ${GPU}'}}",
                "models.a: uses ${GPU}, which needs a memory: section",
            ),
            (
                "models: {a: {cmd: 'x --port ${PORT}', memory: 1G}}",
                "models.a.memory: needs a top-level memory: section to take effect",
            ),
            (
                config("{}", "memory: {0: 1G}", cmd="x --port ${PORT} --gpu ${GPU}"),
                "models.a.memory: a model placed with ${GPU} takes one size",
            ),
            (config("{source: gpu}"), "memory.source: must be one of"),
            ("macros: {GPU: 1}\n" + config("{}"), "macros.GPU: macro name 'GPU' is reserved"),
        ]
        for text, message in cases:
            with self.assertRaises(ConfigError, msg=text) as e:
                parse_config(text)
            self.assertTrue(str(e.exception).startswith(message), str(e.exception))

    def test_gpu_macro_waits_for_the_start(self) -> None:
        c = parse_config(
            config(
                "{}",
                "env: ['CUDA_VISIBLE_DEVICES=${GPU}']",
                cmd="true --port ${PORT} --device CUDA${GPU}",
            )
        )
        model = c.models["a"]
        self.assertTrue(model.placed)
        self.assertIn("CUDA${GPU}", model.cmd)
        env = model_env(model, {"PATH": os.defpath}, "1")
        self.assertEqual(
            (env["CUDA_VISIBLE_DEVICES"], env["CUDA_DEVICE_ORDER"]), ("1", "PCI_BUS_ID")
        )
        self.assertEqual(server_command(model, {"PATH": "/bin"}, ".", 5.0, "1")[-1], "CUDA1")


SMI_GPUS = "0, GPU-aaa, 81559, 1200\n1, GPU-bbb, 81559, 30000\n"


class ProbeTests(SynchronousTestCase):
    def test_gpus(self) -> None:
        devices = parse_gpus(SMI_GPUS)
        self.assertEqual(devices["1"].total, 81559 * MIB)
        self.assertEqual(devices["1"].free, (81559 - 30000) * MIB)
        self.assertEqual(parse_uuids(SMI_GPUS), {"GPU-aaa": "0", "GPU-bbb": "1"})

    def test_apps_by_device_index(self) -> None:
        apps = "4242, GPU-bbb, 20480\n4242, GPU-aaa, 100\n77, GPU-aaa, 5\n"
        self.assertEqual(
            parse_apps(apps, parse_uuids(SMI_GPUS)),
            {4242: {"1": 20480 * MIB, "0": 100 * MIB}, 77: {"0": 5 * MIB}},
        )
        self.assertEqual(parse_apps("", {}), {})

    def test_apps_without_per_process_figures(self) -> None:
        self.assertIsNone(parse_apps("4242, GPU-aaa, [N/A]\n", parse_uuids(SMI_GPUS)))

    def test_meminfo_device(self) -> None:
        proc = self.mktemp()
        os.makedirs(os.path.join(proc, "7"))
        with open(os.path.join(proc, "meminfo"), "w") as f:
            f.write("MemTotal: 1000 kB\nMemFree: 100 kB\nMemAvailable: 400 kB\n")
        with open(os.path.join(proc, "7", "status"), "w") as f:
            f.write("Name: x\nVmRSS:     200 kB\n")
        probe = MemInfo(proc)
        self.assertEqual(probe.totals(), {"ram": 1000 * 1024})
        reading = self.successResultOf(probe.read([7, 8]))
        self.assertEqual(reading.devices["ram"].used, 600 * 1024)
        self.assertEqual(reading.processes, {7: {"ram": 200 * 1024}})

    def test_group_pids_reads_the_process_group(self) -> None:
        self.assertIn(os.getpid(), group_pids(os.getpgid(0)))


def holder(model_id: str, gib: int, stage: int = IDLE, last_used: float = 0.0) -> Holder:
    return Holder(model_id, {"0": gib * GIB}, stage, last_used)


class PlanTests(SynchronousTestCase):
    budget = {"0": 64 * GIB}

    def plan(
        self,
        gib: int | None,
        holders: list[Holder],
        reserved: int = 0,
        placed: bool = False,
        budget: dict[str, int] | None = None,
    ):  # type: ignore[no-untyped-def]
        budget = budget or self.budget
        needed = None if gib is None else {"*": gib * GIB}
        return plan(options(needed, placed, budget), budget, holders, {"0": reserved * GIB})

    def test_fits_beside(self) -> None:
        p = self.plan(20, [holder("a", 20), holder("b", 20)])
        assert p is not None
        self.assertEqual((p.devices, p.victims, p.waits), ({"0": 20 * GIB}, (), False))

    def test_least_recently_used_idle_first_never_busy(self) -> None:
        holders = [
            holder("old-busy", 20, BUSY, 1),
            holder("newer", 20, IDLE, 5),
            holder("older", 20, IDLE, 3),
        ]
        p = self.plan(20, holders)
        assert p is not None
        self.assertEqual((p.victims, p.waits), (("older",), False))
        p = self.plan(40, holders)
        assert p is not None
        self.assertEqual((p.victims, p.waits), (("older", "newer"), False))
        p = self.plan(60, holders)  # only with the busy one gone: wait for it
        assert p is not None
        self.assertEqual((p.victims, p.waits), (("older", "newer", "old-busy"), True))

    def test_stopping_ones_count_first(self) -> None:
        p = self.plan(30, [holder("idle", 20, IDLE, 0), holder("going", 30, STOPPING, 9)])
        assert p is not None
        self.assertEqual(p.victims, ("going",))

    def test_reservations_leave_room_for_earlier_requests(self) -> None:
        self.assertIsNone(self.plan(50, [holder("a", 20, BUSY)], reserved=20))
        p = self.plan(30, [holder("a", 20, BUSY)], reserved=20)
        assert p is not None
        self.assertEqual((p.victims, p.waits), (("a",), True))
        p = self.plan(20, [holder("a", 20, BUSY)], reserved=20)
        assert p is not None
        self.assertEqual(p.victims, ())

    def test_unknown_takes_the_whole_device(self) -> None:
        p = self.plan(None, [holder("a", 1)])
        assert p is not None
        self.assertEqual((p.devices, p.victims), ({"0": 64 * GIB}, ("a",)))

    def test_larger_than_the_budget_never_fits(self) -> None:
        self.assertIsNone(self.plan(65, []))

    def test_placement_prefers_no_eviction_then_most_room(self) -> None:
        budget = {"0": 24 * GIB, "1": 24 * GIB, "2": 48 * GIB}
        holders = [Holder("a", {"0": 10 * GIB}, IDLE, 0), Holder("b", {"1": 20 * GIB}, IDLE, 0)]
        p = self.plan(16, holders, placed=True, budget=budget)
        assert p is not None
        self.assertEqual((p.device, p.victims), ("2", ()))
        p = self.plan(
            20, [*holders, Holder("c", {"2": 40 * GIB}, BUSY, 0)], placed=True, budget=budget
        )
        assert p is not None
        self.assertEqual((p.device, p.victims), ("0", ("a",)))

    def test_need_is_the_larger_figure(self) -> None:
        self.assertEqual(need({"*": 10}, {"*": 12}), {"*": 12})
        self.assertEqual(need({"0": 10, "1": 5}, {"0": 8}), {"0": 10, "1": 5})
        self.assertIsNone(need(None, None))
        self.assertEqual(options({"*": 5}, False, {"1": 9, "0": 9}), [{"0": 5}])


class StoreTests(SynchronousTestCase):
    def test_round_trip_and_fingerprint(self) -> None:
        path = self.mktemp()
        c = parse_config(config("{}"))
        store = MeasuredStore(path)
        store.put(c.models["a"], {"0": 3 * GIB}, 12.5)
        self.assertEqual(MeasuredStore(path).get(c.models["a"]), {"0": 3 * GIB})
        with open(path) as f:
            self.assertEqual(json.load(f)["models"]["a"]["bytes"], {"0": 3 * GIB})
        other = parse_config(config("{}", cmd="x --port ${PORT} -c 8192"))
        self.assertIsNone(MeasuredStore(path).get(other.models["a"]))
        moved = parse_config("startPort: 9000\n" + config("{}"))  # another port: same server
        self.assertEqual(MeasuredStore(path).get(moved.models["a"]), {"0": 3 * GIB})

    def test_unwritable_or_corrupt_files_are_not_fatal(self) -> None:
        c = parse_config(config("{}"))
        MeasuredStore("/nonexistent/dir/m.json").put(c.models["a"], {"0": 1}, 0)
        path = self.mktemp()
        with open(path, "w") as f:
            f.write("{not json")
        self.assertIsNone(MeasuredStore(path).get(c.models["a"]))


class BriefRunsTests(SynchronousTestCase):
    def test_settled_waits_for_a_run_started_by_the_last_ones_answer(self) -> None:
        """A reading is two runs in a row: settled must not fire between them."""
        from llamaswap.process.oneshot import BriefRuns
        from llamaswap.testing.process import FakeProcessReactor

        reactor = FakeProcessReactor()
        runs = BriefRuns(reactor)
        second: list[object] = []
        runs.run(["a"], 10).addCallback(lambda _: second.append(runs.run(["b"], 10)))
        settled = runs.settled()
        reactor.children[0].exit(0)
        self.assertEqual(len(second), 1)
        self.assertNoResult(settled)  # the second run is under way
        reactor.children[1].exit(0)
        self.successResultOf(settled)
