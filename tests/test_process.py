"""
Unit tests for L{llamaswap.process}: one model's state machine, driven by a
fake process reactor, an injected kill and a fake health client, and its
transition table against the diagram in docs/swapping.md.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import HealthTimeout, StartFailed
from llamaswap.process.child import PIPE_GRACE
from llamaswap.process.health import (
    POLL_FAST,
    POLL_MAX,
    PORT_CHECK_TIMEOUT,
    PROBE_TIMEOUT,
    proxy_address,
)
from llamaswap.process.lines import MAX_LINE_BYTES, TAIL_LINES
from llamaswap.process.model import ModelProcess
from llamaswap.process.spawn import SESSION_WRAPPER, resolve_executable
from llamaswap.process.states import TRANSITIONS, Event, IllegalTransition, State, next_state
from llamaswap.testing.process import FakeHealth, FakeKill, FakeProcessReactor, make_config

PY = sys.executable
URL = "http://127.0.0.1:5800/health"
DOCS_SWAPPING = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "swapping.md")


def model_yaml(extra: str = "", cmd: str = f"{PY} -m llamaswap.fakeserver --port ${{PORT}}") -> str:
    return f"""
healthCheckTimeout: 30
models:
  m:
    cmd: {cmd}
    unloadTimeout: 5
    env: ["MODEL_VAR=yes"]
{extra}
"""


class ModelProcessHarness:
    """A ModelProcess wired to fakes, recording every state it reports."""

    def __init__(self, yaml_text: str | None = None, base_dir: str = ".") -> None:
        self.config = make_config(yaml_text or model_yaml(), base_dir=base_dir)
        self.reactor = FakeProcessReactor()
        self.kill = FakeKill(self.reactor)
        self.health = FakeHealth(self.reactor)
        self.states: list[str] = []
        self.proc = ModelProcess(
            self.config.models["m"],
            reactor=self.reactor,
            clock=self.reactor,
            kill=self.kill,
            http=self.health,
            base_dir=self.config.base_dir,
            health_timeout=self.config.health_check_timeout,
            on_change=lambda p: self.states.append(p.state.value),
        )

    @property
    def child(self) -> Any:
        return self.reactor.children[-1]

    def healthy(self) -> None:
        self.health.set(URL, 200)

    def start_ready(self) -> None:
        self.healthy()
        self.proc.start()
        self.reactor.advance(POLL_FAST)
        assert self.proc.state is State.READY, self.proc.state


class SpawnTests(SynchronousTestCase):
    def test_spawns_through_the_session_wrapper(self) -> None:
        """
        The child runs the exec wrapper with the grace, the resolved program
        and the original argv; the inherited environment plus the model's
        env; cwd = the config's folder; stdin/stdout/stderr pipes.
        """
        h = ModelProcessHarness(base_dir=os.getcwd())
        h.proc.start()
        child = h.child
        self.assertEqual(child.executable, PY)
        self.assertEqual(child.args[:5], [PY, "-I", "-S", SESSION_WRAPPER, "5.0"])
        self.assertEqual(child.args[5], os.path.abspath(PY))
        self.assertEqual(child.args[6:], [PY, "-m", "llamaswap.fakeserver", "--port", "5800"])
        self.assertEqual(child.env["MODEL_VAR"], "yes")
        self.assertEqual(child.env["PATH"], os.environ["PATH"])
        self.assertEqual(child.path, os.getcwd())
        self.assertEqual(child.child_fds, {0: "w", 1: "r", 2: "r"})
        self.assertEqual(h.proc.state, State.STARTING)
        self.assertEqual(h.proc.pid, child.original_pid)
        self.assertEqual(h.states, ["starting"])

    def test_bare_names_are_looked_up_on_the_child_path(self) -> None:
        """A bare command name is found on the PATH of the child's environment."""
        self.assertEqual(resolve_executable("sh", {"PATH": "/nonexistent:/bin"}, "/"), "/bin/sh")
        with self.assertRaises(FileNotFoundError):
            resolve_executable("sh", {"PATH": "/nonexistent"}, "/")

    def test_relative_paths_resolve_against_the_config_folder(self) -> None:
        """C{./bin/server} means the config file's folder, not our cwd."""
        base = self.mktemp()
        os.makedirs(os.path.join(base, "bin"))
        server = os.path.join(base, "bin", "server")
        with open(server, "w") as f:
            f.write("#!/bin/sh\n")
        os.chmod(server, 0o755)
        h = ModelProcessHarness(model_yaml(cmd="./bin/server --port ${PORT}"), base_dir=base)
        h.proc.start()
        self.assertEqual(h.child.args[5], os.path.abspath(server))
        self.assertEqual(h.child.args[6], "./bin/server")
        self.assertEqual(h.child.path, base)

    def test_command_not_found_fails_the_start(self) -> None:
        """An unknown program fails the start at once with a clear message."""
        h = ModelProcessHarness(model_yaml(cmd="no-such-llama-server --port ${PORT}"))
        failure = self.failureResultOf(h.proc.start(), StartFailed)
        self.assertIn("command not found: no-such-llama-server", failure.value.message)
        self.assertEqual(h.proc.state, State.FAILED)
        self.assertEqual(h.reactor.children, [])
        self.assertEqual(h.states, ["starting", "failed"])
        self.assertIn("no-such-llama-server", h.proc.last_error or "")

    def test_spawn_error_fails_the_start(self) -> None:
        """An OS error from spawnProcess fails the start; a later start works."""
        h = ModelProcessHarness()
        h.reactor.spawn_error = OSError(24, "Too many open files")
        self.failureResultOf(h.proc.start(), StartFailed)
        self.assertEqual(h.proc.state, State.FAILED)
        h.reactor.spawn_error = None
        h.start_ready()


class PortCheckTests(SynchronousTestCase):
    def test_spawns_only_once_the_port_is_known_free(self) -> None:
        """
        Before spawning, a connection to the proxy's host and port is tried
        (timeout PORT_CHECK_TIMEOUT); the child is spawned only once it was
        refused or timed out.
        """
        for outcome in (ConnectionRefusedError(), TimeoutError()):
            h = ModelProcessHarness()
            h.reactor.hang_connects = True
            ready = h.proc.start()
            self.assertEqual(h.proc.state, State.STARTING)
            self.assertEqual(h.reactor.children, [])
            self.assertIsNone(h.proc.pid)
            [(host, port, factory, timeout, _)] = h.reactor.tcpClients
            self.assertEqual((host, port, timeout), ("127.0.0.1", 5800, PORT_CHECK_TIMEOUT))
            factory.clientConnectionFailed(h.reactor.connectors[0], Failure(outcome))
            self.assertEqual(len(h.reactor.children), 1)
            h.healthy()
            h.reactor.advance(POLL_FAST)
            self.successResultOf(ready)

    def test_port_in_use_fails_the_start_without_spawning(self) -> None:
        """
        Something already accepts connections on the model's port (it would
        answer our health checks and requests): the start fails at once with
        StartFailed naming the port; nothing is spawned; the test connection
        is closed. Once the port is free, the next start works.
        """
        h = ModelProcessHarness()
        h.reactor.taken_ports.add(5800)
        ready = h.proc.start()
        message = self.failureResultOf(ready, StartFailed).value.message
        self.assertIn("port 5800 on 127.0.0.1 is already in use by another process", message)
        self.assertEqual(h.reactor.children, [])
        self.assertEqual(h.proc.state, State.FAILED)
        self.assertEqual(h.states, ["starting", "failed"])
        self.assertIn("already in use", h.proc.last_error or "")
        self.assertTrue(h.reactor.accepted[0].disconnecting)
        self.assertEqual(h.health.calls, [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])
        h.reactor.taken_ports.clear()
        h.start_ready()
        self.assertEqual(len(h.reactor.children), 1)

    def test_stop_during_the_port_check(self) -> None:
        """Unloading while the port is being checked aborts the start; no spawn follows."""
        h = ModelProcessHarness()
        h.reactor.hang_connects = True
        ready = h.proc.start()
        stopped = h.proc.stop()
        self.assertIn("aborted", self.failureResultOf(ready, StartFailed).value.message)
        self.successResultOf(stopped)
        self.assertEqual(h.proc.state, State.STOPPED)
        self.assertEqual(h.states, ["starting", "stopped"])
        self.assertTrue(h.reactor.connectors[0].stoppedConnecting)
        [(_, _, factory, _, _)] = h.reactor.tcpClients
        factory.clientConnectionFailed(h.reactor.connectors[0], Failure(ConnectionRefusedError()))
        self.assertEqual(h.reactor.children, [])
        self.assertEqual(h.kill.sent, [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_proxy_address(self) -> None:
        """The checked address is the proxy URL's host and port (default 80/443)."""
        self.assertEqual(proxy_address("http://127.0.0.1:5800"), ("127.0.0.1", 5800))
        self.assertEqual(proxy_address("http://localhost"), ("localhost", 80))
        self.assertEqual(proxy_address("https://gpu-box/v1"), ("gpu-box", 443))
        self.assertEqual(proxy_address("http://[::1]:8080"), ("::1", 8080))
        self.assertIsNone(proxy_address("http://host:99999"))


class HealthTests(SynchronousTestCase):
    def test_ready_on_first_200(self) -> None:
        """Readiness is noticed by the first probe after the server answers 200."""
        h = ModelProcessHarness()
        ready = h.proc.start()
        h.reactor.advance(1.0)
        self.assertNoResult(ready)
        h.healthy()
        h.reactor.advance(POLL_FAST)
        self.assertIsNone(self.successResultOf(ready))
        self.assertEqual(h.proc.state, State.READY)
        self.assertEqual(h.states, ["starting", "ready"])
        self.assertEqual(h.reactor.getDelayedCalls(), [])  # no probe, no deadline left

    def test_only_200_is_ready(self) -> None:
        """503 (llama-server loading) and other statuses keep polling."""
        h = ModelProcessHarness()
        ready = h.proc.start()
        for code in (503, 404, 204, 500):
            h.health.set(URL, code)
            h.reactor.advance(1.0)
            self.assertNoResult(ready)
        h.health.set(URL, 200)
        h.reactor.advance(1.0)
        self.successResultOf(ready)

    def test_poll_fast_then_back_off(self) -> None:
        """Probes every 50 ms for the first seconds, then gently slower, up to 0.25 s."""
        h = ModelProcessHarness()
        h.proc.start()
        for _ in range(2000):
            h.reactor.advance(0.01)
        times = [t for t, _ in h.health.calls]
        gaps = [round(b - a, 4) for a, b in itertools.pairwise(times)]
        self.assertAlmostEqual(times[0], POLL_FAST, places=6)
        early = [g for t, g in zip(times[1:], gaps, strict=False) if t <= 3.0]
        self.assertTrue(all(g <= POLL_FAST + 0.011 for g in early), early)
        self.assertGreater(len(early), 50)
        self.assertTrue(all(g <= POLL_MAX + 0.011 for g in gaps))
        self.assertTrue(all(b >= a - 0.011 for a, b in itertools.pairwise(gaps)))
        self.assertGreaterEqual(gaps[-1], POLL_MAX - 0.011)

    def test_stalled_probe_times_out_and_polling_goes_on(self) -> None:
        """A health request that never answers is abandoned after PROBE_TIMEOUT."""
        h = ModelProcessHarness()
        ready = h.proc.start()
        h.health.set(URL, "hang")
        h.reactor.advance(POLL_FAST)
        self.assertEqual(len(h.health.hanging), 1)
        h.reactor.advance(PROBE_TIMEOUT - 0.01)
        self.assertEqual(len(h.health.calls), 1)
        h.health.set(URL, 200)
        h.reactor.advance(0.02)  # timed out...
        h.reactor.advance(POLL_FAST)  # ...and probed again
        self.successResultOf(ready)

    def test_check_endpoint_none_is_ready_at_once(self) -> None:
        """C{checkEndpoint: none}: ready as soon as the command started."""
        h = ModelProcessHarness(model_yaml("    checkEndpoint: none"))
        self.successResultOf(h.proc.start())
        self.assertEqual(h.proc.state, State.READY)
        self.assertEqual(h.health.calls, [])

    def test_exit_during_startup_fails_fast_with_output_tail(self) -> None:
        """
        A child that dies while starting fails the start at once (not at the
        health timeout), with its exit status and last output lines.
        """
        h = ModelProcessHarness()
        ready = h.proc.start()
        other = h.proc.when_ready()
        h.reactor.advance(0.2)
        h.child.output(b"loading model\nerror: out of memory\npartial")
        h.child.exit(code=1)
        for d in (ready, other):
            error = self.failureResultOf(d, StartFailed).value
            self.assertIn("exited during startup (exit code 1)", error.message)
            self.assertIn("error: out of memory", error.message)
            self.assertIn("partial", error.message)  # flushed at processEnded
        self.assertEqual(h.proc.state, State.FAILED)
        self.assertEqual(h.states, ["starting", "stopping", "failed"])
        self.assertIn("out of memory", h.proc.last_error or "")
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_failed_model_starts_again(self) -> None:
        """After a failed start, the next start spawns a new child."""
        h = ModelProcessHarness()
        d = h.proc.start()
        h.child.exit(code=1)
        self.failureResultOf(d, StartFailed)
        h.start_ready()
        self.assertEqual(len(h.reactor.children), 2)
        self.assertIsNone(h.proc.last_error)

    def test_health_timeout_kills_the_child(self) -> None:
        """
        No 200 within healthCheckTimeout: waiters get HealthTimeout with the
        output tail at once, the group gets SIGTERM, then SIGKILL after the
        model's unloadTimeout; the state is failed once the child ended.
        """
        h = ModelProcessHarness()
        ready = h.proc.start()
        child = h.child
        child.dies_on = {signal.SIGKILL}
        child.output(b"still loading\n", fd=2)
        h.reactor.advance(29.9)
        self.assertNoResult(ready)
        h.reactor.advance(0.2)
        error = self.failureResultOf(ready, HealthTimeout).value
        self.assertIn("within 30s", error.message)
        self.assertIn("still loading", error.message)
        self.assertEqual(h.kill.sent, [(child.original_pid, signal.SIGTERM)])
        self.assertEqual(h.proc.state, State.STOPPING)
        h.reactor.advance(5)
        self.assertEqual(h.kill.sent[-1], (child.original_pid, signal.SIGKILL))
        self.assertEqual(h.proc.state, State.FAILED)
        self.assertEqual(h.states, ["starting", "stopping", "failed"])

    def test_when_ready_gives_each_waiter_its_own_deferred(self) -> None:
        """Two waiters on one start both see the result (no shared Deferred)."""
        h = ModelProcessHarness()
        first, second = h.proc.start(), h.proc.when_ready()
        self.assertIsNot(first, second)
        h.healthy()
        h.reactor.advance(POLL_FAST)
        self.assertIsNone(self.successResultOf(first))
        self.assertIsNone(self.successResultOf(second))

    def test_cancelling_a_ready_waiter_does_not_abort_the_start(self) -> None:
        """A waiter who leaves is only withdrawn."""
        h = ModelProcessHarness()
        d = h.proc.start()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.start_ready()
        self.assertEqual(len(h.reactor.children), 1)

    def test_when_changed_fires_at_the_next_transition_or_the_timeout(self) -> None:
        """when_changed: the next state change, else the timeout; cancellable."""
        h = ModelProcessHarness()
        h.start_ready()
        changed = h.proc.when_changed(10)
        timed_out = h.proc.when_changed(1)
        cancelled = h.proc.when_changed(10)
        cancelled.cancel()
        self.failureResultOf(cancelled, CancelledError)
        h.reactor.advance(1)
        self.successResultOf(timed_out)
        self.assertNoResult(changed)
        h.child.exit(code=1)
        self.successResultOf(changed)
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_starts_are_numbered(self) -> None:
        """Each start gets a new number, so a lease can tell its server from the next."""
        h = ModelProcessHarness()
        self.assertEqual(h.proc.starts, 0)
        h.start_ready()
        self.assertEqual(h.proc.starts, 1)
        h.proc.start()  # already ready: no new start
        self.assertEqual(h.proc.starts, 1)
        h.child.exit(code=1)
        h.start_ready()
        self.assertEqual(h.proc.starts, 2)

    def test_when_ready_while_stopped_fails(self) -> None:
        """Nobody waits for a start that is not happening."""
        h = ModelProcessHarness()
        self.failureResultOf(h.proc.when_ready(), StartFailed)


class StopTests(SynchronousTestCase):
    def test_sigterm_then_sigkill_after_unload_timeout(self) -> None:
        """
        Stop sends SIGTERM to the process group; a child that ignores it gets
        SIGKILL after unloadTimeout; done only at processEnded.
        """
        h = ModelProcessHarness()
        h.start_ready()
        child = h.child
        child.dies_on = {signal.SIGKILL}
        stopped = h.proc.stop()
        self.assertEqual(h.kill.sent, [(child.original_pid, signal.SIGTERM)])
        self.assertEqual(h.proc.state, State.STOPPING)
        h.reactor.advance(4.9)
        self.assertEqual(len(h.kill.sent), 1)
        self.assertNoResult(stopped)
        h.reactor.advance(0.1)
        self.assertEqual(h.kill.sent[-1], (child.original_pid, signal.SIGKILL))
        self.successResultOf(stopped)
        self.assertEqual(h.proc.state, State.STOPPED)
        self.assertEqual(h.states, ["starting", "ready", "stopping", "stopped"])
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_stop_is_done_only_at_process_ended(self) -> None:
        """Reaped but pipes still held (a grandchild): still stopping."""
        h = ModelProcessHarness()
        h.start_ready()
        child = h.child
        child.dies_on = set()
        stopped = h.proc.stop(grace=3)
        waiter = h.proc.when_stopped()
        child.exit(sig=signal.SIGTERM, end=False)
        self.assertNoResult(stopped)
        self.assertEqual(h.proc.state, State.STOPPING)
        self.assertIsNone(h.proc.pid)
        h.reactor.advance(3)  # the grace: leftovers in the group get SIGKILL
        self.assertEqual(h.kill.sent[-1], (child.original_pid, signal.SIGKILL))
        child.end()
        self.successResultOf(stopped)
        self.successResultOf(waiter)
        self.assertEqual(h.proc.state, State.STOPPED)

    def test_pipes_held_too_long_are_closed(self) -> None:
        """If something outside the group keeps our pipes, we close them."""
        h = ModelProcessHarness()
        h.start_ready()
        child = h.child
        child.dies_on = set()
        stopped = h.proc.stop(grace=30)
        child.exit(code=0, end=False)
        h.reactor.advance(PIPE_GRACE)
        self.assertTrue(child.lost_connection)
        self.successResultOf(stopped)

    def test_stop_twice_and_stop_when_stopped(self) -> None:
        """Stop is idempotent: one signal, every caller told at the end."""
        h = ModelProcessHarness()
        self.successResultOf(h.proc.stop())
        h.start_ready()
        h.child.dies_on = set()
        first, second = h.proc.stop(), h.proc.stop()
        self.assertEqual(len(h.kill.sent), 1)
        h.child.exit(sig=signal.SIGTERM)
        self.successResultOf(first)
        self.successResultOf(second)

    def test_cmd_stop_gets_the_pid(self) -> None:
        """C{cmdStop} runs with C{${PID}} replaced, instead of SIGTERM."""
        h = ModelProcessHarness(model_yaml("    cmdStop: kill -TERM ${PID}"))
        h.start_ready()
        server = h.child
        stopped = h.proc.stop()
        stopper = h.reactor.children[-1]
        self.assertIsNot(stopper, server)
        self.assertEqual(stopper.args, ["kill", "-TERM", str(server.original_pid)])
        self.assertEqual(stopper.executable, resolve_executable("kill", os.environ, "."))
        self.assertEqual(h.kill.sent, [])
        stopper.output(b"stopping\n")
        stopper.exit()
        self.assertNoResult(stopped)
        server.exit(sig=signal.SIGTERM)
        self.successResultOf(stopped)
        self.assertEqual(h.proc.state, State.STOPPED)

    def test_hanging_cmd_stop_is_killed_with_the_server(self) -> None:
        """After the grace, SIGKILL goes to the group and to a stuck cmdStop."""
        h = ModelProcessHarness(model_yaml("    cmdStop: kill -TERM ${PID}"))
        h.start_ready()
        server = h.child
        stopped = h.proc.stop()
        stopper = h.reactor.children[-1]
        stopper.dies_on = {signal.SIGKILL}
        h.reactor.advance(5)
        self.assertEqual(h.kill.sent, [(server.original_pid, signal.SIGKILL)])
        self.assertEqual(stopper.signals, [signal.SIGKILL])
        self.successResultOf(stopped)

    def test_falls_back_to_the_child_without_a_group(self) -> None:
        """If the group does not exist yet (no setsid yet), signal the child."""
        h = ModelProcessHarness()
        ready = h.proc.start()
        child = h.child

        def no_group(pgid: int, sig: int) -> None:
            raise ProcessLookupError(pgid)

        h.proc._child._kill = no_group
        stopped = h.proc.stop()
        self.assertEqual(child.signals, [signal.SIGTERM])
        self.successResultOf(stopped)
        self.failureResultOf(ready, StartFailed)

    def test_stop_while_starting_aborts_the_start(self) -> None:
        """Unloading a starting model fails its waiters and kills the child."""
        h = ModelProcessHarness()
        ready = h.proc.start()
        stopped = h.proc.stop()
        self.assertIn("aborted", self.failureResultOf(ready, StartFailed).value.message)
        self.successResultOf(stopped)
        self.assertEqual(h.proc.state, State.STOPPED)
        self.assertEqual(h.health.calls, [])
        self.assertEqual(h.reactor.getDelayedCalls(), [])

    def test_start_while_stopping_is_refused(self) -> None:
        """The supervisor must wait for the stop before starting again."""
        h = ModelProcessHarness()
        h.start_ready()
        h.child.dies_on = set()
        h.proc.stop()
        self.assertRaises(RuntimeError, h.proc.start)


class CrashTests(SynchronousTestCase):
    def test_crash_while_ready_goes_to_stopped(self) -> None:
        """A ready server that dies is logged with its exit status; stopped."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = ModelProcessHarness()
        h.start_ready()
        pid = h.child.original_pid
        h.child.exit(sig=signal.SIGSEGV)
        self.assertEqual(h.proc.state, State.STOPPED)
        self.assertEqual(h.states, ["starting", "ready", "stopping", "stopped"])
        self.assertIn("killed by SIGSEGV", h.proc.last_error or "")
        warned = [e for e in events if "exited unexpectedly" in e.get("log_format", "")]
        self.assertEqual(warned[0]["status"], "killed by SIGSEGV")
        h.start_ready()  # the next start works
        self.assertNotEqual(h.child.original_pid, pid)

    def test_crash_kills_leftovers_in_the_group(self) -> None:
        """When the server dies, what it left in its group is killed."""
        h = ModelProcessHarness()
        h.start_ready()
        child = h.child
        child.exit(code=2, end=False)
        self.assertEqual(h.kill.sent, [(child.original_pid, signal.SIGKILL)])
        self.assertEqual(h.proc.state, State.STOPPING)
        child.end()
        self.assertEqual(h.proc.state, State.STOPPED)


class TTLTests(SynchronousTestCase):
    def harness(self) -> ModelProcessHarness:
        h = ModelProcessHarness(model_yaml("    ttl: 60"))
        h.start_ready()
        return h

    def test_ttl_fires_after_idle(self) -> None:
        """An idle ready model is stopped ttl seconds after becoming idle."""
        h = self.harness()
        self.assertEqual(h.proc.ttl_remaining(), 60)
        h.reactor.advance(59.9)
        self.assertEqual(h.proc.state, State.READY)
        h.reactor.advance(0.1)
        self.assertEqual(h.proc.state, State.STOPPED)
        self.assertEqual(h.kill.sent[0][1], signal.SIGTERM)

    def test_ttl_paused_while_in_flight(self) -> None:
        """The TTL never fires during a request and counts from its end."""
        h = self.harness()
        h.reactor.advance(30)
        h.proc.request_started()
        self.assertIsNone(h.proc.ttl_remaining())
        h.reactor.advance(600)
        self.assertEqual(h.proc.state, State.READY)
        h.proc.request_finished()
        self.assertEqual(h.proc.ttl_remaining(), 60)
        h.reactor.advance(59)
        self.assertEqual(h.proc.state, State.READY)
        h.reactor.advance(1)
        self.assertEqual(h.proc.state, State.STOPPED)

    def test_ttl_zero_never_unloads(self) -> None:
        """ttl 0 means never."""
        h = ModelProcessHarness()
        h.start_ready()
        self.assertIsNone(h.proc.ttl_remaining())
        h.reactor.advance(10**6)
        self.assertEqual(h.proc.state, State.READY)


class OutputTests(SynchronousTestCase):
    def test_lines_are_logged_as_fields(self) -> None:
        """Child lines go to llamaswap.upstream.<id>, the text as a field."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        h = ModelProcessHarness()
        ready = h.proc.start()
        h.child.output(b"hello {not a format}\r\nsecond ")
        h.child.output(b"half\n")
        h.child.output(b"oops\n", fd=2)
        h.child.output(b"no newline at the end")
        h.child.exit()
        self.failureResultOf(ready, StartFailed)
        upstream = [e for e in events if e["log_namespace"] == "llamaswap.upstream.m"]
        self.assertEqual(
            [(e["line"], e["stream"], e["model"]) for e in upstream],
            [
                ("hello {not a format}", "stdout", "m"),
                ("second half", "stdout", "m"),
                ("oops", "stderr", "m"),
                ("no newline at the end", "stdout", "m"),
            ],
        )
        self.assertTrue(all(e["log_format"] == "{line}" for e in upstream))

    def test_tail_is_bounded(self) -> None:
        """Only the last TAIL_LINES lines are kept for error messages."""
        h = ModelProcessHarness()
        h.proc.start()
        h.child.output(b"".join(b"line %d\n" % i for i in range(100)))
        self.assertEqual(len(h.proc.tail()), TAIL_LINES)
        self.assertEqual(h.proc.tail()[-1], "line 99")

    def test_endless_line_is_cut(self) -> None:
        """An unterminated line cannot grow the buffer without bound."""
        h = ModelProcessHarness()
        h.proc.start()
        chunk = b"x" * 4096
        for _ in range(MAX_LINE_BYTES // 4096 + 2):
            h.child.output(chunk)
        self.assertTrue(h.proc.tail())
        self.assertLessEqual(len(h.proc.tail()[0]), MAX_LINE_BYTES + 32)
        self.assertTrue(h.proc.tail()[0].endswith("bytes cut]"))
        h.child.output(b"y" * (MAX_LINE_BYTES * 3) + b"\nshort\n")
        self.assertLessEqual(len(h.proc.tail()[-2]), MAX_LINE_BYTES + 32)
        self.assertEqual(h.proc.tail()[-1], "short")

    def test_stop_deferred_never_fails(self) -> None:
        """stop() of a starting, failing model still just fires."""
        h = ModelProcessHarness()
        ready = h.proc.start()
        stopped: Deferred[None] = h.proc.stop()
        self.failureResultOf(ready, StartFailed)
        self.assertIsNone(self.successResultOf(stopped))


class TransitionTableTests(SynchronousTestCase):
    def test_docs_diagram_is_the_table(self) -> None:
        """
        The lifecycle diagram in docs/swapping.md lists exactly the moves of
        TRANSITIONS: every (state, event, next) edge of the table is in the
        diagram block, and every line of the block is an edge of the table.
        """
        with open(DOCS_SWAPPING, encoding="utf-8") as f:
            text = f.read()
        states_section = text.split("\n## States\n", 1)[1]
        block = states_section.split("```\n", 2)[1]
        drawn = set()
        for line in block.splitlines():
            match = re.match(r"(\w+)\s+--(\w+)-->\s+(\w+)(\s|$)", line)
            self.assertIsNotNone(match, f"not an edge: {line!r}")
            assert match is not None
            drawn.add(match.group(1, 2, 3))
        table = {(s.value, e.value, t.value) for (s, e), t in TRANSITIONS.items()}
        self.assertEqual(drawn, table)
        self.assertEqual(len(block.splitlines()), len(TRANSITIONS))

    def test_every_state_is_entered_and_left(self) -> None:
        """No state is a dead end, and none is unreachable."""
        entered = set(TRANSITIONS.values())
        left = {state for state, _ in TRANSITIONS}
        self.assertEqual(entered, set(State))
        self.assertEqual(left, set(State))

    def test_an_illegal_transition_is_a_loud_bug(self) -> None:
        """A move the table lacks raises IllegalTransition; the state stays."""
        self.assertEqual(next_state(State.READY, Event.STOP), State.STOPPING)
        with self.assertRaises(IllegalTransition):
            next_state(State.READY, Event.START)
        h = ModelProcessHarness()
        h.start_ready()
        with self.assertRaises(IllegalTransition):
            h.proc._go(Event.HEALTHY)
        self.assertEqual(h.proc.state, State.READY)
        self.assertEqual(h.states, ["starting", "ready"])

    def test_states_are_their_api_strings(self) -> None:
        """A state compares equal to its name and is written as it in JSON."""
        self.assertEqual(State.READY, "ready")
        self.assertIn(State.STOPPING, {"stopping", "starting"})
        self.assertEqual(f"{State.FAILED}", "failed")
        self.assertEqual(json.dumps({"state": State.STARTING}), '{"state": "starting"}')
