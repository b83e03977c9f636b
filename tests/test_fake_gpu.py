"""
Tests for the fake GPU (L{llamaswap.testing.fake_gpu}), the fake nvidia-smi
(L{llamaswap.testing.nvidia_smi}) and the fake server's C{--gpu-memory}.

The unit tests use real pids for liveness (this process, a reaped child, a
zombie) and pass C{now} for time; the integration tests run real fake servers
and the real C{python -m llamaswap.testing.nvidia_smi}.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

from twisted.trial.unittest import SynchronousTestCase, TestCase

from llamaswap.testing import fake_gpu, nvidia_smi
from llamaswap.testing.fake_gpu import (
    AllocationError,
    allocate,
    device_usage,
    parse_gpu_memory,
    parse_size_mib,
    process_usage,
    release,
    write_devices,
)
from llamaswap.testing.fakeserver import parse_args
from tests.fakeserver_helper import (
    REPO_ROOT,
    fakeserver_env,
    free_port,
    spawn_fakeserver,
    start_fakeserver,
)

GIB = 1024


def dead_pid() -> int:
    """The pid of a child that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def proc_state(pid: int) -> str:
    """The state letter of C{/proc/<pid>/stat} (C{Z}: zombie)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rpartition(")")[2].split()[0]


def write_proc(directory: str, pid: int, usage: dict[str, int], release_at: float | None) -> None:
    """A proc-<pid>.json as the format describes it (no C{started})."""
    with open(os.path.join(directory, f"proc-{pid}.json"), "w") as f:
        json.dump({"pid": pid, "usage_mib": usage, "release_at": release_at}, f)


def smi(directory: str | None, *args: str) -> tuple[int, list[str]]:
    """Run the fake nvidia-smi in-process: (exit status, output lines)."""
    out = io.StringIO()
    environ = {} if directory is None else {fake_gpu.ENV_VAR: directory}
    code = nvidia_smi.main(list(args), environ=environ, out=out)
    return code, out.getvalue().splitlines()


def smi_program(directory: str | None, *args: str) -> tuple[int, list[str]]:
    """Run C{python -m llamaswap.testing.nvidia_smi}: (exit status, stdout lines)."""
    env = fakeserver_env()
    env.pop(fake_gpu.ENV_VAR, None)
    if directory is not None:
        env[fake_gpu.ENV_VAR] = directory
    done = subprocess.run(
        [sys.executable, "-m", "llamaswap.testing.nvidia_smi", *args],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.returncode, done.stdout.splitlines()


QUERY_GPU = "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free"
QUERY_APPS = "--query-compute-apps=pid,gpu_uuid,used_memory"
CSV = "--format=csv,noheader,nounits"


class SizeTests(SynchronousTestCase):
    """Sizes and --gpu-memory specs."""

    def test_sizes(self) -> None:
        """Binary units, short or long; a bare number is MiB; rounded up to whole MiB."""
        cases = {
            "12GiB": 12 * GIB,
            "512MiB": 512,
            "1.5GiB": 1536,
            "24G": 24 * GIB,
            "100M": 100,
            "100": 100,
            "1TiB": 1024 * GIB,
            "2048KiB": 2,
            "1K": 1,
            "1048576B": 1,
            "1B": 1,
            " 8 gb ": 8 * GIB,
            "0": 0,
        }
        self.assertEqual({text: parse_size_mib(text) for text in cases}, cases)
        for bad in ("", "-1G", "G", "1.2.3G", "12 GiBs", "inf", "nan", "1X"):
            self.assertRaises(ValueError, parse_size_mib, bad)

    def test_spec(self) -> None:
        """A plain size goes to CUDA_VISIBLE_DEVICES's first entry, else 0; DEV=SIZE lists."""
        self.assertEqual(parse_gpu_memory("12GiB"), {"0": 12 * GIB})
        self.assertEqual(parse_gpu_memory("12GiB", "2,3"), {"2": 12 * GIB})
        self.assertEqual(parse_gpu_memory("1G", "GPU-fake-1"), {"GPU-fake-1": GIB})
        self.assertEqual(parse_gpu_memory("1G", ""), {"": GIB})
        self.assertEqual(parse_gpu_memory("0=20GiB, 1=512MiB", "5"), {"0": 20 * GIB, "1": 512})
        for bad in ("0=1G,0=2G", "0=1G,2G", "=1G", "0=", "0=xG"):
            self.assertRaises(ValueError, parse_gpu_memory, bad)

    def test_fakeserver_options(self) -> None:
        """The fake server takes --gpu-memory and --gpu-release-delay, off by default."""
        o = parse_args(["--port", "0"])
        self.assertEqual((o.gpu_memory, o.gpu_release_delay), (None, 0.0))
        o = parse_args(["--port", "0", "--gpu-memory", "0=1G,1=2G", "--gpu-release-delay", "1.5"])
        self.assertEqual((o.gpu_memory, o.gpu_release_delay), ("0=1G,1=2G", 1.5))
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        for bad in (["--gpu-memory", "lots"], ["--gpu-release-delay", "-1"]):
            with self.assertRaises(SystemExit) as e:
                parse_args(["--port", "0", *bad])
            self.assertEqual(e.exception.code, 2)
        self.assertIn("--gpu-memory: not a size", stderr.getvalue())


class UsageTests(SynchronousTestCase):
    """device_usage, process_usage, allocate and release on files and real pids."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        write_devices(self.dir, {"0": 80 * GIB, "1": 24 * GIB})

    def test_devices_file(self) -> None:
        """write_devices writes the documented devices.json."""
        write_devices(self.dir, {"0": 81920}, per_process=False, name="Fake H100")
        with open(os.path.join(self.dir, "devices.json")) as f:
            self.assertEqual(
                json.load(f),
                {
                    "devices": [
                        {
                            "index": "0",
                            "uuid": "GPU-fake-0",
                            "name": "Fake H100",
                            "total_mib": 81920,
                        }
                    ],
                    "per_process": False,
                },
            )

    def test_live_and_dead(self) -> None:
        """Live pids count; dead ones (reaped or zombie) do not, and their files go."""
        write_proc(self.dir, os.getpid(), {"0": 1000, "1": 24}, None)
        gone = dead_pid()
        write_proc(self.dir, gone, {"0": 5000}, None)
        zombie = subprocess.Popen(["true"])  # exits, and is not reaped until cleanup
        self.addCleanup(zombie.wait)
        deadline = time.monotonic() + 10
        while proc_state(zombie.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(proc_state(zombie.pid), "Z")
        write_proc(self.dir, zombie.pid, {"0": 7000}, None)
        self.assertEqual(device_usage(self.dir), {"0": 1000, "1": 24})
        self.assertEqual(
            process_usage(self.dir), [(os.getpid(), "0", 1000), (os.getpid(), "1", 24)]
        )
        left = sorted(n for n in os.listdir(self.dir) if n.startswith("proc-"))
        self.assertEqual(left, [f"proc-{os.getpid()}.json"])

    def test_release_at(self) -> None:
        """A dead pid's memory counts until its release_at, then its file goes."""
        gone = dead_pid()
        write_proc(self.dir, gone, {"0": 4096}, 1000.0)
        self.assertEqual(device_usage(self.dir, now=999.5), {"0": 4096, "1": 0})
        self.assertEqual(process_usage(self.dir, now=999.5), [])  # not a live process
        self.assertEqual(device_usage(self.dir, now=1000.0), {"0": 0, "1": 0})
        self.assertFalse(os.path.exists(os.path.join(self.dir, f"proc-{gone}.json")))

    def test_live_while_releasing(self) -> None:
        """A live process still holds its memory, whatever its release_at says."""
        write_proc(self.dir, os.getpid(), {"0": 10}, 1.0)
        self.assertEqual(device_usage(self.dir, now=2.0)["0"], 10)

    def test_reused_pid(self) -> None:
        """A file whose start time is not the live pid's is a dead process's."""
        path = os.path.join(self.dir, f"proc-{os.getpid()}.json")
        with open(path, "w") as f:
            json.dump(
                {"pid": os.getpid(), "usage_mib": {"0": 10}, "release_at": None, "started": -1}, f
            )
        self.assertEqual(device_usage(self.dir)["0"], 0)

    def test_allocate_and_release(self) -> None:
        """allocate records this pid's usage (by index or UUID); release with a delay keeps it."""
        allocate(self.dir, {"GPU-fake-1": 2 * GIB, "0": 100})
        self.assertEqual(device_usage(self.dir), {"0": 100, "1": 2 * GIB})
        release(self.dir, delay=5.0, now=100.0)
        with open(os.path.join(self.dir, f"proc-{os.getpid()}.json")) as f:
            self.assertEqual(json.load(f)["release_at"], 105.0)
        release(self.dir)  # delay 0: gone at once
        self.assertEqual(device_usage(self.dir), {"0": 0, "1": 0})
        release(self.dir)  # holds nothing: nothing happens

    def test_out_of_memory(self) -> None:
        """An allocation that does not fit fails whole, with llama.cpp-like text."""
        write_proc(self.dir, os.getpid(), {"0": 50 * GIB}, None)
        e = self.assertRaises(AllocationError, allocate, self.dir, {"1": 1, "0": 40 * GIB}, 1)
        self.assertEqual(
            str(e), "CUDA error: out of memory (device 0: need 40960 MiB, free 30720 MiB)"
        )
        self.assertEqual(device_usage(self.dir), {"0": 50 * GIB, "1": 0})
        self.assertFalse(os.path.exists(os.path.join(self.dir, "proc-1.json")))

    def test_bad_devices(self) -> None:
        """Unknown devices, no visible device, no devices.json: CUDA-like errors."""
        e = self.assertRaises(AllocationError, allocate, self.dir, {"7": 1})
        self.assertEqual(str(e), "CUDA error: invalid device ordinal (device 7)")
        e = self.assertRaises(AllocationError, allocate, self.dir, {"": 1})
        self.assertEqual(str(e), "CUDA error: no CUDA-capable device is detected")
        empty = os.path.abspath(self.mktemp())
        os.makedirs(empty)
        e = self.assertRaises(AllocationError, allocate, empty, {"0": 1})
        self.assertEqual(str(e), "CUDA error: no CUDA-capable device is detected")


class NvidiaSmiTests(SynchronousTestCase):
    """The fake nvidia-smi's output, run in-process."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        write_devices(self.dir, {"0": 81920, "1": 24576}, name="Fake H100")
        write_proc(self.dir, os.getpid(), {"1": 1000}, None)

    def test_query_gpu(self) -> None:
        """The memory query, without units and header: comma+space separated MiB."""
        self.assertEqual(
            smi(self.dir, QUERY_GPU, CSV),
            (
                0,
                [
                    "0, GPU-fake-0, Fake H100, 81920, 0, 81920",
                    "1, GPU-fake-1, Fake H100, 24576, 1000, 23576",
                ],
            ),
        )

    def test_units_header_and_subsets(self) -> None:
        """Without nounits values say MiB; the header names the fields; any subset, any order."""
        self.assertEqual(
            smi(self.dir, "--query-gpu=memory.used,index", "--format=csv,noheader"),
            (0, ["0 MiB, 0", "1000 MiB, 1"]),
        )
        self.assertEqual(
            smi(self.dir, "--query-gpu", "memory.free,gpu_name", "--format", "csv,nounits"),
            (0, ["memory.free [MiB], gpu_name", "81920, Fake H100", "23576, Fake H100"]),
        )

    def test_id(self) -> None:
        """-i/--id (index or UUID, or a list) restricts the devices; an unknown one exits 6."""
        self.assertEqual(smi(self.dir, "-i", "1", "--query-gpu=index", CSV), (0, ["1"]))
        self.assertEqual(smi(self.dir, "--id=GPU-fake-0", "--query-gpu=index", CSV), (0, ["0"]))
        self.assertEqual(smi(self.dir, "--id=1,0", "--query-gpu=index", CSV), (0, ["1", "0"]))
        self.assertEqual(smi(self.dir, "-i", "0", QUERY_APPS, CSV), (0, []))
        self.assertEqual(smi(self.dir, "-i", "4", "--query-gpu=index", CSV)[0], 6)

    def test_compute_apps(self) -> None:
        """One line per (live pid, device); used_memory gets MiB unless nounits."""
        pid = os.getpid()
        self.assertEqual(smi(self.dir, QUERY_APPS, CSV), (0, [f"{pid}, GPU-fake-1, 1000"]))
        self.assertEqual(
            smi(self.dir, "--query-compute-apps=used_gpu_memory,pid", "--format=csv"),
            (0, ["used_gpu_memory [MiB], pid", f"1000 MiB, {pid}"]),
        )
        code, lines = smi(self.dir, "--query-compute-apps=pid,process_name", CSV)
        self.assertEqual((code, lines), (0, [f"{pid}, {sys.orig_argv[0]}"]))

    def test_no_apps(self) -> None:
        """No compute app: nothing at all with noheader, the header alone without."""
        release(self.dir)
        self.assertEqual(smi(self.dir, QUERY_APPS, CSV), (0, []))
        self.assertEqual(
            smi(self.dir, QUERY_APPS, "--format=csv"), (0, ["pid, gpu_uuid, used_gpu_memory [MiB]"])
        )

    def test_not_per_process(self) -> None:
        """per_process false: the devices' usage is known, the processes' is [N/A]."""
        write_devices(self.dir, {"0": 81920, "1": 24576}, per_process=False)
        pid = os.getpid()
        self.assertEqual(smi(self.dir, QUERY_APPS, CSV), (0, [f"{pid}, GPU-fake-1, [N/A]"]))
        self.assertEqual(
            smi(self.dir, QUERY_APPS, "--format=csv,noheader"), (0, [f"{pid}, GPU-fake-1, [N/A]"])
        )
        self.assertEqual(smi(self.dir, "--query-gpu=memory.used", CSV), (0, ["0", "1000"]))

    def test_no_driver(self) -> None:
        """No LLAMASWAP_FAKE_GPU, or no devices.json in it: the driver message, exit 9."""
        expected = (9, [nvidia_smi.NO_DRIVER])
        self.assertEqual(smi(None, QUERY_GPU, CSV), expected)
        os.unlink(os.path.join(self.dir, "devices.json"))
        self.assertEqual(smi(self.dir, QUERY_GPU, CSV), expected)
        self.assertIn("couldn't communicate with the NVIDIA driver", nvidia_smi.NO_DRIVER)

    def test_program(self) -> None:
        """C{python -m llamaswap.testing.nvidia_smi} prints to stdout and exits as main says."""
        self.assertEqual(smi_program(None, QUERY_GPU, CSV), (9, [nvidia_smi.NO_DRIVER]))
        self.assertEqual(
            smi_program(self.dir, "--query-gpu=index,memory.used", CSV), (0, ["0, 0", "1, 1000"])
        )

    def test_bad_arguments(self) -> None:
        """An unknown field exits 2 naming it; so do a missing --format and unknown flags."""
        self.assertEqual(
            smi(self.dir, "--query-gpu=index,x", CSV),
            (2, ['Field "x" is not a valid field to query.']),
        )
        self.assertEqual(smi(self.dir, "--query-compute-apps=memory.used", CSV)[0], 2)
        self.assertEqual(smi(self.dir, "--query-gpu=index")[0], 2)
        self.assertEqual(smi(self.dir, "--query-gpu=index", "--format=json")[0], 2)
        self.assertEqual(smi(self.dir, "--bogus")[0], 2)

    def test_list(self) -> None:
        """-L lists the devices as the real tool does."""
        self.assertEqual(
            smi(self.dir, "-L"),
            (0, ["GPU 0: Fake H100 (UUID: GPU-fake-0)", "GPU 1: Fake H100 (UUID: GPU-fake-1)"]),
        )


def proc_file(directory: str, pid: int) -> dict[str, object]:
    with open(os.path.join(directory, f"proc-{pid}.json")) as f:
        loaded: dict[str, object] = json.load(f)
        return loaded


class FakeServerGPUTests(TestCase):
    """Real fake servers allocating on a fake GPU, seen by the real fake nvidia-smi."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())

    def env(self, visible: str = "0") -> dict[str, str]:
        return {fake_gpu.ENV_VAR: self.dir, "CUDA_VISIBLE_DEVICES": visible}

    def used(self, now: float | None = None) -> int:
        return device_usage(self.dir, now)["0"]

    def test_admission_and_release(self) -> None:
        """
        On 80 GiB, 50 GiB starts and shows in the compute apps under its pid; 40 GiB
        more fails with the OOM line and exit 1, never listening; after SIGTERM the
        50 GiB stay used for --gpu-release-delay 1, then are free.
        """
        write_devices(self.dir, {"0": 80 * GIB})
        first, _ = start_fakeserver(
            "--name", "first", "--gpu-memory", "50GiB", "--gpu-release-delay", "1",
            env=self.env(),
        )  # fmt: skip
        self.addCleanup(first.stop)
        self.assertEqual(
            smi_program(self.dir, QUERY_APPS, CSV), (0, [f"{first.pid}, GPU-fake-0, 51200"])
        )
        self.assertEqual(
            smi_program(self.dir, "--query-gpu=memory.total,memory.used,memory.free", CSV),
            (0, ["81920, 51200, 30720"]),
        )

        second = spawn_fakeserver(
            "--name", "second", "--port", str(free_port()), "--gpu-memory", "40GiB",
            env=self.env(),
        )  # fmt: skip
        self.addCleanup(second.stop)
        self.assertEqual(second.wait_exit(), 1)
        self.assertIn(
            "CUDA error: out of memory (device 0: need 40960 MiB, free 30720 MiB)",
            second.stderr_lines,
        )
        self.assertIsNone(second.port)
        self.assertEqual(process_usage(self.dir), [(first.pid, "0", 51200)])

        sent = time.time()
        first.signal(signal.SIGTERM)
        self.assertEqual(first.wait_exit(), 0)
        release_at = proc_file(self.dir, first.pid)["release_at"]
        assert isinstance(release_at, float)
        self.assertTrue(sent + 1 <= release_at < sent + 5, (sent, release_at))
        # Gone from the compute apps at once, still used until release_at.
        self.assertEqual(smi_program(self.dir, QUERY_APPS, CSV), (0, []))
        seen = smi_program(self.dir, "--query-gpu=memory.used", CSV)
        if time.time() < release_at:  # it looked before release_at (a loaded machine may not)
            self.assertEqual(seen, (0, ["51200"]))
        self.assertEqual(self.used(now=release_at - 0.01), 51200)
        while self.used() and time.time() < sent + 10:
            time.sleep(0.05)
        freed = time.time()
        self.assertEqual(self.used(), 0)
        self.assertGreaterEqual(freed, sent + 1)
        self.assertFalse(os.path.exists(os.path.join(self.dir, f"proc-{first.pid}.json")))

    def test_placement_and_sigkill(self) -> None:
        """CUDA_VISIBLE_DEVICES places a plain size; a SIGKILLed server's memory is free at once."""
        write_devices(self.dir, {"0": 8 * GIB, "1": 8 * GIB})
        server, _ = start_fakeserver(
            "--name", "one", "--gpu-memory", "6G", "--gpu-release-delay", "60", env=self.env("1")
        )
        self.addCleanup(server.stop)
        self.assertEqual(process_usage(self.dir), [(server.pid, "1", 6 * GIB)])
        self.assertEqual(device_usage(self.dir), {"0": 0, "1": 6 * GIB})
        server.signal(signal.SIGKILL)
        self.assertEqual(server.wait_exit(), -signal.SIGKILL)
        self.assertEqual(device_usage(self.dir), {"0": 0, "1": 0})

    def test_without_fake_gpu(self) -> None:
        """Without LLAMASWAP_FAKE_GPU, --gpu-memory changes nothing."""
        server, _ = start_fakeserver(
            "--name", "plain", "--gpu-memory", "1TiB", env={fake_gpu.ENV_VAR: ""}
        )
        self.addCleanup(server.stop)
        self.assertTrue(server.alive)
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait_exit(), 0)
