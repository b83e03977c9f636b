# -*- test-case-name: tests.test_metrics -*-
"""
The host's readings for C{/metrics}, taken at scrape time.

 - L{HostReadings}: C{/proc} (CPU utilisation since the previous scrape,
   memory, swap, load average, network bytes). A file that is missing or
   unreadable (another OS, a container) leaves its families out.
 - L{GPUGauges}: one C{nvidia-smi} run per scrape, shared by the scrapes that
   arrive while it runs, killed after its timeout. A failure leaves the GPU
   gauges out and is warned about once.

The parsers (L{cpu_times}, L{meminfo}, L{net_bytes}, L{gpu_families}) are pure.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llamaswap.memory.probe import meminfo
from llamaswap.metrics.prometheus import Family, family, gauge
from llamaswap.process.oneshot import run_briefly

GPU_TIMEOUT = 5.0  # seconds an nvidia-smi run may take before it is killed
GPU_FIELDS = (
    "index,name,uuid,temperature.gpu,utilization.gpu,utilization.memory,"
    "memory.used,memory.total,fan.speed,power.draw"
)
_MIB = 1024 * 1024
# (metric, help, CSV column, scale) for each GPU gauge; columns after index, name, uuid.
_GPU_GAUGES = (
    ("llamaswap_gpu_temperature_celsius", "GPU temperature.", 3, 1.0),
    ("llamaswap_gpu_util_percent", "GPU utilisation.", 4, 1.0),
    ("llamaswap_gpu_memory_util_percent", "GPU memory controller utilisation.", 5, 1.0),
    ("llamaswap_gpu_memory_used_bytes", "GPU memory in use.", 6, _MIB),
    ("llamaswap_gpu_memory_total_bytes", "GPU memory size.", 7, _MIB),
    ("llamaswap_gpu_fan_speed_percent", "GPU fan speed.", 8, 1.0),
    ("llamaswap_gpu_power_draw_watts", "GPU power draw.", 9, 1.0),
)


# --- /proc -------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="ascii", errors="replace")
    except OSError:
        return None


def cpu_times(text: str) -> dict[str, tuple[int, int]]:
    """C{/proc/stat}: C{{"all" or core number: (busy, total)}} in clock ticks."""
    times = {}
    for line in text.splitlines():
        name, *fields = line.split()
        if not name.startswith("cpu") or len(fields) < 4:
            continue
        # user nice system idle iowait irq softirq steal (guest time is inside user/nice).
        ticks = [int(f) for f in fields[:8]]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        total = sum(ticks)
        times[name[3:] or "all"] = (total - idle, total)
    return times


def net_bytes(text: str) -> list[tuple[str, int, int]]:
    """C{/proc/net/dev}: C{(interface, received, sent)} bytes."""
    rows = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9:
            rows.append((name.strip(), int(fields[0]), int(fields[8])))
    return rows


def memory_families(memory: dict[str, int]) -> list[Family]:
    """Memory gauges from L{meminfo}'s figures; none without C{MemTotal}."""
    if "MemTotal" not in memory:
        return []
    available = memory.get(
        "MemAvailable",
        memory.get("MemFree", 0) + memory.get("Buffers", 0) + memory.get("Cached", 0),
    )
    total = memory["MemTotal"]
    return [
        gauge("llamaswap_memory_total_bytes", "Memory size.", total),
        gauge(
            "llamaswap_memory_used_bytes",
            "Memory in use (total minus available).",
            total - available,
        ),
        gauge(
            "llamaswap_memory_free_bytes",
            "Memory available to new work (MemAvailable).",
            available,
        ),
    ]


def swap_families(memory: dict[str, int]) -> list[Family]:
    """Swap gauges from L{meminfo}'s figures; none without C{SwapTotal}."""
    if "SwapTotal" not in memory:
        return []
    swap = memory["SwapTotal"]
    return [
        gauge("llamaswap_swap_total_bytes", "Swap size.", swap),
        gauge("llamaswap_swap_used_bytes", "Swap in use.", swap - memory.get("SwapFree", swap)),
    ]


def load_families(text: str) -> list[Family]:
    """The load average gauges from C{/proc/loadavg}; none if it does not parse."""
    loadavg = text.split()
    if len(loadavg) < 3:
        return []
    return [
        family(
            "llamaswap_load_average",
            "gauge",
            "System load average.",
            (
                ({"interval": i}, float(v))
                for i, v in zip(("1m", "5m", "15m"), loadavg[:3], strict=True)
            ),
        )
    ]


def network_families(text: str) -> list[Family]:
    """The byte counters of each interface in C{/proc/net/dev}."""
    return [
        family(
            "llamaswap_network_bytes_total",
            "counter",
            "Bytes through each network interface.",
            (
                ({"interface": name, "direction": direction}, value)
                for name, recv, sent in net_bytes(text)
                for direction, value in (("recv", recv), ("sent", sent))
            ),
        )
    ]


class HostReadings:
    """
    The C{/proc} families, read at each scrape. C{proc}: where C{/proc} is
    (tests use a fake tree). CPU utilisation is the share of busy ticks since
    the previous scrape (since this object was made, for the first).
    """

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = Path(proc)
        self._cpu_before = self._cpu_times()
        self._cpu_last: dict[str, float] = {}

    def families(self) -> list[Family]:
        """The host families readable now, in exposition order."""
        memory = meminfo(_read(self._proc / "meminfo") or "")
        net = _read(self._proc / "net" / "dev")
        return [
            self._cpu(),
            *memory_families(memory),
            *swap_families(memory),
            *load_families(_read(self._proc / "loadavg") or ""),
            *(network_families(net) if net is not None else []),
        ]

    def _cpu_times(self) -> dict[str, tuple[int, int]]:
        return cpu_times(_read(self._proc / "stat") or "")

    def _cpu(self) -> Family:
        """CPU busy percentage since the previous scrape (since start-up for the first)."""
        now = self._cpu_times()
        for core, (busy, total) in now.items():
            busy_before, total_before = self._cpu_before.get(core, (0, 0))
            if total > total_before:
                self._cpu_last[core] = 100.0 * (busy - busy_before) / (total - total_before)
        self._cpu_before = now
        order = sorted(self._cpu_last, key=lambda c: (c != "all", int(c) if c.isdigit() else -1))
        return family(
            "llamaswap_cpu_util_percent",
            "gauge",
            'CPU utilisation since the previous scrape; core="all" is the whole machine.',
            (({"core": c}, round(self._cpu_last[c], 2)) for c in order),
        )


# --- nvidia-smi --------------------------------------------------------------------


def _gpu_value(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def gpu_families(csv: str) -> list[Family]:
    """The GPU gauges from C{nvidia-smi --query-gpu=GPU_FIELDS --format=csv,noheader,nounits}."""
    rows = [[cell.strip() for cell in line.split(",")] for line in csv.splitlines() if line.strip()]
    families = []
    for name, help, column, scale in _GPU_GAUGES:
        samples = []
        for row in rows:
            if len(row) <= column:
                continue
            value = _gpu_value(row[column])
            if value is not None:
                samples.append(({"id": row[0], "name": row[1], "uuid": row[2]}, value * scale))
        families.append(family(name, "gauge", help, samples))
    return families


class GPUGauges:
    """
    The GPU gauges from C{program} (an C{nvidia-smi}), run through C{reactor}
    (an L{IReactorProcess}); a run taking longer than C{timeout} seconds is killed.
    """

    log = Logger()

    def __init__(self, program: str, reactor: IReactorTime, timeout: float = GPU_TIMEOUT) -> None:
        self._program = program
        self._clock = reactor
        self._reactor: Any = reactor
        self._timeout = timeout
        self._failed = False
        self._waiters: list[Deferred[list[Family]]] = []

    def families(self) -> Deferred[list[Family]]:
        """
        The GPU gauges; scrapes arriving during a run share it (one child at a
        time). Never fails: a failed or killed run fires with C{[]}.
        """
        waiter: Deferred[list[Family]] = Deferred()
        if self._waiters:
            self._waiters.append(waiter)
            return waiter
        self._waiters.append(waiter)
        self._run().addCallback(self._share)
        return waiter

    def _share(self, families: list[Family]) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(families)

    def _run(self) -> Deferred[list[Family]]:
        args = [self._program, f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader,nounits"]

        def parsed(out: bytes | None) -> list[Family]:
            if out is None:
                self._failure("it could not start, failed or timed out")
                return []
            return gpu_families(out.decode("utf-8", "replace"))

        done: Deferred[bytes | None] = run_briefly(self._reactor, args, self._timeout)
        return done.addCallback(parsed)

    def _failure(self, why: str) -> None:
        if not self._failed:  # once: a scrape every 15 s must not flood the log
            self._failed = True
            self.log.warn(
                "/metrics: no GPU gauges, {program} failed: {why}",
                program=self._program,
                why=why,
            )
