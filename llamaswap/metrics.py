# -*- test-case-name: tests.test_metrics -*-
# twisted.web's Request and Resource are unannotated; everything else stays strict.
# mypy: disable-error-code="no-untyped-call"
"""
C{GET /metrics}: Prometheus text exposition (version 0.0.4), always on.

Two kinds of series:

 - our own, fed by the L{EventBus}: requests by model and status and their
   durations (C{"request"} events), model starts, failed starts and load times
   (C{"modelStatus"} transitions), plus each model's state and in-flight count
   read from the supervisor at scrape time;
 - the host's, read from C{/proc} at scrape time: CPU utilisation since the
   previous scrape, memory, swap, load average, network bytes. GPU gauges only
   where C{nvidia-smi} is installed (one run per scrape, killed after
   L{GPU_TIMEOUT} seconds).

Unknown model names (a client asking for anything it likes) are counted
under C{model=""}, so clients cannot create unbounded series.
"""

from __future__ import annotations

import os
import shutil
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from llamaswap.config import Config
from llamaswap.errors import ModelNotFound
from llamaswap.events import EventBus
from llamaswap.supervisor import ModelStatus
from llamaswap.web.base import JSONResource, answer_later

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
STATES = ("stopped", "starting", "ready", "stopping", "failed")
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


class StatusSource(Protocol):
    """What the metrics need from the supervisor."""

    def statuses(self) -> list[ModelStatus]: ...


# --- the text format ---------------------------------------------------------------


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


Labels = tuple[tuple[str, str], ...]


@frozen
class Family:
    """
    One metric: its name, type, help text and samples C{(suffix, labels,
    value)}; the suffix is "" except for a summary's C{_sum} and C{_count}.
    """

    name: str
    kind: str  # counter, gauge, summary
    help: str
    samples: tuple[tuple[str, Labels, float], ...] = ()

    def lines(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            braces = f"{{{text}}}" if text else ""
            yield f"{self.name}{suffix}{braces} {_number(value)}"


def family(
    name: str, kind: str, help: str, samples: Iterable[tuple[dict[str, str], float]] = ()
) -> Family:
    """A L{Family} from samples whose labels are dicts (kept in their order)."""
    return Family(name, kind, help, tuple(("", tuple(labels.items()), v) for labels, v in samples))


def summary(name: str, help: str, values: dict[str, list[float]]) -> Family:
    """A summary without quantiles, by model: C{values[model] = [sum, count]}."""
    samples = []
    for model, (total, count) in sorted(values.items()):
        labels = (("model", model),)
        samples += [("_sum", labels, total), ("_count", labels, count)]
    return Family(name, "summary", help, tuple(samples))


def exposition(families: Iterable[Family]) -> bytes:
    """The text exposition of C{families}."""
    return ("\n".join(line for f in families for line in f.lines()) + "\n").encode("utf-8")


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


def meminfo(text: str) -> dict[str, int]:
    """C{/proc/meminfo} in bytes."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def net_bytes(text: str) -> list[tuple[str, int, int]]:
    """C{/proc/net/dev}: C{(interface, received, sent)} bytes."""
    rows = []
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9:
            rows.append((name.strip(), int(fields[0]), int(fields[8])))
    return rows


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


class _Collect(ProcessProtocol):
    """Collects a short-lived child's stdout; fires C{done} with it (or None on failure)."""

    def __init__(self) -> None:
        self.out = b""
        self.done: Deferred[bytes | None] = Deferred()
        self.timer: IDelayedCall | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def processEnded(self, reason: Failure) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.done.callback(self.out if reason.check(ProcessDone) else None)

    def kill(self) -> None:
        if self.transport is not None:
            self.transport.signalProcess("KILL")


# --- the collector -----------------------------------------------------------------


class Metrics:
    """
    Counters fed by C{events}; C{collect()} adds the readings taken now.

    C{proc}: where C{/proc} is (tests use a fake tree). C{nvidia_smi}: the
    program to run for GPU gauges (C{reactor} must then provide
    L{IReactorProcess}), or None for no GPU gauges; a run taking longer than
    C{gpu_timeout} seconds is killed.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        supervisor: StatusSource,
        events: EventBus,
        reactor: IReactorTime,
        *,
        proc: str = "/proc",
        nvidia_smi: str | None = None,
        gpu_timeout: float = GPU_TIMEOUT,
    ) -> None:
        self._config = config
        self._supervisor = supervisor
        self._clock = reactor
        self._reactor: Any = reactor
        self._proc = Path(proc)
        self._nvidia_smi = nvidia_smi
        self._gpu_timeout = gpu_timeout
        self._gpu_failed = False
        self._gpu_waiters: list[Deferred[list[Family]]] = []
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.durations: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.starts: defaultdict[str, int] = defaultdict(int)
        self.failures: defaultdict[str, int] = defaultdict(int)
        self.loads: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._states: dict[str, str] = {}
        self._starting_since: dict[str, float] = {}
        self._cpu_before = self._cpu_times()
        self._cpu_last: dict[str, float] = {}
        events.subscribe(self._event)

    # --- events --------------------------------------------------------------------

    def model_label(self, name: object) -> str:
        """The canonical name for a requested model, or "" if it names nothing we have."""
        if not isinstance(name, str):
            return ""
        try:
            return self._config.resolve(name).model_id
        except ModelNotFound:
            pass
        try:
            peer = self._config.find_peer(name)
        except ModelNotFound:
            return ""
        return peer.fqn if peer is not None else ""

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "request":
            model = self.model_label(data.get("model"))
            self.requests[(model, str(data.get("status")))] += 1
            duration = self.durations[model]
            duration[0] += float(data.get("duration") or 0.0)
            duration[1] += 1
        elif kind == "modelStatus":
            self._transition(str(data.get("model")), str(data.get("state")))

    def _transition(self, model: str, state: str) -> None:
        before = self._states.get(model, "stopped")
        self._states[model] = state
        if state == before:
            return  # a status update without a transition
        now = self._clock.seconds()
        if state == "starting":
            self.starts[model] += 1
            self._starting_since[model] = now
        elif state == "failed":
            self.failures[model] += 1
        since = self._starting_since.pop(model, None) if state != "starting" else None
        if state == "ready" and since is not None:
            load = self.loads[model]
            load[0] += now - since
            load[1] += 1

    # --- scrape --------------------------------------------------------------------

    def collect(self) -> Deferred[bytes]:
        """
        The exposition text. Fires at once unless GPU gauges are being read;
        never fails (a failed C{nvidia-smi} run leaves the GPU gauges out).
        """
        families = self._own() + self._host()
        if self._nvidia_smi is None:
            return succeed(exposition(families))
        return self._gpu().addCallback(lambda more: exposition(families + more))

    def _own(self) -> list[Family]:
        statuses = self._supervisor.statuses()
        models = [s.model_id for s in statuses]
        return [
            family(
                "llamaswap_requests_total",
                "counter",
                "Proxied requests by model and recorded status (499: the client left before "
                "the end; 502: the model's answer was cut short, even after a 200 status line).",
                (({"model": m, "status": s}, n) for (m, s), n in sorted(self.requests.items())),
            ),
            summary(
                "llamaswap_request_duration_seconds",
                "Time from request to the end of the answer, by model.",
                self.durations,
            ),
            family(
                "llamaswap_model_state",
                "gauge",
                "1 for each model's current state, 0 for the others.",
                (
                    ({"model": s.model_id, "state": state}, int(s.state == state))
                    for s in statuses
                    for state in STATES
                ),
            ),
            family(
                "llamaswap_model_in_flight",
                "gauge",
                "Requests each model is serving now.",
                (({"model": s.model_id}, s.in_flight) for s in statuses),
            ),
            family(
                "llamaswap_model_starts_total",
                "counter",
                "Times each model was started.",
                (({"model": m}, self.starts.get(m, 0)) for m in models),
            ),
            family(
                "llamaswap_model_start_failures_total",
                "counter",
                "Starts that failed (exit during start-up, health check timeout, no command).",
                (({"model": m}, self.failures.get(m, 0)) for m in models),
            ),
            summary(
                "llamaswap_model_load_seconds",
                "Time from start to ready (health check passed), by model.",
                self.loads,
            ),
        ]

    def _host(self) -> list[Family]:
        families = [self._cpu()]
        memory = meminfo(_read(self._proc / "meminfo") or "")
        if "MemTotal" in memory:
            available = memory.get(
                "MemAvailable",
                memory.get("MemFree", 0) + memory.get("Buffers", 0) + memory.get("Cached", 0),
            )
            total = memory["MemTotal"]
            families += [
                family("llamaswap_memory_total_bytes", "gauge", "Memory size.", [({}, total)]),
                family(
                    "llamaswap_memory_used_bytes",
                    "gauge",
                    "Memory in use (total minus available).",
                    [({}, total - available)],
                ),
                family(
                    "llamaswap_memory_free_bytes",
                    "gauge",
                    "Memory available to new work (MemAvailable).",
                    [({}, available)],
                ),
            ]
        if "SwapTotal" in memory:
            swap = memory["SwapTotal"]
            families += [
                family("llamaswap_swap_total_bytes", "gauge", "Swap size.", [({}, swap)]),
                family(
                    "llamaswap_swap_used_bytes",
                    "gauge",
                    "Swap in use.",
                    [({}, swap - memory.get("SwapFree", swap))],
                ),
            ]
        loadavg = (_read(self._proc / "loadavg") or "").split()
        if len(loadavg) >= 3:
            families.append(
                family(
                    "llamaswap_load_average",
                    "gauge",
                    "System load average.",
                    (
                        ({"interval": i}, float(v))
                        for i, v in zip(("1m", "5m", "15m"), loadavg[:3], strict=True)
                    ),
                )
            )
        net = _read(self._proc / "net" / "dev")
        if net is not None:
            families.append(
                family(
                    "llamaswap_network_bytes_total",
                    "counter",
                    "Bytes through each network interface.",
                    (
                        ({"interface": name, "direction": direction}, value)
                        for name, recv, sent in net_bytes(net)
                        for direction, value in (("recv", recv), ("sent", sent))
                    ),
                )
            )
        return families

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

    def _gpu(self) -> Deferred[list[Family]]:
        """The GPU gauges; scrapes arriving during a run share it (one child at a time)."""
        waiter: Deferred[list[Family]] = Deferred()
        if self._gpu_waiters:
            self._gpu_waiters.append(waiter)
            return waiter
        self._gpu_waiters.append(waiter)
        self._gpu_run().addCallback(self._gpu_share)
        return waiter

    def _gpu_share(self, families: list[Family]) -> None:
        waiters, self._gpu_waiters = self._gpu_waiters, []
        for waiter in waiters:
            waiter.callback(families)

    def _gpu_run(self) -> Deferred[list[Family]]:
        assert self._nvidia_smi is not None
        collect = _Collect()
        args = [self._nvidia_smi, f"--query-gpu={GPU_FIELDS}", "--format=csv,noheader,nounits"]
        try:
            IReactorProcess(self._reactor).spawnProcess(
                collect, self._nvidia_smi, args, env=dict(os.environ)
            )
        except OSError as e:
            self._gpu_failure(str(e))
            return succeed([])
        collect.timer = self._clock.callLater(self._gpu_timeout, collect.kill)

        def parsed(out: bytes | None) -> list[Family]:
            if out is None:
                self._gpu_failure("it failed or timed out")
                return []
            return gpu_families(out.decode("utf-8", "replace"))

        return collect.done.addCallback(parsed)

    def _gpu_failure(self, why: str) -> None:
        if not self._gpu_failed:  # once: a scrape every 15 s must not flood the log
            self._gpu_failed = True
            self.log.warn(
                "/metrics: no GPU gauges, {program} failed: {why}",
                program=self._nvidia_smi,
                why=why,
            )


class MetricsResource(JSONResource):
    """C{GET /metrics}: the exposition (see the module docstring)."""

    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> int:
        answer = self._metrics.collect().addCallback(lambda body: (200, CONTENT_TYPE, body))
        return answer_later(request, answer, cancel_if_gone=False)


def build_metrics_resource(
    config: Config, supervisor: StatusSource, events: EventBus, reactor: Any
) -> MetricsResource:
    """The resource mounted at C{/metrics}; GPU gauges if C{nvidia-smi} is on the PATH."""
    nvidia_smi = shutil.which("nvidia-smi") if IReactorProcess.providedBy(reactor) else None
    return MetricsResource(Metrics(config, supervisor, events, reactor, nvidia_smi=nvidia_smi))
