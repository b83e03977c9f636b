# -*- test-case-name: tests.test_scheduler_sim -*-
"""
A deterministic simulator of the swap scheduler: request traces replayed on the
real L{Supervisor<llamaswap.supervisor.Supervisor>}, with fake processes and a
fake clock (L{SimReactor}), so a ten-minute trace takes a second or two.

A model's server answers its health check C{load} seconds after its spawn and
exits C{stop} seconds after SIGTERM. Clients are closed-loop (L{ClosedLoop}:
request, hold the lease, think, pick the next model) or open-loop
(L{OpenLoop}: arrivals on a schedule, whatever happens). Everything random is
seeded, so two runs of a trace give the same L{Report}.

The policy is a config fragment: L{NEW} (the defaults) or L{TODAY} (the
scheduler before issue 11: no request is ever due, no residency, no bounds).
bench/scheduler.py prints the reports as a table; tests/test_scheduler_sim.py
checks the policy's guarantees on them.

This module imports only what an older checkout has too (C{Supervisor},
C{llamaswap.testing.process}), so bench/scheduler.py --tree can run it there.
"""

from __future__ import annotations

import math
import random
import signal
import sys
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from llamaswap.events import EventBus
from llamaswap.supervisor import Lease, Supervisor
from llamaswap.testing.process import FakeChild, FakeHealth, FakeProcessReactor, make_config

# The policies, as the C{queue:} section of a config.
TODAY = "queue: {maxWait: 1000000000, minResidency: 0, timeout: 0, maxLength: 1000000}\n"
NEW = ""
POLICIES = {"today": TODAY, "new": NEW}

DEFAULT_STOP = 0.05  # seconds from SIGTERM to exit
RETRY = 1.0  # a closed-loop client whose request failed waits this long before the next
FIRST_PORT = 39100  # models listen (in name only) on consecutive ports from here
SIM_ARG = "--sim-model"  # in a model's cmd: the name of the model the spawned child serves

# A time span: fixed seconds, or drawn uniformly between two bounds.
Span = float | tuple[float, float]


def draw(span: Span, rng: random.Random) -> float:
    """A value of C{span}: itself if fixed, else uniform between its bounds."""
    if isinstance(span, tuple):
        return rng.uniform(*span)
    return span


# --- traces ---------------------------------------------------------------------------


@frozen
class ModelSpec:
    """A model of a trace: its load and stop times, and extra per-model config lines."""

    name: str
    load: float
    stop: float = DEFAULT_STOP
    yaml: str = ""  # e.g. "maxWait: 10"


@frozen
class ClosedLoop:
    """
    C{count} clients; each sends a request (first at C{start}, drawn per
    client), holds its lease C{duration} seconds, thinks C{think} seconds and
    picks the next model by C{weights}.
    """

    count: int
    weights: tuple[tuple[str, float], ...]
    duration: Span = 1.0
    think: Span = 0.0
    start: Span = 0.0


@frozen
class OpenLoop:
    """
    Arrivals every C{period} seconds (exponential gaps of that mean if
    C{poisson}) from C{start}, each a burst of C{burst} requests C{spacing}
    seconds apart for the next of C{models} in turn, each held C{duration}.
    """

    models: tuple[str, ...]
    period: float
    duration: Span = 1.0
    poisson: bool = False
    start: float = 0.0
    burst: int = 1
    spacing: float = 0.0


@frozen
class Trace:
    name: str
    models: tuple[ModelSpec, ...]
    clients: tuple[ClosedLoop | OpenLoop, ...]


def _models(load: float, *names: str) -> tuple[ModelSpec, ...]:
    return tuple(ModelSpec(name, load) for name in names)


def uniform(load: float = 0.3, duration: Span = 1.0, clients: int = 32) -> Trace:
    """Three models, equal weights, 32 closed-loop clients."""
    weights = (("a", 1.0), ("b", 1.0), ("c", 1.0))
    loop = ClosedLoop(clients, weights, duration, start=(0.0, 1.0))
    return Trace("uniform", _models(load, "a", "b", "c"), (loop,))


def weighted(load: float = 0.3, duration: Span = 1.0, clients: int = 32) -> Trace:
    """Three models, 32 closed-loop clients, each request picks one by weights 70/20/10."""
    weights = (("a", 70.0), ("b", 20.0), ("c", 10.0))
    loop = ClosedLoop(clients, weights, duration, start=(0.0, 1.0))
    return Trace("weighted", _models(load, "a", "b", "c"), (loop,))


def weighted_open(load: float = 0.3, duration: Span = 1.0, rate: float = 3.0) -> Trace:
    """
    70/20/10 as independent arrivals (a server shared by many users and agents):
    Poisson, C{rate} requests per second in all.
    """
    sources = tuple(
        OpenLoop((m,), 1.0 / (rate * share), duration, poisson=True)
        for m, share in (("a", 0.7), ("b", 0.2), ("c", 0.1))
    )
    return Trace("weighted_open", _models(load, "a", "b", "c"), sources)


def weighted_think(load: float = 0.3, duration: Span = 1.0, clients: int = 32) -> Trace:
    """L{weighted} with people at the keyboard: 0-20 s between an answer and the next request."""
    weights = (("a", 70.0), ("b", 20.0), ("c", 10.0))
    loop = ClosedLoop(clients, weights, duration, think=(0.0, 20.0), start=(0.0, 1.0))
    return Trace("weighted_think", _models(load, "a", "b", "c"), (loop,))


def _hot(duration: Span) -> list[ClosedLoop | OpenLoop]:
    """8 clients sending overlapping streams to model a (started a quarter stream apart)."""
    step = (duration[1] if isinstance(duration, tuple) else duration) / 8
    return [ClosedLoop(1, (("a", 1.0),), duration, start=i * step) for i in range(8)]


def hot_rare(load: float = 0.3, duration: Span = 2.0, rare_duration: float = 1.0) -> Trace:
    """8 clients send overlapping 2 s streams to model a; b is asked for every 3 s."""
    rare = OpenLoop(("b",), 3.0, rare_duration, start=1.0)
    return Trace("hot_rare", _models(load, "a", "b"), (*_hot(duration), rare))


def hot_two_rare(load: float = 0.3, duration: Span = 2.0, rare_duration: float = 1.0) -> Trace:
    """L{hot_rare} with a second rare model, c, asked for every 3 s too."""
    rare = [OpenLoop((m,), 3.0, rare_duration, start=t) for m, t in (("b", 1.0), ("c", 1.5))]
    return Trace("hot_two_rare", _models(load, "a", "b", "c"), (*_hot(duration), *rare))


def hot_alone(load: float = 0.3, duration: Span = 2.0) -> Trace:
    """L{hot_rare} without b: the hot model's throughput when it has the server alone."""
    return Trace("hot_alone", _models(load, "a", "b"), tuple(_hot(duration)))


def bursts(load: float = 0.3, duration: Span = 1.0, period: float = 5.0) -> Trace:
    """Every C{period} s a burst of 8 requests 0.1 s apart, for a, then b, then c, in turn."""
    source = OpenLoop(("a", "b", "c"), period, duration, burst=8, spacing=0.1)
    return Trace("bursts", _models(load, "a", "b", "c"), (source,))


TRACES: dict[str, Callable[..., Trace]] = {
    "uniform": uniform,
    "weighted": weighted,
    "weighted_open": weighted_open,
    "weighted_think": weighted_think,
    "hot_rare": hot_rare,
    "hot_two_rare": hot_two_rare,
    "hot_alone": hot_alone,
    "bursts": bursts,
}


def memory_policy(budget_gib: float) -> str:
    """
    Memory admission on one device of C{budget_gib} GiB (declared figures
    only: nothing is measured), each model declaring L{MODEL_GIB}.
    """
    return f"memory: {{source: none, devices: {{0: {budget_gib:g}GiB}}, reserve: 0}}\n"


MODEL_GIB = 20  # what each model declares under a memory policy


def config_text(trace: Trace, policy: str = NEW) -> str:
    """The config of C{trace}'s models under C{policy} (a C{queue:} or C{memory:} fragment)."""
    lines = [policy.rstrip("\n"), "healthCheckTimeout: 3600", "models:"]
    for port, spec in enumerate(trace.models, FIRST_PORT):
        lines += [
            f"  {spec.name}:",
            f"    cmd: {sys.executable} {SIM_ARG} {spec.name}",
            f"    proxy: http://127.0.0.1:{port}",
        ]
        if "memory:" in policy:
            lines.append(f"    memory: {MODEL_GIB}GiB")
        lines += [f"    {line}" for line in spec.yaml.splitlines() if line]
    return "\n".join(lines) + "\n"


# --- the fake servers -------------------------------------------------------------------


class SimReactor(FakeProcessReactor):
    """
    A fake process reactor whose children are model servers: a child's health
    URL answers 200 C{load} seconds after its spawn and is refused again once
    it exits; L{kill} (the supervisor's C{kill}) makes it exit C{stop} seconds
    after SIGTERM, at once on SIGKILL. A child's model is the argument after
    L{SIM_ARG} in its command line.
    """

    def __init__(self, models: Mapping[str, tuple[str, ModelSpec]]) -> None:
        super().__init__()
        self.health = FakeHealth(self)
        self.models = models  # name -> (health URL, spec)
        self.spawns: defaultdict[str, int] = defaultdict(int)
        self._model_of: dict[int, str] = {}  # pid -> model name

    def spawnProcess(self, *args: Any, **kwargs: Any) -> FakeChild:
        child = super().spawnProcess(*args, **kwargs)
        child.dies_on = set()  # only kill() ends it, on its schedule
        name = child.args[child.args.index(SIM_ARG) + 1]
        self._model_of[child.original_pid] = name
        self.spawns[name] += 1
        self.callLater(self.models[name][1].load, self._up, child, name)
        return child

    def _up(self, child: FakeChild, name: str) -> None:
        if not child.exited:
            self.health.set(self.models[name][0], 200)

    def kill(self, pgid: int, sig: int) -> None:
        """The injected C{kill(pgid, sig)}."""
        child = next((c for c in self.children if c.original_pid == pgid), None)
        if child is None or child.ended:
            raise ProcessLookupError(pgid)
        if child.exited:
            return
        child.signals.append(sig)
        if sig == signal.SIGKILL:
            self._die(child, sig)
        elif sig == signal.SIGTERM:
            self.callLater(self.models[self._model_of[pgid]][1].stop, self._die, child, sig)

    def _die(self, child: FakeChild, sig: int) -> None:
        if not child.exited:
            self.health.set(self.models[self._model_of[child.original_pid]][0], "refused")
            child.exit(sig=sig)


# --- requests and clients ---------------------------------------------------------------


class _Request:
    """One request: when it was sent, granted and finished, or how it failed."""

    __slots__ = ("finished", "granted", "model", "sent", "status")

    def __init__(self, model: str, sent: float) -> None:
        self.model = model
        self.sent = sent
        self.granted: float | None = None
        self.finished: float | None = None
        self.status: int | None = None  # the HTTP status of a failure


class _ClosedClient:
    def __init__(self, sim: Simulation, spec: ClosedLoop, rng: random.Random) -> None:
        self._sim = sim
        self._spec = spec
        self._rng = rng
        self._names = [name for name, _ in spec.weights]
        self._weights = [weight for _, weight in spec.weights]
        sim.reactor.callLater(draw(spec.start, rng), self._send)

    def _send(self) -> None:
        model = self._rng.choices(self._names, self._weights)[0]
        self._sim.request(model, draw(self._spec.duration, self._rng)).addCallback(self._done)

    def _done(self, served: bool) -> None:
        pause = draw(self._spec.think, self._rng) + (0.0 if served else RETRY)
        if pause > 0:
            self._sim.reactor.callLater(pause, self._send)
        else:
            self._send()


class _OpenSource:
    def __init__(self, sim: Simulation, spec: OpenLoop, rng: random.Random) -> None:
        self._sim = sim
        self._spec = spec
        self._rng = rng
        self._turn = 0
        sim.reactor.callLater(spec.start, self._arrive)

    def _arrive(self) -> None:
        spec = self._spec
        model = spec.models[self._turn % len(spec.models)]
        self._turn += 1
        for i in range(spec.burst):
            self._sim.reactor.callLater(i * spec.spacing, self._send, model)
        gap = self._rng.expovariate(1 / spec.period) if spec.poisson else spec.period
        self._sim.reactor.callLater(gap, self._arrive)

    def _send(self, model: str) -> None:
        self._sim.request(model, draw(self._spec.duration, self._rng))


# --- reports ----------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank C{q}-quantile (0 < q <= 1) of C{values}; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@frozen
class ModelReport:
    """
    One model's figures. Waits run from acquire to lease, or to the end for
    requests still queued then; C{refused}: failed requests by HTTP status.
    """

    model: str
    starts: int
    requests: int
    granted: int
    completed: int
    queued: int  # still waiting at the end
    throughput: float  # completed per second
    wait_p50: float
    wait_p99: float
    wait_max: float
    refused: Mapping[int, int] = field(factory=dict)


@frozen
class Report:
    """A trace's figures; C{ready}, C{serving}: fractions of the simulated time."""

    trace: str
    seconds: float
    swaps: int  # model starts
    stops: Mapping[tuple[str, str], int]  # (model, reason) -> stops
    ready: float  # some model ready
    serving: float  # some model ready with a request in flight
    requests: int
    granted: int
    completed: int
    throughput: float
    models: tuple[ModelReport, ...]

    def model(self, name: str) -> ModelReport:
        return next(m for m in self.models if m.model == name)

    @property
    def swaps_per_100(self) -> float:
        """Starts per 100 granted requests."""
        return 100.0 * self.swaps / self.granted if self.granted else math.inf


# --- the simulation -------------------------------------------------------------------


class Simulation:
    """One trace on a real supervisor over a L{SimReactor}; L{run} it, then L{report}."""

    def __init__(self, trace: Trace, policy: str = NEW, seed: int = 0) -> None:
        self.trace = trace
        self.config = make_config(config_text(trace, policy))
        self.reactor = SimReactor(self._urls())
        self.events = EventBus()
        self.events.subscribe(self._event)
        self.supervisor = Supervisor(
            self.config,
            reactor=self.reactor,
            events=self.events,
            kill=self.reactor.kill,
            http=self.reactor.health,  # type: ignore[arg-type]
        )
        self.requests: list[_Request] = []
        self.stops: defaultdict[tuple[str, str], int] = defaultdict(int)  # from events
        self._ready = 0.0  # seconds with some model ready
        self._serving = 0.0  # seconds with some model ready and serving
        self._seed = seed

    def _urls(self) -> dict[str, tuple[str, ModelSpec]]:
        return {
            s.name: (self.config.models[s.name].proxy + "/health", s) for s in self.trace.models
        }

    def _event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "modelStatus" and data["state"] == "stopping":
            self.stops[(data["model"], data.get("reason", "?"))] += 1

    def now(self) -> float:
        return self.reactor.seconds()

    def request(self, model: str, duration: float) -> Deferred[bool]:
        """
        Send a request for C{model} that holds its lease C{duration} seconds.

        @return: fires with C{True} once it was served, C{False} if it failed.
        """
        record = _Request(model, self.now())
        self.requests.append(record)
        done: Deferred[bool] = Deferred()
        acquired = self.supervisor.acquire_by_name(model)
        acquired.addCallbacks(
            self._granted,
            self._failed,
            callbackArgs=(record, duration, done),
            errbackArgs=(record, done),
        )
        return done

    def _granted(
        self, lease: Lease, record: _Request, duration: float, done: Deferred[bool]
    ) -> None:
        record.granted = self.now()
        self.reactor.callLater(duration, self._finish, lease, record, done)

    def _finish(self, lease: Lease, record: _Request, done: Deferred[bool]) -> None:
        lease.release()
        record.finished = self.now()
        done.callback(True)

    def _failed(self, failure: Failure, record: _Request, done: Deferred[bool]) -> None:
        record.status = getattr(failure.value, "status", 500)
        done.callback(False)

    def run(self, seconds: float) -> Report:
        """Start the clients and run the clock to C{seconds}, event to event."""
        for index, spec in enumerate(self.trace.clients):
            self._start(index, spec)
        while self.now() < seconds:
            self._step(seconds)
        return self.report()

    def _start(self, index: int, spec: ClosedLoop | OpenLoop) -> None:
        if isinstance(spec, OpenLoop):
            _OpenSource(self, spec, random.Random(f"{self._seed}/{index}"))
            return
        for n in range(spec.count):
            _ClosedClient(self, spec, random.Random(f"{self._seed}/{index}/{n}"))

    def _step(self, end: float) -> None:
        """Run the calls due at the next call's time (or C{end}); count the time till then."""
        now = self.now()
        calls = self.reactor.getDelayedCalls()
        until = min([end, *(c.getTime() for c in calls)])
        statuses = self.supervisor.statuses()
        ready = [s for s in statuses if s.state == "ready"]
        self._ready += (until - now) * bool(ready)
        self._serving += (until - now) * any(s.in_flight > 0 for s in ready)
        self.reactor.rightNow = max(now, until)
        self.reactor.advance(0)

    def report(self) -> Report:
        now = self.now()
        models = tuple(self._model_report(spec.name, now) for spec in self.trace.models)
        done = sum(m.completed for m in models)
        return Report(
            trace=self.trace.name,
            seconds=now,
            swaps=sum(m.starts for m in models),
            stops=self._stops(),
            ready=self._ready / now if now else 0.0,
            serving=self._serving / now if now else 0.0,
            requests=len(self.requests),
            granted=sum(m.granted for m in models),
            completed=done,
            throughput=done / now if now else 0.0,
            models=models,
        )

    def _stops(self) -> dict[tuple[str, str], int]:
        """Stops by model and reason: the supervisor's own count where it keeps one."""
        stats = getattr(self.supervisor, "stats", None)
        if stats is None:
            return dict(self.stops)
        return {key: n for key, n in stats.swaps.items() if key[1] != "request"}

    def _model_report(self, name: str, now: float) -> ModelReport:
        mine = [r for r in self.requests if r.model == name]
        waits = [
            (now if r.granted is None else r.granted) - r.sent for r in mine if r.status is None
        ]
        refused: defaultdict[int, int] = defaultdict(int)
        for r in mine:
            if r.status is not None:
                refused[r.status] += 1
        completed = sum(r.finished is not None for r in mine)
        return ModelReport(
            model=name,
            starts=self.reactor.spawns[name],
            requests=len(mine),
            granted=sum(r.granted is not None for r in mine),
            completed=completed,
            queued=sum(r.granted is None and r.status is None for r in mine),
            throughput=completed / now if now else 0.0,
            wait_p50=percentile(waits, 0.5),
            wait_p99=percentile(waits, 0.99),
            wait_max=max(waits, default=0.0),
            refused=dict(refused),
        )


def simulate(trace: Trace, policy: str = NEW, seconds: float = 600.0, seed: int = 0) -> Report:
    """Run C{trace} under C{policy} for C{seconds} of simulated time."""
    return Simulation(trace, policy, seed).run(seconds)
