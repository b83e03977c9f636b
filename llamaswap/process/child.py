# -*- test-case-name: tests.test_process -*-
"""
One spawned server, from spawn to C{processEnded}, and how it is stopped.

L{Child} knows the mechanics, not the policy: it spawns, signals the process
group, runs C{cmdStop}, escalates to SIGKILL and closes pipes held too long;
its owner decides what each event means for the model's state. It reports
two events: C{on_exited} (the server was reaped; things it spawned may still
hold our pipes) and C{on_ended} (nothing is left: the server ended, every
pipe closed and C{cmdStop}, if any ran, ended too).

The stop sequence (see docs/swapping.md): C{cmdStop} or SIGTERM to the group;
after the grace, SIGKILL to the group and to a C{cmdStop} still running. If
something outside the group holds our pipes L{PIPE_GRACE} seconds after the
server exited, we close our ends.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamaswap.process.lines import LineProtocol
from llamaswap.process.spawn import resolve_executable, stop_command
from llamaswap.process.waiting import Timers

if TYPE_CHECKING:
    from llamaswap.config import ModelConfig

# After the server exited, how long anything it left holding our pipes may keep
# "process ended" from firing before we close our ends ourselves.
PIPE_GRACE = 5.0
PIPES = {0: "w", 1: "r", 2: "r"}

Kill = Callable[[int, int], None]


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


class _ChildProtocol(LineProtocol):
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


class _StopCommand(LineProtocol):
    """A running C{cmdStop}; its output is logged like the server's."""

    def __init__(self, on_line: Callable[[str, str], None], on_ended: Callable[[], None]) -> None:
        super().__init__(on_line)
        self._on_ended = on_ended
        self.ended = False

    def processEnded(self, reason: Failure) -> None:
        self.flush_lines()
        self.ended = True
        self._on_ended()


class Child:
    """One spawn of C{model}'s server."""

    log = Logger()

    def __init__(
        self,
        model: ModelConfig,
        *,
        reactor: Any,
        clock: IReactorTime,
        kill: Kill,
        env: Mapping[str, str],
        base_dir: str,
        on_line: Callable[[str, str], None],
        on_exited: Callable[[Failure], None],
        on_ended: Callable[[], None],
    ) -> None:
        self._model = model
        self._reactor = reactor
        self._clock = clock
        self._kill = kill
        self._env = env
        self._base_dir = base_dir
        self._on_line = on_line
        self._on_exited = on_exited
        self._on_ended = on_ended
        self._protocol = _ChildProtocol(on_line, self._exited, self._ended)
        self._transport: IProcessTransport | None = None
        self._stopper: _StopCommand | None = None
        self._timers = Timers(clock)
        self.pgid: int | None = None  # kept after reaping: leftovers in the group get signals
        self.started_at = 0.0
        self.exited = False
        self.ended = False
        self.exit_reason: Failure | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid (also its process group id) until it is reaped."""
        return None if self.exited else self.pgid

    def spawn(self, args: list[str]) -> None:
        """Run C{args} (the exec wrapper's argv). @raise Exception: as C{spawnProcess}."""
        model = self._model
        self.log.debug(
            "{model}: executing {cmd} in {cwd}",
            model=model.id,
            cmd=model.cmd_line,
            cwd=self._base_dir,
        )
        self.started_at = self._clock.seconds()
        transport = self._reactor.spawnProcess(
            self._protocol, sys.executable, args, env=self._env, path=self._base_dir, childFDs=PIPES
        )
        self._transport = transport
        self.pgid = transport.pid

    def stop(self, grace: float) -> None:
        """C{cmdStop} or SIGTERM to the group now; SIGKILL after C{grace} seconds."""
        self._timers.later("escalate", grace, self._escalate)
        if self.exited or self.ended:
            return  # the server is gone already; processEnded is on its way
        if self._model.cmd_stop is not None and self.pgid is not None:
            self._run_stop_command(self.pgid)
        else:
            self.signal(signal.SIGTERM)

    def signal(self, sig: int) -> None:
        """Signal the whole process group; fall back to the child alone."""
        if self.ended or self.pgid is None:
            return
        try:
            self._kill(self.pgid, sig)
            return
        except ProcessLookupError:
            pass  # no such group yet (the wrapper has not called setsid) or any more
        except OSError as e:
            self.log.warn(
                "{model}: cannot signal process group {pgid}: {error}",
                model=self._model.id,
                pgid=self.pgid,
                error=e,
            )
        if not self.exited and self._transport is not None:
            try:
                self._transport.signalProcess(sig)
            except (ProcessExitedAlready, OSError):
                pass

    def _run_stop_command(self, pid: int) -> None:
        argv = stop_command(self._model, pid)
        stopper = _StopCommand(self._on_line, self._stopper_ended)
        try:
            exe = resolve_executable(argv[0], self._env, self._base_dir)
            self._reactor.spawnProcess(
                stopper, exe, argv, env=self._env, path=self._base_dir, childFDs=PIPES
            )
        except Exception as e:
            self.log.warn(
                "{model}: cmdStop failed ({error}); sending SIGTERM", model=self._model.id, error=e
            )
            self.signal(signal.SIGTERM)
            return
        self._stopper = stopper

    def _escalate(self) -> None:
        stopper = self._stopper
        if self.ended and (stopper is None or stopper.ended):
            return
        self.log.warn(
            "{model} did not stop in time; sending SIGKILL to its process group",
            model=self._model.id,
        )
        if not self.ended:
            self.signal(signal.SIGKILL)
        if stopper is not None and not stopper.ended and stopper.transport is not None:
            try:
                stopper.transport.signalProcess("KILL")
            except ProcessExitedAlready:
                pass

    def _exited(self, reason: Failure) -> None:
        self.exited = True
        self.exit_reason = reason
        self._on_exited(reason)
        if not self.ended:
            self._timers.later("pipes", PIPE_GRACE, self._close_pipes)

    def _close_pipes(self) -> None:
        if not self.ended and self._transport is not None:
            self.log.warn(
                "{model}: something the server started still holds its output; closing it",
                model=self._model.id,
            )
            self._transport.loseConnection()

    def _ended(self, reason: Failure) -> None:
        self.ended = True
        if not self.exited:  # processExited is always first, but be safe
            self._exited(reason)
        self._timers.cancel_all()
        if self._stopper is not None and not self._stopper.ended:
            # Not over until cmdStop ended too; the escalation kills it if needed.
            self._timers.later("escalate", self._model.unload_timeout, self._escalate)
            return
        self._on_ended()

    def _stopper_ended(self) -> None:
        if self.ended:
            self._timers.cancel_all()
            self._on_ended()
