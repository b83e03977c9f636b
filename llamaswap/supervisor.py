# -*- test-case-name: tests.test_supervisor -*-
"""
The swap scheduler: decides which model servers run, and hands out leases.

The rules (docs/swapping.md has the long version, and the figures behind them):

 - A request names a model (id, alias or C{profile:model}). It may run
   together with the models of its I{allowed set} (L{may_run_with}): for a
   plain name, what the groups allow (with no groups: only itself); for
   C{profile:model}, the profile's members and persistent groups' members.
   Everything else that runs must be stopped first. With a C{matrix}, the
   allowed set of a plain name depends on what runs: L{Matrix.solve} picks it
   again on every walk of the queue (nothing if the model already runs).
 - A model with requests in flight is never stopped to make room: the swap
   waits until they end.
 - Requests wait in one queue. A request for a model that is ready, needs
   nothing stopped and is within its concurrency limits is served at once,
   unless a I{due} request (one that waited its C{maxWait}) needs that model
   stopped; then it queues behind it, the model drains and the swap happens.
   A model that just became ready is exempt for its C{minResidency}, and
   what queued for a load is served by it (L{llamaswap.scheduling}).
 - Swaps go in arrival order, due requests first (earliest deadline first);
   during its residency an idle model is kept a moment for its next request
   before waiters that are not due may stop it (L{kept_until}).
 - With memory admission (L{llamaswap.memory}), a model must also fit in its
   devices' budgets beside what keeps running: idle models are stopped for it,
   least recently used first (never a busy one), a request waiting for memory
   reserves it from later ones, and a start waits at the memory gate until
   the memory it was promised is free.
 - Waiters for the same model share one start; a failed start fails every
   waiter for that model, and the next request retries.
 - The queue is bounded in length (C{queue.maxLength}: 429 beyond) and in
   time (C{queue.timeout}: 503 after it).

The queue is re-walked whenever anything changes (a model's state, a lease
released, a waiter added, cancelled or timed out, a waiter becoming due, an
idle hold ending); one walk never waits.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from attrs import frozen
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.config import DEFAULT_GROUP_ID, Config, ConfigError, ModelConfig
from llamaswap.config.diff import ConfigDiff, diff_configs, restart_only
from llamaswap.config.matrix import Decision
from llamaswap.config.schema import ApiKey
from llamaswap.errors import ModelNotFound, ModelTooLarge, QueueFull, QueueTimeout, ShuttingDown
from llamaswap.events import EventBus
from llamaswap.memory.admission import BUSY, IDLE, STOPPING, Holder, Plan
from llamaswap.memory.ledger import MemoryLedger, make_probe
from llamaswap.memory.probe import Probe
from llamaswap.names import LocalTarget, Resolver, Target
from llamaswap.process.model import ModelProcess
from llamaswap.process.states import State
from llamaswap.scheduling import (
    QueueStats,
    Waiter,
    conflict,
    held_back,
    kept_until,
    resident,
    walk_order,
)

if TYPE_CHECKING:
    from twisted.web.http_headers import Headers

# How long a request whose connection was refused waits for the supervisor to
# notice its server's exit (normally a few ms: the kernel closes the server's
# sockets just before it tells us about the exit) before trying once more.
REFUSED_WAIT = 0.5


@frozen(kw_only=True)
class ModelStatus:
    """A snapshot of one configured model, for C{/running} and the UI."""

    model_id: str
    state: State  # a str enum: compares equal to, and is written in JSON as, "ready" etc.
    pid: int | None
    in_flight: int
    ttl: int
    ttl_remaining: float | None  # seconds until the TTL unload, None if not applicable
    last_error: str | None
    queued: int = 0  # requests waiting in the queue for this model
    oldest_wait: float | None = None  # seconds the oldest of them has waited
    stop_reason: str | None = None  # while stopping: evict, ttl, unload, exit, shutdown, failed
    memory: Mapping[str, Any] | None = None  # declared, measured, holds (memory admission on)


class StatusSource(Protocol):
    """What the read-only views (C{/api/events}, C{/metrics}) call on the supervisor."""

    def statuses(self) -> list[ModelStatus]: ...

    def memory_summary(self) -> dict[str, Any] | None:
        """Memory admission's devices and gate counts, None when it is off."""


class Lease:
    """The right to send requests to a ready model until L{release}."""

    def __init__(
        self,
        model: ModelConfig,
        target: Target,
        release: Callable[[], None],
        refused: Callable[[], Deferred[None]] | None = None,
    ) -> None:
        self.model = model
        self.target = target
        self.url = model.proxy
        self._release: Callable[[], None] | None = release
        self._refused = refused

    def authorize(self, headers: Headers) -> None:
        """
        Set the credentials of the request sent on this lease, in C{headers}:
        none for our own servers (the client's pass through as they are).
        """

    def release(self) -> None:
        """End this lease (idempotent): the in-flight count drops, the TTL starts."""
        release, self._release = self._release, None
        if release is not None:
            release()

    def connection_refused(self) -> Deferred[bool]:
        """
        Report that the server refused a connection (so nothing was sent).

        A server that just crashed refuses connections a moment before the
        supervisor has reaped it and marked the model stopped; a new lease
        taken in that moment would be on the dead server again.

        @return: a Deferred that fires with C{True} once it is worth releasing
            this lease and acquiring a new one (once): when the model has left
            the state it was in when the lease was granted (its exit noticed:
            the next acquire starts it again), or after L{REFUSED_WAIT}
            seconds if it is still ready (a server that is alive but not
            listening yet). C{False} at once if this lease is not on a server
            the supervisor runs. Cancelling it stops the wait.
        """
        if self._refused is None:
            return succeed(False)
        return self._refused().addCallback(lambda _: True)


def may_run_with(names: Resolver, target: LocalTarget) -> frozenset[str]:
    """
    The models that may keep running while C{target}'s model is loaded (its
    own id included); loading it stops every other.

    For a plain name, llama-swap's group rule, with T's group G: a member of G
    is stopped if G swaps; a member of another group H is stopped if G is
    exclusive and H is not persistent. Models in no group form a default group
    that swaps and is exclusive, so with no groups only T itself may run;
    with memory admission on, that default group neither swaps nor is
    exclusive: the budget decides.

    For C{profile:model} (seed profiles): the profile's members, plus the
    members of persistent groups (which nothing but their own group stops).
    """
    config = names.config
    persistent = {m for group in config.groups.values() if group.persistent for m in group.members}
    if target.profile is not None:
        return frozenset(config.profiles[target.profile]) | persistent
    group = names.group_of(target.model_id)
    swap, exclusive = group.swap, group.exclusive
    if config.memory is not None and group.id == DEFAULT_GROUP_ID:
        swap = exclusive = False  # models in no group run together while memory allows
    allowed = {target.model_id}
    for model_id in config.models:
        other = names.group_of(model_id)
        if other.id == group.id:
            if not swap:
                allowed.add(model_id)
        elif not exclusive or other.persistent:
            allowed.add(model_id)
    return frozenset(allowed)


class Supervisor(Service):
    """
    Starts, stops and swaps model servers; see the module docstring and
    docs/swapping.md for the rules.
    """

    log = Logger()

    def __init__(
        self,
        config: Config,
        *,
        reactor: Any,
        events: EventBus | None = None,
        clock: IReactorTime | None = None,
        kill: Callable[[int, int], None] | None = None,
        http: HTTPClient | None = None,
        memory_probe: Probe | None = None,
    ) -> None:
        """
        @param memory_probe: where device memory is read (memory admission);
            by default the source C{memory.source} names.
        @raise ConfigError: memory admission is on and its budgets cannot be
            read, or a declared figure exceeds its device's budget.
        """
        self.config = config
        self.names = Resolver(config)
        self._reactor = reactor
        self._events = events if events is not None else EventBus()
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._pool: Any = None
        if http is None:
            from llamaswap.http import make_http
            from llamaswap.process.health import PROBE_TIMEOUT

            http, self._pool = make_http(reactor, persistent=False, connect_timeout=PROBE_TIMEOUT)
        self.memory: MemoryLedger | None = None
        if config.memory is not None:
            probe = memory_probe if memory_probe is not None else make_probe(config.memory, reactor)
            self.memory = MemoryLedger(config.memory, config.models, probe=probe, clock=self._clock)
        self._kill = kill if kill is not None else os.killpg
        self._http = http
        self._procs: dict[str, ModelProcess] = {
            model_id: self._process(model) for model_id, model in config.models.items()
        }
        # After a reload: models whose server must go once idle, with the settings for
        # their next start (None: the model was removed).
        self._retiring: dict[str, ModelConfig | None] = {}
        self._queue: list[Waiter] = []
        self._arrivals = 0  # numbers the waiters: ties go to the earlier
        self._in_flight = 0  # leases held on local models, for queue.concurrencyLimit
        self._key_in_flight: Counter[ApiKey] = Counter()  # for each key's concurrencyLimit
        self._wake: IDelayedCall | None = None  # the next walk a clock time calls for
        self._requeued: set[str] = set()  # models whose queue changed since the last event
        self.stats = QueueStats()
        # may_run_with() per (profile, model id), computed on first use.
        self._allowed: dict[tuple[str | None, str], frozenset[str]] = {}
        self._all_models = frozenset(config.models)
        # Targets whose matrix decision was logged (at their swap's first step).
        self._announced: set[str] = set()
        self._shutting_down = False
        self._walking = False
        self._walk_again = False
        self._preloading: Deferred[None] | None = None

    def _process(self, model: ModelConfig) -> ModelProcess:
        return ModelProcess(
            model,
            reactor=self._reactor,
            clock=self._clock,
            kill=self._kill,
            http=self._http,
            base_dir=self.config.base_dir,
            health_timeout=self.config.health_check_timeout,
            on_change=self._changed,
        )

    # --- service -----------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        if self.config.preload:
            self._preloading = Deferred.fromCoroutine(self._preload())

    async def _preload(self) -> None:
        for model_id in self.config.preload:
            try:
                lease = await self.acquire_by_name(model_id)
            except ShuttingDown:
                return
            except Exception as e:
                self.log.error("preloading {model} failed: {error}", model=model_id, error=str(e))
            else:
                self.log.info("preloaded {model}", model=model_id)
                lease.release()

    def stopService(self) -> Deferred[None]:
        """
        Stop every model (SIGTERM, then SIGKILL after its C{unloadTimeout}).

        @return: a Deferred that fires once every child has been reaped and
            closed its pipes. From now on L{acquire} fails with L{ShuttingDown},
            and so do the requests still queued.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        self.drain()
        stops = [proc.stop(reason="shutdown") for proc in self._procs.values()]

        async def wait() -> None:
            await DeferredList(stops, consumeErrors=True)
            if self.memory is not None:
                await self.memory.settled()  # no nvidia-smi left running
            if self._pool is not None:
                await self._pool.closeCachedConnections()

        return Deferred.fromCoroutine(wait())

    def drain(self) -> None:
        """
        A stop began: queued requests fail with 503 and new ones are refused;
        leases held go on (L{llamaswap.lifecycle.shutdown}).
        """
        self._shutting_down = True
        queued, self._queue = self._queue, []
        if self._wake is not None and self._wake.active():
            self._wake.cancel()
        for waiter in queued:
            if not waiter.done:
                waiter.finish()
                waiter.deferred.errback(ShuttingDown("llamaswap is shutting down"))

    def hurry(self) -> None:
        """Stopping at once (a second signal): every server still running is killed now."""
        for proc in self._procs.values():
            proc.hurry()

    # --- API -----------------------------------------------------------------

    def acquire(self, target: LocalTarget, *, api_key: ApiKey | None = None) -> Deferred[Lease]:
        """
        Get a lease on a ready model for C{target} (what the request's name
        resolved to: L{llamaswap.names}), starting or swapping models as needed.
        C{api_key}: the API key it came with: its C{priority} orders it among queued
        requests that are not due, its C{concurrencyLimit} bounds its leases.

        @return: a Deferred that fires with a L{Lease} (call its C{release()}
            when the request ends). It errbacks with L{StartFailed} (with the
            child's last output lines), L{HealthTimeout}, L{QueueFull} (at once,
            with the queue at C{queue.maxLength}), L{QueueTimeout} (after
            C{queue.timeout} seconds in the queue) or L{ShuttingDown}.
            Cancelling it withdraws the request; a start it caused carries on,
            but a request cancelled while still queued starts nothing.
        """
        if self._shutting_down:
            return fail(ShuttingDown("llamaswap is shutting down"))
        model = target.model
        if self.memory is not None and (refusal := self.memory.refusal(model)) is not None:
            return fail(ModelTooLarge(refusal))
        names_key = (target.profile, model.id)
        allowed = self._allowed.get(names_key)
        if allowed is None:
            allowed = self._allowed[names_key] = may_run_with(self.names, target)
        proc = self._procs[model.id]
        if (
            proc.state is State.READY
            and model.id not in self._retiring
            and self.config.matrix is None
            and all(w.done for w in self._queue)
            and self._slot_free(proc, api_key)
            and not self._must_stop(allowed)
        ):
            # What a walk of a queue holding only this waiter would do: grant at once.
            # (A walk leaves everything else as it was: it ran after the last change.)
            self._queue = []
            self.stats.waited(model.id, 0.0)
            return succeed(self._lease(model, target, proc, api_key))
        live = [w for w in self._queue if not w.done]
        if len(live) >= self.config.queue.max_length:
            self.stats.refused[(model.id, QueueFull.status)] += 1
            oldest = self._clock.seconds() - min(w.since for w in live)
            return fail(
                QueueFull(
                    f"the request queue is full ({len(live)} requests wait; queue.maxLength)",
                    retry_after=retry_after(oldest),
                )
            )
        self._arrivals += 1
        waiter = Waiter(
            target, allowed, self._clock.seconds(), self._arrivals, self._withdraw, api_key
        )
        timeout = self.config.queue.timeout
        if timeout > 0:
            waiter.timer = self._clock.callLater(timeout, self._expire, waiter)
        self._queue.append(waiter)
        self._queued_changed(model.id)
        self._walk()
        return waiter.deferred

    def check_reload(self, new: Config) -> None:
        """
        @raise ConfigError: C{new} cannot replace the running config (a setting
            only a restart changes, or a declared memory figure too large).
        """
        why = restart_only(self.config, new)
        if why is not None:
            raise ConfigError(why)
        if self.memory is not None:
            self.memory.check_models(new.models)

    def reload(self, new: Config) -> ConfigDiff:
        """
        Switch to C{new} (checked by L{check_reload}), model by model:
        unchanged models are not touched; new ones are available at once;
        settings that need no restart apply at once; a model whose server
        changed (or that was removed) takes no new requests, finishes those in
        flight, then stops, and its next request starts the new server.
        Requests queued for a removed model fail with 404.
        """
        diff = diff_configs(self.config, new)
        self.config = new
        self.names = Resolver(new)
        self._allowed.clear()
        self._all_models = frozenset(new.models)
        for model_id in diff.added:
            retiring = model_id in self._retiring  # removed earlier, back before it stopped
            if retiring:
                self._retiring[model_id] = new.models[model_id]
            else:
                self._procs[model_id] = self._process(new.models[model_id])
        for model_id in diff.updated + diff.unchanged + diff.restarted:
            proc, model = self._procs[model_id], new.models[model_id]
            if model_id in self._retiring or (model_id in diff.restarted and proc.occupied):
                self._retiring[model_id] = model  # for the next server: this one goes
            else:
                proc.reconfigure(model, new.health_check_timeout)
        for model_id in diff.removed:
            if self._procs[model_id].occupied:
                self._retiring[model_id] = None
            else:
                del self._procs[model_id]
        changes = ", ".join(f"{k}: {' '.join(v)}" for k, v in diff.summary().items() if v)
        self.log.info(
            "config reloaded from {source} ({changes})",
            source=new.source,
            changes=changes or "no model changed",
        )
        for model_id in diff.removed:
            gone = ModelNotFound(f"model not found: {model_id} (removed by a config reload)")
            self._fail_waiters(model_id, gone)
        self._walk()
        return diff

    def acquire_by_name(self, requested: str) -> Deferred[Lease]:
        """
        L{acquire} for a local name (an id, an alias or C{profile:model}), for
        preloading and callers without a resolved target.

        @return: as L{acquire}'s, or a Deferred that errbacks with
            L{ModelNotFound} for a name that names no local model.
        """
        try:
            target = self.names.local(requested)
        except ModelNotFound as e:
            return fail(e)
        return self.acquire(target)

    def unload(self, model_id: str | None = None) -> Deferred[None]:
        """
        Stop one model (id or alias), or all of them for C{None}, without
        waiting for requests in flight.

        @return: a Deferred that fires once the process(es) exited; it
            errbacks with L{ModelNotFound} for an unknown name.
        """
        if model_id is None:
            procs = list(self._procs.values())
        else:
            model = self.names.find_model(model_id)
            if model is None:
                return fail(ModelNotFound(f"model not found: {model_id}"))
            procs = [self._procs[model.id]]
        stops = [proc.stop() for proc in procs]
        if not stops:
            return succeed(None)
        return DeferredList(stops, consumeErrors=True).addCallback(lambda _: None)

    def statuses(self) -> list[ModelStatus]:
        """
        One status per configured model, in config order, then the models a
        reload removed whose servers still run.
        """
        return [self.status(model_id) for model_id in self._procs]

    def memory_summary(self) -> dict[str, Any] | None:
        if self.memory is None:
            return None
        return {
            "devices": self.memory.devices_view(),
            "gateWaits": self.memory.gate_waits,
            "gateTimeouts": self.memory.gate_timeouts,
            "gateSeconds": round(self.memory.gate_seconds, 3),
        }

    def status(self, model_id: str) -> ModelStatus:
        """
        The status of one model.

        @raise ModelNotFound: for an unknown id (aliases are accepted too).
        """
        proc = self._procs.get(model_id)
        if proc is None:
            found = self.names.find_model(model_id)
            if found is None:
                raise ModelNotFound(f"model not found: {model_id}")
            proc = self._procs[found.id]
        model = proc.model
        waiting = [w.since for w in self._queue if not w.done and w.model.id == model.id]
        return ModelStatus(
            model_id=model.id,
            state=proc.state,
            pid=proc.pid,
            in_flight=proc.in_flight,
            ttl=model.ttl,
            ttl_remaining=proc.ttl_remaining(),
            last_error=proc.last_error,
            queued=len(waiting),
            oldest_wait=self._clock.seconds() - min(waiting) if waiting else None,
            stop_reason=proc.stop_reason if proc.state is State.STOPPING else None,
            memory=None if self.memory is None else self.memory.model_view(model),
        )

    def position(self, acquired: Deferred[Lease]) -> tuple[int, int] | None:
        """
        Where the request that C{acquire} answered with C{acquired} stands:
        C{(requests ahead of it, requests queued)} for a waiter, C{None} once it
        left the queue (served, failed, withdrawn) or if it never queued.
        """
        now = self._clock.seconds()
        live = walk_order([w for w in self._queue if not w.done], now)
        for ahead, waiter in enumerate(live):
            if waiter.deferred is acquired:
                return ahead, len(live)
        return None

    # --- scheduling ----------------------------------------------------------

    def _changed(self, proc: ModelProcess) -> None:
        event: dict[str, Any] = {"model": proc.model.id, "state": proc.state.value, "pid": proc.pid}
        if proc.state is State.STARTING:
            self.stats.swaps[(proc.model.id, "request")] += 1
        elif proc.state is State.STOPPING:
            event["reason"] = proc.stop_reason
            self.stats.swaps[(proc.model.id, proc.stop_reason or "unload")] += 1
        if self.memory is not None and not proc.occupied:
            self.memory.ended(proc.model.id)
        if not proc.occupied and proc.model.id in self._retiring:
            self._retired(proc)
        self._events.publish("modelStatus", event)
        self._walk()
        if self.memory is not None and proc.state is State.READY:
            # After the walk: what queued for this load is served by it, whatever it measures.
            self.memory.ready(proc.model).addCallback(self._measured, proc)

    def _retired(self, proc: ModelProcess) -> None:
        """A changed model's old server ended: the new settings apply; a removed model goes."""
        model_id = proc.model.id
        pending = self._retiring.pop(model_id)
        if pending is None:
            del self._procs[model_id]
        else:
            proc.reconfigure(pending, self.config.health_check_timeout)

    def _measured(self, _: None, proc: ModelProcess) -> None:
        """A ready server was measured: what it holds changed, and it may be refused from now."""
        assert self.memory is not None
        refusal = self.memory.refusal(proc.model)
        if refusal is not None:
            self._fail_waiters(proc.model.id, ModelTooLarge(refusal))
        self._walk()

    def _queued_changed(self, model_id: str) -> None:
        """Note that C{model_id}'s queue grew or shrank; the walk that follows tells the views."""
        self._requeued.add(model_id)

    def _publish_queues(self) -> None:
        """One C{queue} event per model whose queue changed, however many waiters moved."""
        if not self._requeued:
            return
        changed, self._requeued = self._requeued, set()
        queued = Counter(w.model.id for w in self._queue if not w.done)
        for model_id in sorted(changed):
            self._events.publish("queue", {"model": model_id, "queued": queued[model_id]})

    def _withdraw(self, waiter: Waiter) -> None:
        """The caller cancelled: forget the waiter (its Deferred gets CancelledError)."""
        if not waiter.done:
            waiter.finish()
            self._queued_changed(waiter.model.id)
            self._walk()

    def _expire(self, waiter: Waiter) -> None:
        """C{queue.timeout} passed: the waiter fails with 503."""
        waiter.timer = None
        if waiter.done:
            return
        waiter.finish()
        self.stats.refused[(waiter.model.id, QueueTimeout.status)] += 1
        waited = self._clock.seconds() - waiter.since
        self.log.warn(
            "a request for {model} waited {seconds:.0f}s in the queue: gave up (queue.timeout)",
            model=waiter.model.id,
            seconds=waited,
        )
        waiter.deferred.errback(
            QueueTimeout(
                f"model {waiter.model.id} could not be served within {waited:.0f} s "
                "(queue.timeout); the server is busy with other models",
                retry_after=retry_after(waited),
            )
        )
        self._queued_changed(waiter.model.id)
        self._walk()

    def _must_stop(self, allowed: frozenset[str]) -> list[ModelProcess]:
        """The models that run (or start, or stop) outside C{allowed}."""
        return [p for m, p in self._procs.items() if p.occupied and m not in allowed]

    def _slot_free(self, proc: ModelProcess, api_key: ApiKey | None = None) -> bool:
        """Whether a lease on C{proc} (for C{api_key}) stays within the concurrency limits."""
        limit = proc.model.concurrency_limit
        total = self.config.queue.concurrency_limit
        if api_key is not None and api_key.concurrency_limit:
            if self._key_in_flight[api_key] >= api_key.concurrency_limit:
                return False
        return (limit == 0 or proc.in_flight < limit) and (total == 0 or self._in_flight < total)

    def _walk(self) -> None:
        """Re-examine the queue in order; re-entrant calls just ask for another pass."""
        if self._walking:
            self._walk_again = True
            return
        if self._retiring:
            self._retire_idle()
        if not self._queue:
            self._announced.clear()  # all that a walk of an empty queue does
            if self._wake is not None:
                self._wake_at(math.inf)
            return
        self._walking = True
        try:
            while True:
                self._walk_again = False
                wake = self._walk_once()
                if not self._walk_again:
                    break
        finally:
            self._walking = False
        self._wake_at(wake)
        # After the walk: leases granted in it count in flight by now.
        self._publish_queues()

    def _retire_idle(self) -> None:
        """After a reload: stop the changed or removed models' old servers once they are idle."""
        for model_id in list(self._retiring):  # a stop may end at once, and leave it
            proc = self._procs[model_id]
            if proc.state is State.READY and proc.in_flight == 0:
                self.log.info("{model}: its settings changed; stopping its server", model=model_id)
                proc.stop(reason="reload")

    def _wake_at(self, when: float) -> None:
        """Walk again at clock time C{when} (inf: no walk is due at any time)."""
        timer = self._wake
        if timer is not None and timer.active():
            if timer.getTime() == when:
                return
            timer.cancel()
        self._wake = None
        if math.isfinite(when) and not self._shutting_down:
            self._wake = self._clock.callLater(max(0.0, when - self._clock.seconds()), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._walk()

    def _walk_once(self) -> float:
        """
        One pass over the queue: grant what may be granted, take the next step
        of each swap that may go on.

        @return: the clock time at which the queue must be walked again even if
            nothing happens (a waiter becomes due, an idle hold ends), or inf.
        """
        now = self._clock.seconds()
        self._queue = [w for w in self._queue if not w.done]
        self._announced &= {w.model.id for w in self._queue}
        order = walk_order(self._queue, now)
        wake = math.inf
        # Grants first, so that a swap never stops a model its queued requests were
        # about to be served by (collation).
        barriers: list[Waiter] = []  # due waiters not served
        decisions: dict[tuple[str, tuple[str, ...]], Decision] = {}
        for waiter in order:
            if waiter.done:
                continue  # served or failed by something this walk triggered
            if self.config.matrix is not None and waiter.target.profile is None:
                self._decide(waiter, decisions)
            proc = self._procs[waiter.model.id]
            if (
                proc.state is State.READY
                and waiter.model.id not in self._retiring
                and self._slot_free(proc, waiter.api_key)
                and not self._must_stop(waiter.allowed)
                and (
                    not held_back(waiter, barriers)
                    or resident(waiter, proc.ready_at, proc.model.min_residency, now)
                )
            ):
                self._grant(waiter, proc, now)
            elif waiter.due(now):
                waiter.victims = self._memory_victims(waiter, proc)
                barriers.append(waiter)
        # Then one step for each swap, in the same order; a wish that conflicts with
        # an earlier one waits for it (distinct wishes only).
        blocked: dict[tuple[str, frozenset[str]], bool] = {}
        reserved: Counter[str] = Counter()  # memory that earlier waiters wait for, by device
        for waiter in order:
            if waiter.done:
                continue
            if self.config.matrix is not None and waiter.target.profile is None:
                self._decide(waiter, decisions)
            proc = self._procs[waiter.model.id]
            evict = self._must_stop(waiter.allowed)
            if proc.state is State.READY and not evict:
                continue  # waits for a slot, or behind a due request
            key = waiter.key
            if key in blocked:
                continue  # the first waiter with this wish took the step for all
            blocked[key] = clash = any(conflict(key, other) for other in blocked)
            if clash:
                continue
            plan = None
            if self.memory is not None and not proc.occupied:
                plan = self.memory.plan(proc.model, self._holders(proc, evict), reserved)
                if plan is None or (reserved and plan.victims):
                    blocked[key] = True  # the memory goes to an earlier request first
                    continue
                evict = evict + [self._procs[m] for m in plan.victims]
            wake = min(wake, self._advance(waiter, proc, evict, waiter.due(now), now, plan))
            if plan is not None and not proc.occupied:
                reserved.update(plan.devices)  # not started yet: later requests leave it room
        # A waiter that becomes due changes what the next walk may do.
        return min([wake, *(w.due_at for w in order if not w.done and not w.due(now))])

    def _holders(self, proc: ModelProcess, evict: list[ModelProcess]) -> list[Holder]:
        """What the models that stay (not C{proc}, not in C{evict}) hold, for memory admission."""
        assert self.memory is not None
        holders = []
        for model_id, usage in self.memory.holding.items():
            other = self._procs[model_id]
            if other is proc or other in evict or not other.occupied:
                continue
            if other.state is State.STOPPING:
                stage = STOPPING
            elif other.state is State.READY and other.in_flight == 0:
                stage = IDLE
            else:
                stage = BUSY
            holders.append(Holder(model_id, usage, stage, other.idle_since))
        return holders

    def _memory_victims(self, waiter: Waiter, proc: ModelProcess) -> frozenset[str]:
        """The models a due waiter's start would stop for memory (none if it needs none)."""
        if self.memory is None or proc.occupied:
            return frozenset()
        evict = self._must_stop(waiter.allowed)
        plan = self.memory.plan(proc.model, self._holders(proc, evict), {})
        return frozenset() if plan is None else frozenset(plan.victims)

    def _decide(
        self, waiter: Waiter, decisions: dict[tuple[str, tuple[str, ...]], Decision]
    ) -> None:
        """Matrix: set C{waiter}'s allowed set from what runs now (stopping models excluded)."""
        assert self.config.matrix is not None
        running = tuple(
            m
            for m, p in self._procs.items()
            if p.occupied and p.state is not State.STOPPING and m in self.config.models
        )
        key = (waiter.model.id, running)
        decision = decisions.get(key)
        if decision is None:
            decision = decisions[key] = self.config.matrix.solve(waiter.model.id, running)
        waiter.decision = decision
        waiter.allowed = self._all_models if decision.keep is None else decision.keep

    def _announce(self, waiter: Waiter) -> None:
        """Log the matrix's decision once per swap, at its first step."""
        if waiter.decision is not None and waiter.model.id not in self._announced:
            self._announced.add(waiter.model.id)
            decision = waiter.decision
            self.log.info(
                "matrix: model={model} set={set} evict=[{evict}] cost={cost}",
                model=decision.model,
                set=decision.set or "(none)",
                evict=", ".join(decision.evict),
                cost=decision.cost,
            )

    def _advance(
        self,
        waiter: Waiter,
        proc: ModelProcess,
        evict: list[ModelProcess],
        due: bool,
        now: float,
        plan: Plan | None = None,
    ) -> float:
        """
        Take the next step towards serving C{waiter}; never waits.

        @return: when to look again if only time can let it go on (an idle
            model's hold), else inf (a state change or a release walks again).
        """
        if evict:
            # Never stop a model that is serving; a starting one is let finish
            # (someone who left may have started it) and stopped once ready.
            if any(p.in_flight > 0 or p.state is State.STARTING for p in evict):
                return math.inf
            if not due:
                # A model in its residency is kept a while for its next request.
                waiting = sum(1 for w in self._queue if not w.done and w.key == waiter.key)
                until = max(
                    (
                        kept_until(
                            p.ready_at,
                            p.model.min_residency,
                            p.idle_since,
                            p.load_seconds,
                            waiting,
                        )
                        for p in evict
                        if p.state is State.READY
                    ),
                    default=now,
                )
                if until > now:
                    return until
            if any(p.state is State.READY for p in evict):
                self._announce(waiter)
            for p in evict:
                if p.state is State.READY:
                    self.log.info(
                        "swapping: stopping {stopping} to start {model}",
                        stopping=p.model.id,
                        model=waiter.model.id,
                    )
                    p.stop(p.model.unload_timeout, reason="evict")
            return math.inf  # go on once they all stopped (a state change walks again)
        if proc.state in (State.STOPPED, State.FAILED):
            self._announce(waiter)
            self._announced.discard(proc.model.id)
            self.log.info("starting {model}", model=proc.model.id)
            if plan is None:
                proc.start().addErrback(self._start_failed, proc)
            else:
                self._start_admitted(proc, plan)
        # STARTING: ready soon; STOPPING (TTL or unload): start again once stopped.
        return math.inf

    def _start_admitted(self, proc: ModelProcess, plan: Plan) -> None:
        """Start C{proc} on the devices memory admission chose, through the memory gate."""
        memory = self.memory
        assert memory is not None
        model_id = proc.model.id
        memory.started(model_id, plan.devices, lambda: proc.pid)
        gpu = plan.device if proc.model.placed else None
        started = proc.start(gpu=gpu, gate=lambda: memory.gate(model_id))
        started.addErrback(self._start_failed, proc)

    def _start_failed(self, failure: Failure, proc: ModelProcess) -> None:
        """Fail every request waiting for this model with the start's error."""
        self._fail_waiters(proc.model.id, failure)

    def _fail_waiters(self, model_id: str, failure: Failure | Exception) -> None:
        failed = [w for w in self._queue if w.model.id == model_id and not w.done]
        for waiter in failed:
            waiter.finish()
        if failed:
            self._queued_changed(model_id)
        for waiter in failed:
            waiter.deferred.errback(failure)
        self._walk()

    def _grant(self, waiter: Waiter, proc: ModelProcess, now: float) -> None:
        waiter.finish()
        self.stats.waited(waiter.model.id, now - waiter.since)
        self._queued_changed(waiter.model.id)
        # proc.model: a reload since the request queued may have changed the settings.
        waiter.deferred.callback(self._lease(proc.model, waiter.target, proc, waiter.api_key))

    def _lease(
        self, model: ModelConfig, target: LocalTarget, proc: ModelProcess, api_key: ApiKey | None
    ) -> Lease:
        """A lease on C{proc}, a ready model's process, counted in flight (for C{api_key} too)."""
        proc.request_started()
        self._in_flight += 1
        if api_key is not None:
            self._key_in_flight[api_key] += 1
        start = proc.starts

        def release() -> None:
            self._in_flight -= 1
            if api_key is not None:
                self._key_in_flight[api_key] -= 1
            proc.request_finished()
            self._walk()

        def refused() -> Deferred[None]:
            if proc.state is not State.READY or proc.starts != start:
                return succeed(None)  # the server's end was noticed already
            self.log.info(
                "{model}: connection refused while ready; waiting for news of its server",
                model=proc.model.id,
            )
            return proc.when_changed(REFUSED_WAIT)

        return Lease(model, target, release, refused)


def retry_after(waited: float) -> int:
    """A C{Retry-After} in whole seconds: about as long as the queue turns over."""
    return max(1, math.ceil(waited))
