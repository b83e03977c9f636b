# -*- test-case-name: tests.test_metrics -*-
"""
The metrics collector: our own series, plus the host's at scrape time.

Our own series are fed by the L{EventBus}: requests by model and status and
their durations (C{"request"} events), model starts, failed starts and load
times (C{"modelStatus"} transitions), plus each model's state, in-flight
count and queue read from the supervisor at scrape time, and the queue's own
counts (waits, refusals, swaps: L{llamaswap.scheduling.QueueStats}). The host's come from
L{llamaswap.metrics.hostinfo}; the text from L{llamaswap.metrics.prometheus}.

Names are not resolved here. A C{"request"} event carries C{"model"} (the
name the client asked for) and C{"target"} (the canonical local model id or
the peer's fqn, as the route resolved it; "" when the name matched nothing).
Requests are counted under C{model=<target>}, so unknown names (a client
asking for anything it likes) all land in C{model=""} and clients cannot
create unbounded series.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from llamaswap.events import EventBus
from llamaswap.metrics.hostinfo import GPU_TIMEOUT, GPUGauges, HostReadings
from llamaswap.metrics.prometheus import Family, exposition, family, histogram, summary
from llamaswap.process.states import State
from llamaswap.scheduling import SWAP_REASONS, WAIT_BUCKETS, QueueStats
from llamaswap.supervisor import ModelStatus, StatusSource

STATES = tuple(state.value for state in State)
# The statuses of refused requests: 429 the queue was full, 503 a queued request timed out.
REFUSED_STATUSES = ("429", "503")


class QueueSource(StatusSource, Protocol):
    """What L{Metrics} reads on the supervisor: the statuses, and the queue's counts."""

    @property
    def stats(self) -> QueueStats: ...


class Metrics:
    """
    Counters fed by C{events}; C{collect()} adds the readings taken now.

    C{proc}: where C{/proc} is (tests use a fake tree). C{nvidia_smi}: the
    program to run for GPU gauges (C{reactor} must then provide
    L{IReactorProcess}), or None for no GPU gauges; a run taking longer than
    C{gpu_timeout} seconds is killed.
    """

    def __init__(
        self,
        supervisor: QueueSource,
        events: EventBus,
        reactor: IReactorTime,
        *,
        proc: str = "/proc",
        nvidia_smi: str | None = None,
        gpu_timeout: float = GPU_TIMEOUT,
    ) -> None:
        self._supervisor = supervisor
        self._clock = reactor
        self._host = HostReadings(proc)
        self._gpu = None if nvidia_smi is None else GPUGauges(nvidia_smi, reactor, gpu_timeout)
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.durations: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.starts: defaultdict[str, int] = defaultdict(int)
        self.failures: defaultdict[str, int] = defaultdict(int)
        self.loads: defaultdict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self._states: dict[str, str] = {}
        self._starting_since: dict[str, float] = {}
        events.subscribe(self._event)

    # --- events --------------------------------------------------------------------

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "request":
            target = data.get("target", "")
            model = target if isinstance(target, str) else ""
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
        statuses = self._supervisor.statuses()
        families = [
            *self._request_families(),
            *self._model_families(statuses),
            *self._queue_families(statuses, self._supervisor.stats),
            *memory_families(statuses, self._supervisor.memory_summary()),
            *self._host.families(),
        ]
        if self._gpu is None:
            return succeed(exposition(families))
        return self._gpu.families().addCallback(lambda more: exposition(families + more))

    def _request_families(self) -> list[Family]:
        """The request series, fed by C{"request"} events."""
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
        ]

    def _model_families(self, statuses: list[ModelStatus]) -> list[Family]:
        """Each configured model's series: state and in-flight now, starts, failures, loads."""
        models = [s.model_id for s in statuses]
        return [
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

    def _queue_families(self, statuses: list[ModelStatus], stats: QueueStats) -> list[Family]:
        """
        The queue's series: its length and oldest wait now (from the statuses),
        the waits, refusals and swaps so far (from C{stats}). Every configured
        model has its series from the start (zeros), so rates work from the
        first event; a model only C{stats} knows comes after them.
        """
        models = [s.model_id for s in statuses]
        waited = models + sorted(set(stats.wait_buckets) - set(models))
        swaps = [(m, r) for m in models for r in SWAP_REASONS]
        swaps += sorted(set(stats.swaps) - set(swaps))
        refused = [(m, s) for m in models for s in REFUSED_STATUSES]
        counted = {(m, str(s)): n for (m, s), n in stats.refused.items()}
        refused += sorted(set(counted) - set(refused))
        empty = [0] * (len(WAIT_BUCKETS) + 1)
        return [
            family(
                "llamaswap_queue_length",
                "gauge",
                "Requests waiting in the queue for each model now.",
                (({"model": s.model_id}, s.queued) for s in statuses),
            ),
            family(
                "llamaswap_queue_oldest_wait_seconds",
                "gauge",
                "How long the oldest request waiting for each model has waited (0: none waits).",
                (({"model": s.model_id}, round(s.oldest_wait or 0.0, 3)) for s in statuses),
            ),
            histogram(
                "llamaswap_queue_wait_seconds",
                "Time from a request's arrival to its lease on a ready model, by model "
                "(0 for one served at once); refused requests are not counted.",
                WAIT_BUCKETS,
                ((m, stats.wait_buckets.get(m, empty), stats.wait_sum.get(m, 0.0)) for m in waited),
            ),
            family(
                "llamaswap_model_swaps_total",
                "counter",
                "Model starts (reason request) and stops by cause (evict: to make room for "
                "another, ttl, unload, exit: the server exited, shutdown, failed: its start "
                "timed out).",
                (({"model": m, "reason": r}, stats.swaps.get((m, r), 0)) for m, r in swaps),
            ),
            family(
                "llamaswap_queue_refused_total",
                "counter",
                "Requests the queue refused, by model and status (429: the queue was full; "
                "503: the request waited queue.timeout).",
                (({"model": m, "status": s}, counted.get((m, s), 0)) for m, s in refused),
            ),
        ]


def memory_families(statuses: list[ModelStatus], summary: dict[str, Any] | None) -> list[Family]:
    """Memory admission's series (none when it is off): budgets, and declared vs measured."""
    if summary is None:
        return []
    figures = [
        ({"model": s.model_id, "device": device, "source": source}, size)
        for s in statuses
        if s.memory is not None
        for source in ("declared", "measured", "holds")
        for device, size in sorted((s.memory.get(source) or {}).items())
    ]
    devices = summary["devices"]
    return [
        family(
            "llamaswap_model_memory_bytes",
            "gauge",
            "Each model's memory by device: declared in the config, measured at its last load "
            "(device * for a model placed with ${GPU}), and what it holds now (source holds).",
            figures,
        ),
        family(
            "llamaswap_memory_budget_bytes",
            "gauge",
            "Each device's budget for models: its memory less memory.reserve.",
            (({"device": d["device"]}, d["budget"]) for d in devices),
        ),
        family(
            "llamaswap_memory_allocated_bytes",
            "gauge",
            "What the models that run now hold on each device, by memory admission's book.",
            (({"device": d["device"]}, d["allocated"]) for d in devices),
        ),
        family(
            "llamaswap_memory_gate_waits_total",
            "counter",
            "Starts that waited for a stopped server's memory to come back.",
            [({}, summary["gateWaits"])],
        ),
        family(
            "llamaswap_memory_gate_timeouts_total",
            "counter",
            "Starts that went ahead after memory.releaseTimeout without the memory back.",
            [({}, summary["gateTimeouts"])],
        ),
    ]
