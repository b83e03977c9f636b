# -*- test-case-name: tests.test_process -*-
"""
One model server: spawn, health-check, TTL, stop; an explicit state machine.

States (L{State}): C{stopped -> starting -> ready -> stopping -> stopped},
plus C{failed} (the last start failed; like C{stopped}, the next start retries).
Only L{ModelProcess} assigns its state, and every transition ends by calling
C{on_change(process)}, so the supervisor can publish it and re-plan.

A model's slot is free (C{stopped}/C{failed}) only once Twisted's
C{processEnded} fired: the child was reaped and every pipe it (or anything it
spawned) held is closed. See docs/swapping.md for the stop sequence.
"""

from __future__ import annotations

import enum
import os
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from attrs import define
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import (
    IAddress,
    IConnector,
    IDelayedCall,
    IProcessTransport,
    IReactorTime,
)
from twisted.internet.protocol import ClientFactory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap import _session
from llamaswap.config import ModelConfig
from llamaswap.errors import HealthTimeout, StartFailed

SESSION_WRAPPER = os.path.abspath(_session.__file__)

TAIL_LINES = 20  # child output lines kept for error messages
MAX_LINE_BYTES = 16 * 1024  # longer lines are cut (log observers must cope with each line)
# Health polling: fast at first, so readiness is noticed within ~50 ms, then
# backing off gently for slow loaders.
POLL_FAST = 0.05
POLL_FAST_PERIOD = 3.0
POLL_BACKOFF = 1.25
POLL_MAX = 1.0
PROBE_TIMEOUT = 2.0  # one health request (a server that accepts but never answers)
# Before a spawn, a connection to the model's address is tried for this long: if
# something accepts it, another server owns the port (and would answer our health
# checks and requests). Refused or timed out: the port is free.
PORT_CHECK_TIMEOUT = 1.0
# After the server exited, how long anything it left holding our pipes may keep
# "process ended" from firing before we close our ends ourselves.
PIPE_GRACE = 5.0

Kill = Callable[[int, int], None]


class State(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


def describe_exit(reason: Failure | BaseException | None) -> str:
    """Render a process's end as C{exit code N} or C{killed by SIGX}."""
    value = reason.value if isinstance(reason, Failure) else reason
    if isinstance(value, ProcessDone):
        return "exit code 0"
    if isinstance(value, ProcessTerminated):
        if value.signal is not None:
            try:
                return f"killed by {signal.Signals(value.signal).name}"
            except ValueError:
                return f"killed by signal {value.signal}"
        return f"exit code {value.exitCode}"
    return "unknown exit status"


class LineSplitter:
    """Split a byte stream into text lines; bounded partial-line buffer."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, rest = (self._partial + data).split(b"\n")
        for line in lines:
            self._emit(_decode(_cut(line)))
        if len(rest) > MAX_LINE_BYTES:
            self._emit(_decode(_cut(rest)))  # an endless line must not eat our memory
            rest = b""
        self._partial = rest

    def flush(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._emit(_decode(partial))


def _cut(line: bytes) -> bytes:
    if len(line) <= MAX_LINE_BYTES:
        return line
    return line[:MAX_LINE_BYTES] + b" [%d bytes cut]" % (len(line) - MAX_LINE_BYTES)


def _decode(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


class _LineProtocol(ProcessProtocol):
    """A child whose stdout and stderr are passed on line by line, as C{on_line(stream, line)}."""

    def __init__(self, on_line: Callable[[str, str], None]) -> None:
        self._splitters = {
            1: LineSplitter(lambda line: on_line("stdout", line)),
            2: LineSplitter(lambda line: on_line("stderr", line)),
        }

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        splitter = self._splitters.get(childFD)
        if splitter is not None:
            splitter.feed(data)

    def flush_lines(self) -> None:
        """Pass on an unterminated last line of each stream (call at processEnded)."""
        for splitter in self._splitters.values():
            splitter.flush()


class _ChildProtocol(_LineProtocol):
    """Relays one child's events to its owner; one instance per spawn."""

    def __init__(
        self,
        on_line: Callable[[str, str], None],
        on_exited: Callable[[Failure], None],
        on_ended: Callable[[Failure], None],
    ) -> None:
        super().__init__(on_line)
        self._on_exited = on_exited
        self._on_ended = on_ended

    def processExited(self, reason: Failure) -> None:
        self._on_exited(reason)

    def processEnded(self, reason: Failure) -> None:
        self.flush_lines()
        self._on_ended(reason)


@define
class _Run:
    """Everything about one spawned server, from spawn to processEnded."""

    proto: _ChildProtocol | None = None
    transport: IProcessTransport | None = None
    pgid: int | None = None  # kept after reaping: leftovers in the group get signals
    exited: bool = False
    ended: bool = False
    exit_reason: Failure | None = None
    started_at: float = 0.0
    poll_delay: float = POLL_FAST
    port_check: Deferred[bool] | None = None
    deadline: IDelayedCall | None = None
    probe_call: IDelayedCall | None = None
    probe: Deferred[int] | None = None
    escalate: IDelayedCall | None = None
    pipe_backstop: IDelayedCall | None = None
    final: State = State.STOPPED  # the state to reach at processEnded, when stopping
    error: Exception | None = None  # reported to ready-waiters at processEnded
    stopper: _StopCommand | None = None

    def cancel_timers(self) -> None:
        for name in ("deadline", "probe_call", "escalate", "pipe_backstop"):
            call = getattr(self, name)
            if call is not None and call.active():
                call.cancel()
            setattr(self, name, None)
        for name in ("probe", "port_check"):
            pending = getattr(self, name)
            setattr(self, name, None)
            if pending is not None:
                pending.cancel()


class _StopCommand(_LineProtocol):
    """A running C{cmdStop}; its output is logged like the server's."""

    def __init__(self, on_line: Callable[[str, str], None], on_ended: Callable[[], None]) -> None:
        super().__init__(on_line)
        self._on_ended = on_ended
        self.ended = False

    def processEnded(self, reason: Failure) -> None:
        self.flush_lines()
        self.ended = True
        self._on_ended()


class ModelProcess:
    """
    The server of one configured model, started and stopped on demand.

    One long-lived object per model; each start spawns a fresh child.
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
        self._upstream_log = Logger(namespace=f"llamaswap.upstream.{model.id}")
        self._state = State.STOPPED
        self._run: _Run | None = None
        self._ready_waiters: list[Deferred[None]] = []
        self._stopped_waiters: list[Deferred[None]] = []
        self._change_waiters: list[Deferred[None]] = []
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._ttl_call: IDelayedCall | None = None
        self.in_flight = 0
        self.last_error: str | None = None
        self.starts = 0  # numbers each start: tells this server from a later one

    # --- public view -----------------------------------------------------

    @property
    def state(self) -> State:
        return self._state

    @property
    def pid(self) -> int | None:
        """The server's pid (also its process group id) while it runs."""
        run = self._run
        if run is None or run.exited:
            return None
        return run.pgid

    @property
    def occupied(self) -> bool:
        """Whether this model holds its slot (anything but stopped/failed)."""
        return self._state not in (State.STOPPED, State.FAILED)

    def tail(self) -> list[str]:
        """The last lines the current (or last) child wrote."""
        return list(self._tail)

    def ttl_remaining(self) -> float | None:
        """Seconds until the TTL unload, or C{None} when no TTL is counting."""
        call = self._ttl_call
        if call is None or not call.active():
            return None
        return max(0.0, call.getTime() - self._clock.seconds())

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
        return _waiter(self._ready_waiters)

    def when_stopped(self) -> Deferred[None]:
        """Fire (a Deferred of its own) once the model is stopped or failed."""
        if not self.occupied:
            return succeed(None)
        return _waiter(self._stopped_waiters)

    def when_changed(self, timeout: float) -> Deferred[None]:
        """
        Fire at the next state transition, or after C{timeout} seconds,
        whichever comes first.

        @return: a Deferred of its own; never errbacks; cancelling it only
            withdraws this waiter.
        """
        d = _waiter(self._change_waiters)
        timer = self._clock.callLater(timeout, _fire_one, self._change_waiters, d)
        return d.addBoth(_cancel_call, timer)

    # --- requests and TTL ------------------------------------------------

    def request_started(self) -> None:
        """A request was granted: the TTL pauses while any is in flight."""
        self.in_flight += 1
        self._disarm_ttl()

    def request_finished(self) -> None:
        """A request ended: the idle time (TTL) counts from now."""
        self.in_flight = max(0, self.in_flight - 1)
        if self.in_flight == 0:
            self._arm_ttl()

    def _arm_ttl(self) -> None:
        self._disarm_ttl()
        if self._state is State.READY and self.model.ttl > 0 and self.in_flight == 0:
            self._ttl_call = self._clock.callLater(self.model.ttl, self._ttl_expired)

    def _disarm_ttl(self) -> None:
        call, self._ttl_call = self._ttl_call, None
        if call is not None and call.active():
            call.cancel()

    def _ttl_expired(self) -> None:
        self._ttl_call = None
        if self._state is State.READY and self.in_flight == 0:
            self.log.info(
                "Unloading model {model}, TTL of {ttl}s reached",
                model=self.model.id,
                ttl=self.model.ttl,
            )
            self.stop()

    # --- start -----------------------------------------------------------

    def start(self) -> Deferred[None]:
        """
        Start the server unless it is starting or ready already.

        The spawn waits for a check that nothing else listens on the model's
        address yet (L{port_in_use}); if something does, the start fails.

        @return: like L{when_ready}, for this start.
        @raise RuntimeError: while stopping (wait for L{when_stopped} first).
        """
        if self._state in (State.STARTING, State.READY):
            return self.when_ready()
        if self._state is State.STOPPING:
            raise RuntimeError(f"model {self.model.id} is stopping")
        ready = _waiter(self._ready_waiters)
        self.last_error = None
        self._tail.clear()
        self.starts += 1
        self._set_state(State.STARTING)
        run = self._run = _Run(started_at=self._clock.seconds())
        try:
            args, env = self._command()
        except Exception as e:
            self._spawn_failed(e)
            return ready
        address = proxy_address(self.model.proxy)
        if address is None:
            self._launch(run, args, env)
            return ready
        check = port_in_use(self._reactor, *address, timeout=PORT_CHECK_TIMEOUT)
        run.port_check = check
        check.addCallbacks(
            lambda in_use: self._port_checked(run, in_use, address, args, env),
            lambda failure: None,  # cancelled: the start was aborted
        )
        return ready

    def _command(self) -> tuple[list[str], dict[str, str]]:
        """The wrapper's argv and the environment for the server."""
        model = self.model
        env = {**(os.environ if self._environ is None else self._environ), **model.env}
        exe = resolve_executable(model.cmd[0], env, self._base_dir)
        args = [
            sys.executable,
            "-I",
            "-S",
            SESSION_WRAPPER,
            repr(float(model.unload_timeout)),
            exe,
            *model.cmd,
        ]
        return args, env

    def _port_checked(
        self,
        run: _Run,
        in_use: bool,
        address: tuple[str, int],
        args: list[str],
        env: dict[str, str],
    ) -> None:
        run.port_check = None
        if run is not self._run or self._state is not State.STARTING:
            return
        if not in_use:
            self._launch(run, args, env)
            return
        host, port = address
        self._run = None
        self._finish_failed(
            StartFailed(
                f"cannot start model {self.model.id}: port {port} on {host} is already in use "
                f"by another process; stop that process or give the model another port "
                f"(proxy: {self.model.proxy})"
            )
        )

    def _launch(self, run: _Run, args: list[str], env: dict[str, str]) -> None:
        try:
            self._spawn(run, args, env)
        except Exception as e:
            self._spawn_failed(e)

    def _spawn_failed(self, error: Exception) -> None:
        self._run = None
        self._finish_failed(StartFailed(f"failed to start model {self.model.id}: {error}"))

    def _spawn(self, run: _Run, args: list[str], env: dict[str, str]) -> None:
        model = self.model
        run.proto = _ChildProtocol(
            self._child_line,
            lambda reason: self._exited(run, reason),
            lambda reason: self._ended(run, reason),
        )
        self.log.debug(
            "{model}: executing {cmd} in {cwd}",
            model=model.id,
            cmd=model.cmd_line,
            cwd=self._base_dir,
        )
        run.started_at = self._clock.seconds()
        transport = self._reactor.spawnProcess(
            run.proto,
            sys.executable,
            args,
            env=env,
            path=self._base_dir,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
        run.transport = transport
        run.pgid = transport.pid
        if model.check_endpoint is None:
            # `checkEndpoint: none`: ready as soon as the command was started.
            self._became_ready(run)
            return
        run.deadline = self._clock.callLater(self._health_timeout, self._health_timed_out, run)
        run.probe_call = self._clock.callLater(POLL_FAST, self._probe, run)

    # --- health ------------------------------------------------------------

    def _probe(self, run: _Run) -> None:
        run.probe_call = None
        if run is not self._run or self._state is not State.STARTING:
            return
        url = self.model.proxy + (self.model.check_endpoint or "")
        try:
            d: Deferred[Any] = self._http.get(url, allow_redirects=False)
        except Exception as e:
            d = fail(e)

        def read(response: Any) -> Deferred[int]:
            # Drain the body, or the connection stays checked out of the pool.
            body: Deferred[Any] = response.content()
            return body.addCallback(lambda _: int(response.code))

        d.addCallback(read)
        d.addTimeout(PROBE_TIMEOUT, self._clock)
        run.probe = d
        d.addBoth(lambda result: self._probe_done(result, run, d))

    def _probe_done(self, result: int | Failure, run: _Run, probe: Deferred[int]) -> None:
        if run.probe is not probe or run is not self._run or self._state is not State.STARTING:
            return  # a late answer, or our own cancellation: nothing to do
        run.probe = None
        if result == 200:
            self._became_ready(run)
            return
        elapsed = self._clock.seconds() - run.started_at
        if elapsed >= POLL_FAST_PERIOD:
            run.poll_delay = min(POLL_MAX, run.poll_delay * POLL_BACKOFF)
        run.probe_call = self._clock.callLater(run.poll_delay, self._probe, run)

    def _became_ready(self, run: _Run) -> None:
        run.cancel_timers()
        self.log.info(
            "{model} is ready (pid {pid}, {seconds:.2f}s)",
            model=self.model.id,
            pid=run.pgid,
            seconds=self._clock.seconds() - run.started_at,
        )
        self._set_state(State.READY, notify=False)
        self._arm_ttl()
        _fire(self._ready_waiters)
        self._notify()

    def _health_timed_out(self, run: _Run) -> None:
        run.deadline = None
        if run is not self._run or self._state is not State.STARTING:
            return
        message = (
            f"model {self.model.id} did not become healthy within "
            f"{self._health_timeout:g}s (health check timed out)"
        )
        error = HealthTimeout(message + self._tail_text())
        self.last_error = str(error)
        self.log.error("{message}", message=message)
        _fire(self._ready_waiters, error)
        self._begin_stop(run, self.model.unload_timeout, final=State.FAILED)

    # --- stop --------------------------------------------------------------

    def stop(self, grace: float | None = None) -> Deferred[None]:
        """
        Stop the server: C{cmdStop} or SIGTERM to its process group, then
        SIGKILL to the group after C{grace} (default: the model's
        C{unloadTimeout}) seconds. Stopping a starting model aborts the start.

        @return: a Deferred of its own that fires once the child ended
            (stopped or failed state); never errbacks.
        """
        if not self.occupied:
            return succeed(None)
        done = self.when_stopped()
        run = self._run
        if self._state is State.STOPPING or run is None:
            return done
        if self._state is State.STARTING:
            error = StartFailed(f"the start of model {self.model.id} was aborted (unloaded)")
            _fire(self._ready_waiters, error)
            if run.transport is None:  # still checking the port: nothing to signal
                run.cancel_timers()
                self._run = None
                self._set_state(State.STOPPED, notify=False)
                _fire(self._stopped_waiters)
                self._notify()
                return done
        self._begin_stop(run, self.model.unload_timeout if grace is None else grace)
        return done

    def _begin_stop(self, run: _Run, grace: float, final: State = State.STOPPED) -> None:
        run.cancel_timers()
        self._disarm_ttl()
        run.final = final
        run.escalate = self._clock.callLater(grace, self._escalate, run)
        self._set_state(State.STOPPING)
        if run is not self._run or run.ended:
            return  # a listener acted, or the child ended already
        if run.exited:
            pass  # the server is gone already; processEnded is on its way
        elif self.model.cmd_stop is not None and run.pgid is not None:
            self._run_stop_command(run)
        else:
            self._signal(run, signal.SIGTERM)

    def _run_stop_command(self, run: _Run) -> None:
        assert self.model.cmd_stop is not None
        argv = [arg.replace("${PID}", str(run.pgid)) for arg in self.model.cmd_stop]
        env = {**(os.environ if self._environ is None else self._environ), **self.model.env}
        stopper = _StopCommand(self._child_line, lambda: self._stopper_ended(run))
        try:
            exe = resolve_executable(argv[0], env, self._base_dir)
            self._reactor.spawnProcess(
                stopper, exe, argv, env=env, path=self._base_dir, childFDs={0: "w", 1: "r", 2: "r"}
            )
        except Exception as e:
            self.log.warn(
                "{model}: cmdStop failed ({error}); sending SIGTERM", model=self.model.id, error=e
            )
            self._signal(run, signal.SIGTERM)
            return
        run.stopper = stopper

    def _stopper_ended(self, run: _Run) -> None:
        if run.ended and run is self._run:
            self._finish_stop(run)

    def _escalate(self, run: _Run) -> None:
        run.escalate = None
        if run.ended and (run.stopper is None or run.stopper.ended):
            return
        self.log.warn(
            "{model} did not stop in time; sending SIGKILL to its process group",
            model=self.model.id,
        )
        if not run.ended:
            self._signal(run, signal.SIGKILL)
        stopper = run.stopper
        if stopper is not None and not stopper.ended and stopper.transport is not None:
            try:
                stopper.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def _signal(self, run: _Run, sig: int) -> None:
        """Signal the whole process group; fall back to the child alone."""
        if run.ended or run.pgid is None:
            return
        try:
            self._kill(run.pgid, sig)
            return
        except ProcessLookupError:
            pass  # no such group yet (the wrapper has not called setsid) or any more
        except OSError as e:
            self.log.warn(
                "{model}: cannot signal process group {pgid}: {error}",
                model=self.model.id,
                pgid=run.pgid,
                error=e,
            )
        if not run.exited and run.transport is not None:
            try:
                run.transport.signalProcess(sig)
            except (ProcessExitedAlready, OSError):
                pass

    # --- child events ------------------------------------------------------

    def _child_line(self, stream: str, line: str) -> None:
        self._tail.append(line)
        self._upstream_log.info("{line}", line=line, model=self.model.id, stream=stream)

    def _exited(self, run: _Run, reason: Failure) -> None:
        """The server was reaped; things it spawned may still hold our pipes."""
        run.exited = True
        run.exit_reason = reason
        if run is not self._run:
            return
        if self._state in (State.STARTING, State.READY):
            status = describe_exit(reason)
            if self._state is State.STARTING:
                run.error = StartFailed(
                    f"model {self.model.id} exited during startup ({status})"
                )  # the output tail is added once every line was read (processEnded)
                final = State.FAILED
            else:
                self.log.warn(
                    "{model} exited unexpectedly ({status})", model=self.model.id, status=status
                )
                self.last_error = f"exited unexpectedly ({status})"
                final = State.STOPPED
            run.cancel_timers()
            self._signal(run, signal.SIGKILL)  # leftovers of a dead server: no grace
            self._begin_stop(run, PIPE_GRACE, final=final)
        if not run.ended:
            run.pipe_backstop = self._clock.callLater(PIPE_GRACE, self._close_pipes, run)

    def _close_pipes(self, run: _Run) -> None:
        run.pipe_backstop = None
        if not run.ended and run.transport is not None:
            self.log.warn(
                "{model}: something the server started still holds its output; closing it",
                model=self.model.id,
            )
            run.transport.loseConnection()

    def _ended(self, run: _Run, reason: Failure) -> None:
        run.ended = True
        if not run.exited:  # processExited is always first, but be safe
            self._exited(run, reason)
        if run is not self._run:
            return
        run.cancel_timers()
        if run.stopper is not None and not run.stopper.ended:
            # Stay "stopping" until cmdStop ended too; the escalation kills it if needed.
            run.escalate = self._clock.callLater(self.model.unload_timeout, self._escalate, run)
            return
        self._finish_stop(run)

    def _finish_stop(self, run: _Run) -> None:
        run.cancel_timers()
        self._run = None
        if run.error is not None:
            error = run.error
            if isinstance(error, StartFailed):
                error = StartFailed(error.message + self._tail_text())
            self._finish_failed(error)
            return
        self.log.info(
            "{model} stopped ({status})", model=self.model.id, status=describe_exit(run.exit_reason)
        )
        self._set_state(run.final, notify=False)
        _fire(self._stopped_waiters)
        self._notify()

    def _finish_failed(self, error: Exception) -> None:
        self.last_error = str(error)
        self.log.error("{error}", error=str(error))
        self._set_state(State.FAILED, notify=False)
        _fire(self._ready_waiters, error)
        _fire(self._stopped_waiters)
        self._notify()

    # --- helpers -----------------------------------------------------------

    def _tail_text(self) -> str:
        if not self._tail:
            return " (no output)"
        return "; last output:\n" + "\n".join(self._tail)

    def _set_state(self, state: State, *, notify: bool = True) -> None:
        self._state = state
        if notify:
            self._notify()

    def _notify(self) -> None:
        _fire(self._change_waiters)
        if self._on_change is not None:
            self._on_change(self)


def resolve_executable(name: str, env: Mapping[str, str], base_dir: str) -> str:
    """
    Find the program to run: relative paths (containing C{/}) against the
    config's folder, bare names on the child's C{PATH}.

    @raise FileNotFoundError: with a one-line message.
    """
    if "/" in name:
        candidate = os.path.join(base_dir, name)
        found = shutil.which(candidate)
    else:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(f"command not found: {name}")
    return os.path.abspath(found)


def proxy_address(url: str) -> tuple[str, int] | None:
    """The host and port of a model's C{proxy} URL (None if it has none)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname, port


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]


class _PortProbe(ClientFactory):
    """Fires C{result} with whether a connection was accepted."""

    noisy = False  # one probe per start: "Starting factory" lines are noise

    def __init__(self) -> None:
        self.connector: IConnector | None = None
        self.result: Deferred[bool] = Deferred(self._cancel)

    def buildProtocol(self, addr: IAddress | None) -> Protocol:
        # Called once the connection is established: somebody listens.
        if not self.result.called:
            self.result.callback(True)
        return _Hangup()

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        if not self.result.called:
            self.result.callback(False)

    def _cancel(self, _: Deferred[bool]) -> None:
        if self.connector is not None:
            try:
                self.connector.stopConnecting()
            except Exception:
                pass  # connected or failed meanwhile


def port_in_use(reactor: Any, host: str, port: int, *, timeout: float) -> Deferred[bool]:
    """
    Whether something accepts TCP connections on C{host:port}: a connection
    is opened and closed at once. Refused, unreachable or no answer within
    C{timeout} seconds: C{False}. Cancelling it stops the attempt.
    """
    probe = _PortProbe()
    try:
        probe.connector = reactor.connectTCP(host, port, probe, timeout=timeout)
    except Exception:
        return succeed(False)  # e.g. an unusable address: the health check will tell
    return probe.result


def _waiter(waiters: list[Deferred[None]]) -> Deferred[None]:
    def cancel(d: Deferred[None]) -> None:
        if d in waiters:
            waiters.remove(d)

    d: Deferred[None] = Deferred(cancel)
    waiters.append(d)
    return d


def _fire_one(waiters: list[Deferred[None]], d: Deferred[None]) -> None:
    if d in waiters:
        waiters.remove(d)
        d.callback(None)


def _cancel_call(result: object, call: IDelayedCall) -> object:
    if call.active():
        call.cancel()
    return result


def _fire(waiters: list[Deferred[None]], error: Exception | None = None) -> None:
    pending = list(waiters)
    waiters.clear()
    for d in pending:
        if error is None:
            d.callback(None)
        else:
            d.errback(error)
