# -*- test-case-name: tests.test_supervisor -*-
"""
The swap scheduler: decides which model servers run, and hands out leases.

The rules (docs/swapping.md has the long version):

 - A request names a model (id, alias or C{profile:model}). It may run
   together with the models of its I{allowed set} (L{may_run_with}): for a
   plain name, what the groups allow (with no groups: only itself); for
   C{profile:model}, the profile's members and persistent groups' members.
   Everything else that runs must be stopped first. With a C{matrix}, the
   allowed set of a plain name depends on what runs: L{Matrix.solve} picks it
   again on every walk of the queue (nothing if the model already runs).
 - A model with requests in flight is never stopped to make room: the swap
   waits until they end. Requests for other models wait meanwhile.
 - Requests wait in one FIFO queue, with one exception: a request for a model
   that is ready and needs nothing stopped is served at once, even if earlier
   requests wait for a swap (fewer swaps; a busy model can starve others).
 - Waiters for the same model share one start; a failed start fails every
   waiter for that model, and the next request retries.

The queue is re-walked whenever anything changes (a model's state, a lease
released, a waiter added or cancelled); one walk never waits.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from attrs import frozen
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.config import Config, ModelConfig
from llamaswap.config.matrix import Decision
from llamaswap.errors import ModelNotFound, ShuttingDown, TooManyRequests
from llamaswap.events import EventBus
from llamaswap.names import LocalTarget, Resolver, Target
from llamaswap.process.model import ModelProcess
from llamaswap.process.states import State

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


class StatusSource(Protocol):
    """What the read-only views (C{/api/events}, C{/metrics}) call on the supervisor."""

    def statuses(self) -> list[ModelStatus]: ...


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


class _Waiter:
    """One queued L{Supervisor.acquire} call."""

    def __init__(
        self,
        target: LocalTarget,
        model: ModelConfig,
        allowed: frozenset[str],
        withdraw: Callable[[_Waiter], None],
    ) -> None:
        self.target = target
        self.model = model
        self.allowed = allowed
        self.decision: Decision | None = None  # the matrix's latest choice for it
        self.deferred: Deferred[Lease] = Deferred(lambda _: withdraw(self))
        self.done = False  # served, failed or withdrawn: skipped, then dropped from the queue

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        """Waiters with equal keys want exactly the same thing."""
        return (self.model.id, self.allowed)


def may_run_with(names: Resolver, target: LocalTarget) -> frozenset[str]:
    """
    The models that may keep running while C{target}'s model is loaded (its
    own id included); loading it stops every other.

    For a plain name, llama-swap's group rule, with T's group G: a member of G
    is stopped if G swaps; a member of another group H is stopped if G is
    exclusive and H is not persistent. Models in no group form a default group
    that swaps and is exclusive, so with no groups only T itself may run.

    For C{profile:model} (seed profiles): the profile's members, plus the
    members of persistent groups (which nothing but their own group stops).
    """
    config = names.config
    persistent = {m for group in config.groups.values() if group.persistent for m in group.members}
    if target.profile is not None:
        return frozenset(config.profiles[target.profile]) | persistent
    group = names.group_of(target.model_id)
    allowed = {target.model_id}
    for model_id in config.models:
        other = names.group_of(model_id)
        if other.id == group.id:
            if not group.swap:
                allowed.add(model_id)
        elif not group.exclusive or other.persistent:
            allowed.add(model_id)
    return frozenset(allowed)


def _conflict(one: tuple[str, frozenset[str]], other: tuple[str, frozenset[str]]) -> bool:
    """Whether serving one waiter would stop the other's model."""
    return one[0] not in other[1] or other[0] not in one[1]


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
    ) -> None:
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
        self._procs: dict[str, ModelProcess] = {
            model_id: ModelProcess(
                model,
                reactor=reactor,
                clock=self._clock,
                kill=kill if kill is not None else os.killpg,
                http=http,
                base_dir=config.base_dir,
                health_timeout=config.health_check_timeout,
                on_change=self._changed,
            )
            for model_id, model in config.models.items()
        }
        self._queue: list[_Waiter] = []
        # may_run_with() per (profile, model id), computed on first use.
        self._allowed: dict[tuple[str | None, str], frozenset[str]] = {}
        self._all_models = frozenset(config.models)
        # Targets whose matrix decision was logged (at their swap's first step).
        self._announced: set[str] = set()
        self._shutting_down = False
        self._walking = False
        self._walk_again = False
        self._preloading: Deferred[None] | None = None

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
        self._shutting_down = True
        queued, self._queue = self._queue, []
        for waiter in queued:
            if not waiter.done:
                waiter.done = True
                waiter.deferred.errback(ShuttingDown("llamaswap is shutting down"))
        stops = [proc.stop() for proc in self._procs.values()]

        async def wait() -> None:
            await DeferredList(stops, consumeErrors=True)
            if self._pool is not None:
                await self._pool.closeCachedConnections()

        return Deferred.fromCoroutine(wait())

    # --- API -----------------------------------------------------------------

    def acquire(self, target: LocalTarget) -> Deferred[Lease]:
        """
        Get a lease on a ready model for C{target} (what the request's name
        resolved to: L{llamaswap.names}), starting or swapping models as needed.

        @return: a Deferred that fires with a L{Lease} (call its C{release()}
            when the request ends). It errbacks with L{StartFailed} (with the
            child's last output lines), L{HealthTimeout}, L{TooManyRequests} or
            L{ShuttingDown}. Cancelling it withdraws the request; a start it
            caused carries on, but a request cancelled while still queued
            starts nothing.
        """
        if self._shutting_down:
            return fail(ShuttingDown("llamaswap is shutting down"))
        model = target.model
        limit = model.concurrency_limit
        if limit > 0:
            queued = sum(1 for w in self._queue if w.model.id == model.id and not w.done)
            if self._procs[model.id].in_flight + queued >= limit:
                return fail(
                    TooManyRequests(
                        f"too many requests for model {model.id} (concurrencyLimit {limit})"
                    )
                )
        key = (target.profile, model.id)
        allowed = self._allowed.get(key)
        if allowed is None:
            allowed = self._allowed[key] = may_run_with(self.names, target)
        proc = self._procs[model.id]
        if (
            proc.state is State.READY
            and self.config.matrix is None
            and all(w.done for w in self._queue)
            and not any(p.occupied and m not in allowed for m, p in self._procs.items())
        ):
            # What a walk of a queue holding only this waiter would do: grant at once.
            # (A walk leaves everything else as it was: it ran after the last change.)
            self._queue = []
            return succeed(self._lease(model, target, proc))
        waiter = _Waiter(target, model, allowed, self._withdraw)
        self._queue.append(waiter)
        self._walk()
        return waiter.deferred

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
        """One status per configured model, in config order."""
        return [self.status(model_id) for model_id in self.config.models]

    def status(self, model_id: str) -> ModelStatus:
        """
        The status of one model.

        @raise ModelNotFound: for an unknown id (aliases are accepted too).
        """
        model = self.names.find_model(model_id)
        if model is None:
            raise ModelNotFound(f"model not found: {model_id}")
        proc = self._procs[model.id]
        return ModelStatus(
            model_id=model.id,
            state=proc.state,
            pid=proc.pid,
            in_flight=proc.in_flight,
            ttl=model.ttl,
            ttl_remaining=proc.ttl_remaining(),
            last_error=proc.last_error,
        )

    # --- scheduling ----------------------------------------------------------

    def _changed(self, proc: ModelProcess) -> None:
        self._events.publish(
            "modelStatus", {"model": proc.model.id, "state": proc.state.value, "pid": proc.pid}
        )
        self._walk()

    def _withdraw(self, waiter: _Waiter) -> None:
        """The caller cancelled: forget the waiter (its Deferred gets CancelledError)."""
        if not waiter.done:
            waiter.done = True
            self._walk()

    def _walk(self) -> None:
        """Re-examine the queue in order; re-entrant calls just ask for another pass."""
        if self._walking:
            self._walk_again = True
            return
        if not self._queue:
            self._announced.clear()  # all that a walk of an empty queue does
            return
        self._walking = True
        try:
            while True:
                self._walk_again = False
                self._walk_once()
                if not self._walk_again:
                    return
        finally:
            self._walking = False

    def _walk_once(self) -> None:
        self._queue = [w for w in self._queue if not w.done]
        self._announced &= {w.model.id for w in self._queue}
        # What earlier waiters still waiting for a swap want (distinct wishes only).
        blocked: dict[tuple[str, frozenset[str]], bool] = {}
        decisions: dict[tuple[str, tuple[str, ...]], Decision] = {}
        for waiter in list(self._queue):
            if waiter.done:
                continue  # served or failed by something this walk triggered
            if self.config.matrix is not None and waiter.target.profile is None:
                self._decide(waiter, decisions)
            proc = self._procs[waiter.model.id]
            evict = [p for m, p in self._procs.items() if p.occupied and m not in waiter.allowed]
            if proc.state is State.READY and not evict:
                self._grant(waiter, proc)
                continue
            key = waiter.key
            if key in blocked:
                continue  # the first waiter with this wish took the step for all
            blocked[key] = conflict = any(_conflict(key, other) for other in blocked)
            if not conflict:
                self._advance(waiter, proc, evict)

    def _decide(
        self, waiter: _Waiter, decisions: dict[tuple[str, tuple[str, ...]], Decision]
    ) -> None:
        """Matrix: set C{waiter}'s allowed set from what runs now (stopping models excluded)."""
        assert self.config.matrix is not None
        running = tuple(
            m for m, p in self._procs.items() if p.occupied and p.state is not State.STOPPING
        )
        key = (waiter.model.id, running)
        decision = decisions.get(key)
        if decision is None:
            decision = decisions[key] = self.config.matrix.solve(waiter.model.id, running)
        waiter.decision = decision
        waiter.allowed = self._all_models if decision.keep is None else decision.keep

    def _announce(self, waiter: _Waiter) -> None:
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

    def _advance(self, waiter: _Waiter, proc: ModelProcess, evict: list[ModelProcess]) -> None:
        """Take the next step towards serving C{waiter}; never waits."""
        if evict:
            # Never stop a model that is serving; a starting one is let finish
            # (someone who left may have started it) and stopped once ready.
            if any(p.in_flight > 0 or p.state is State.STARTING for p in evict):
                return
            if any(p.state is State.READY for p in evict):
                self._announce(waiter)
            for p in evict:
                if p.state is State.READY:
                    self.log.info(
                        "swapping: stopping {stopping} to start {model}",
                        stopping=p.model.id,
                        model=waiter.model.id,
                    )
                    p.stop(p.model.unload_timeout)
            return  # go on once they all stopped (a state change walks again)
        if proc.state in (State.STOPPED, State.FAILED):
            self._announce(waiter)
            self._announced.discard(proc.model.id)
            self.log.info("starting {model}", model=proc.model.id)
            proc.start().addErrback(self._start_failed, proc)
        # STARTING: ready soon; STOPPING (TTL or unload): start again once stopped.

    def _start_failed(self, failure: Failure, proc: ModelProcess) -> None:
        """Fail every request waiting for this model with the start's error."""
        failed = [w for w in self._queue if w.model.id == proc.model.id and not w.done]
        for waiter in failed:
            waiter.done = True
        for waiter in failed:
            waiter.deferred.errback(failure)
        self._walk()

    def _grant(self, waiter: _Waiter, proc: ModelProcess) -> None:
        waiter.done = True
        waiter.deferred.callback(self._lease(waiter.model, waiter.target, proc))

    def _lease(self, model: ModelConfig, target: LocalTarget, proc: ModelProcess) -> Lease:
        """A lease on C{proc}, a ready model's process, counted in flight."""
        proc.request_started()
        start = proc.starts

        def release() -> None:
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
