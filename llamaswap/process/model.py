# -*- test-case-name: tests.test_process -*-
"""
One model server, started and stopped on demand: the policy of its lifecycle.

Its state moves only by L{TRANSITIONS<llamaswap.process.states.TRANSITIONS>}
(in L{ModelProcess._go}, the one place that assigns it), and every transition
ends by calling C{on_change(process)}, so the supervisor can publish it and
re-plan. The mechanics live beside it: L{HealthPoller} (port check, health
polling), L{Child} (spawn, signals, C{cmdStop}, pipes), L{spawn} (command
lines), L{Waiters} and L{Timers}.

A model's slot is free (C{stopped}/C{failed}) only once Twisted's
C{processEnded} fired: the child was reaped and every pipe it (or anything it
spawned) held is closed. See docs/swapping.md for the stop sequence.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.errors import HealthTimeout, StartFailed
from llamaswap.process.child import PIPE_GRACE, Child, Kill, describe_exit
from llamaswap.process.health import HealthPoller, ignore_cancelled
from llamaswap.process.lines import OutputTail
from llamaswap.process.spawn import model_env, server_command
from llamaswap.process.states import Event, State, next_state
from llamaswap.process.waiting import Timers, Waiters

if TYPE_CHECKING:
    from llamaswap.config import ModelConfig


class ModelProcess:
    """
    The server of one configured model, started and stopped on demand.

    One long-lived object per model; each start makes a fresh L{Child} and
    L{HealthPoller}.
    """

    log = Logger()

    def __init__(
        self,
        model: ModelConfig,
        *,
        reactor: Any,
        clock: IReactorTime,
        kill: Kill,
        http: Any,
        base_dir: str,
        health_timeout: float,
        on_change: Callable[[ModelProcess], None] | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.model = model
        self._reactor = reactor
        self._clock = clock
        self._kill = kill
        self._http = http
        self._base_dir = base_dir
        self._health_timeout = health_timeout
        self._on_change = on_change
        self._environ = environ
        self._state = State.STOPPED
        self._started_at = 0.0
        self._child: Child | None = None  # from spawn to on_ended
        self._health: HealthPoller | None = None  # while starting
        self._gating: Deferred[None] | None = None  # while a start waits at the memory gate
        self._failure: Exception | None = None  # why the current start failed, if it did
        self._ready = Waiters()
        self._stopped = Waiters()
        self._changed = Waiters()
        self._timers = Timers(clock)  # the TTL
        self._output = OutputTail(model.id)
        self.in_flight = 0
        self.last_error: str | None = None
        self.starts = 0  # numbers each start: tells this server from a later one
        # For the scheduler (clock seconds): when the current server became ready, how long
        # its last start took, since when no request has been in flight, and why it stops.
        self.ready_at: float | None = None
        self.load_seconds = 0.0
        self.idle_since = 0.0
        self.stop_reason = ""

    def reconfigure(self, model: ModelConfig, health_timeout: float) -> None:
        """
        New settings that need no restart (a reload): they apply from now; a
        changed C{ttl} restarts the idle countdown.
        """
        old, self.model = self.model, model
        self._health_timeout = health_timeout
        if old.ttl != model.ttl:
            self._arm_ttl()

    # --- public view -----------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        """The server's pid (also its process group id) while it runs."""
        return None if self._child is None else self._child.pid

    @property
    def occupied(self) -> bool:
        """Whether this model holds its slot (anything but stopped/failed)."""
        return self._state not in (State.STOPPED, State.FAILED)

    def tail(self) -> list[str]:
        """The last lines the current (or last) child wrote."""
        return self._output.lines()

    def ttl_remaining(self) -> float | None:
        """Seconds until the TTL unload, or C{None} when no TTL is counting."""
        return self._timers.remaining("ttl")

    # --- waiting -----------------------------------------------------------

    def when_ready(self) -> Deferred[None]:
        """
        Fire when the current start succeeds.

        @return: a Deferred of its own, firing at once if ready; it errbacks with
            L{StartFailed} or L{HealthTimeout} if the start fails or is aborted,
            and with L{StartFailed} at once if no start is in progress.
            Cancelling it only withdraws this waiter.
        """
        if self._state is State.READY:
            return succeed(None)
        if self._state is not State.STARTING:
            return fail(StartFailed(f"model {self.model.id} is {self._state.value}"))
        return self._ready.wait()

    def when_stopped(self) -> Deferred[None]:
        """Fire (a Deferred of its own) once the model is stopped or failed."""
        if not self.occupied:
            return succeed(None)
        return self._stopped.wait()

    def when_changed(self, timeout: float) -> Deferred[None]:
        """
        Fire at the next state transition, or after C{timeout} seconds,
        whichever comes first.

        @return: a Deferred of its own; never errbacks; cancelling it only
            withdraws this waiter.
        """
        return self._changed.wait(self._clock, timeout)

    # --- requests and TTL ------------------------------------------------

    def request_started(self) -> None:
        """A request was granted: the TTL pauses while any is in flight."""
        self.in_flight += 1
        self._timers.cancel("ttl")

    def request_finished(self) -> None:
        """A request ended: the idle time (TTL) counts from now."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.in_flight == 0:
            self.idle_since = self._clock.seconds()
            self._arm_ttl()

    def _arm_ttl(self) -> None:
        self._timers.cancel("ttl")
        if self._state is State.READY and self.model.ttl > 0 and self.in_flight == 0:
            self._timers.later("ttl", self.model.ttl, self._ttl_expired)

    def _ttl_expired(self) -> None:
        if self._state is State.READY and self.in_flight == 0:
            self.log.info(
                "Unloading model {model}, TTL of {ttl}s reached",
                model=self.model.id,
                ttl=self.model.ttl,
            )
            self.stop(reason="ttl")

    # --- start -----------------------------------------------------------

    def start(
        self, *, gpu: str | None = None, gate: Callable[[], Deferred[None]] | None = None
    ) -> Deferred[None]:
        """
        Start the server unless it is starting or ready already.

        The spawn waits for C{gate} (the memory gate: the memory the start was
        promised is free), then for a check that nothing else listens on the
        model's address yet (L{HealthPoller.check_port}); if something does,
        the start fails. C{gpu} replaces C{${GPU}} in its command and env.

        @return: like L{when_ready}, for this start.
        @raise RuntimeError: while stopping (wait for L{when_stopped} first).
        """
        if self._state in (State.STARTING, State.READY):
            return self.when_ready()
        if self._state is State.STOPPING:
            raise RuntimeError(f"model {self.model.id} is stopping")
        ready = self._ready.wait()
        self.last_error = None
        self._output.clear()
        self.starts += 1
        self._started_at = self._clock.seconds()
        self.ready_at = None
        self.stop_reason = ""
        self._failure = None
        self._health = HealthPoller(
            self.model,
            reactor=self._reactor,
            clock=self._clock,
            http=self._http,
            timeout=self._health_timeout,
        )
        self._go(Event.START)
        env = model_env(self.model, self._environ, gpu)
        try:
            args = server_command(self.model, env, self._base_dir, self.model.unload_timeout, gpu)
        except Exception as e:
            self._fail(StartFailed(f"failed to start model {self.model.id}: {e}"))
            return ready
        if gate is None:
            self._check_port(args, env)
        else:
            gating = self._gating = gate()
            gating.addCallback(lambda _: self._check_port(args, env)).addErrback(ignore_cancelled)
        return ready

    def _check_port(self, args: list[str], env: dict[str, str]) -> None:
        self._gating = None
        if self._health is None:  # the start was aborted meanwhile
            return
        check = self._health.check_port()
        check.addCallback(self._port_checked, args, env).addErrback(ignore_cancelled)

    def _port_checked(
        self, taken: StartFailed | None, args: list[str], env: dict[str, str]
    ) -> None:
        if taken is not None:
            self._fail(taken)
            return
        child = self._child = Child(
            self.model,
            reactor=self._reactor,
            clock=self._clock,
            kill=self._kill,
            env=env,
            base_dir=self._base_dir,
            on_line=self._output.add,
            on_exited=self._exited,
            on_ended=self._ended,
        )
        try:
            child.spawn(args)
        except Exception as e:
            self._child = None
            self._fail(StartFailed(f"failed to start model {self.model.id}: {e}"))
            return
        assert self._health is not None
        self._health.poll(self._became_ready, self._health_timed_out)

    def _became_ready(self) -> None:
        assert self._child is not None
        now = self._clock.seconds()
        self.ready_at = self.idle_since = now
        self.load_seconds = now - self._started_at
        self.log.info(
            "{model} is ready (pid {pid}, {seconds:.2f}s)",
            model=self.model.id,
            pid=self._child.pgid,
            seconds=now - self._child.started_at,
        )
        self._go(Event.HEALTHY)

    def _health_timed_out(self, message: str) -> None:
        error = HealthTimeout(message + self._output.text())
        self.last_error = str(error)
        self.log.error("{message}", message=message)
        self._failure = error
        self._ready.fail(error)
        self.stop_reason = "failed"
        self._begin_stop(Event.TIMEOUT, self.model.unload_timeout)

    # --- stop --------------------------------------------------------------

    def stop(self, grace: float | None = None, reason: str = "unload") -> Deferred[None]:
        """
        Stop the server: C{cmdStop} or SIGTERM to its process group, then
        SIGKILL to the group after C{grace} (default: the model's
        C{unloadTimeout}) seconds. Stopping a starting model aborts the start.
        C{reason} (C{unload}, C{evict}, C{ttl}, C{shutdown}) is kept in
        C{stop_reason} for the C{stopping} transition's listeners.

        @return: a Deferred of its own that fires once the child ended
            (stopped or failed state); never errbacks.
        """
        if not self.occupied:
            return succeed(None)
        done = self._stopped.wait()
        if self._state is State.STOPPING:
            return done
        self.stop_reason = reason
        if self._state is State.STARTING:
            self._ready.fail(
                StartFailed(f"the start of model {self.model.id} was aborted (unloaded)")
            )
            if self._child is None:  # at the gate or checking the port: nothing to signal
                self._go(Event.ENDED)
                return done
        self._begin_stop(Event.STOP, self.model.unload_timeout if grace is None else grace)
        return done

    def hurry(self) -> None:
        """A stop that cannot wait: SIGKILL to the server's group now, if it runs."""
        if self._child is not None and self._state is State.STOPPING:
            self._child.stop(0)

    def _begin_stop(self, event: Event, grace: float) -> None:
        child = self._child
        self._go(event)
        if child is not None and child is self._child:  # unless a listener ended it
            child.stop(grace)

    # --- child events ------------------------------------------------------

    def _exited(self, reason: Failure) -> None:
        """The server was reaped; unless we stopped it, that is an exit of its own."""
        if self._state not in (State.STARTING, State.READY):
            return
        status = describe_exit(reason)
        if self._state is State.STARTING:
            # Told at the end, once every line of the output tail was read.
            self._failure = StartFailed(f"model {self.model.id} exited during startup ({status})")
        else:
            self.log.warn(
                "{model} exited unexpectedly ({status})", model=self.model.id, status=status
            )
            self.last_error = f"exited unexpectedly ({status})"
        self.stop_reason = "exit"
        assert self._child is not None
        self._child.signal(signal.SIGKILL)  # leftovers of a dead server: no grace
        self._begin_stop(Event.EXITED, PIPE_GRACE)

    def _ended(self) -> None:
        """Nothing of the server is left: the stop is over."""
        child, self._child = self._child, None
        assert child is not None
        failure = self._failure
        if isinstance(failure, StartFailed):  # an exit while starting, not told yet
            self._fail(StartFailed(failure.message + self._output.text()))
            return
        status = describe_exit(child.exit_reason)
        self.log.info("{model} stopped ({status})", model=self.model.id, status=status)
        self._go(Event.ENDED if failure is None else Event.FAILED)  # a timeout: told already

    def _fail(self, error: Exception) -> None:
        self.last_error = str(error)
        self.log.error("{error}", error=str(error))
        self._go(Event.FAILED, error)

    # --- the one place the state changes ---------------------------------

    def _go(self, event: Event, error: Exception | None = None) -> None:
        """
        Move by the table, then do what entering the new state means.

        @raise IllegalTransition: the table has no move for C{event} here (a bug).
        """
        left, self._state = self._state, next_state(self._state, event)
        if left is State.STARTING and self._health is not None:
            self._health.stop()
            self._health = None
        if left is State.STARTING and self._gating is not None:
            gating, self._gating = self._gating, None
            gating.cancel()
        if self._state is State.READY:
            self._arm_ttl()
            self._ready.fire()
        elif self._state is State.STOPPING:
            self._timers.cancel("ttl")
        elif self._state is State.FAILED:
            if error is not None:
                self._ready.fail(error)
            self._stopped.fire()
        elif self._state is State.STOPPED:
            self._stopped.fire()
        self._changed.fire()
        if self._on_change is not None:
            self._on_change(self)
