"""
Integration tests for the supervisor with real child processes on real ports:
swaps with the fake upstream (C{python -m llamaswap.fakeserver}), the stop
sequence against real signals, and no orphans, even after C{kill -9} of a
running C{twistd llamaswap}. Liveness is checked by pid in C{/proc}.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from llamaswap.config import parse_config
from llamaswap.errors import StartFailed
from llamaswap.events import EventBus
from llamaswap.http import make_http
from llamaswap.process import _session
from llamaswap.supervisor import Supervisor
from tests.fakeserver_helper import REPO_ROOT, fakeserver_env, free_ports
from tests.proctools import (
    ChildOutput,
    alive,
    children_of,
    command,
    group,
    proc_stat,
    record_spawns,
    wait_until,
)

PY = sys.executable
FAKE = f"{PY} -m llamaswap.fakeserver --quiet"
# The children run in a temporary folder: make the checkout importable there.
ENV = f'env: ["PYTHONPATH={REPO_ROOT}"]'


async def all_gone(pids: list[int], timeout: float, what: str) -> None:
    """Wait until none of C{pids} runs; fail naming the survivors."""
    try:
        await wait_until(lambda: not any(alive(p) for p in pids), timeout, what)
    except AssertionError:
        survivors = [(p, proc_stat(p), command(p)) for p in pids if alive(p)]
        raise AssertionError(f"survivors: {survivors}") from None


class SupervisorIntegrationTests(TestCase):
    timeout = 120  # 20 real swaps; a loaded machine slows the fake server's start-up

    def supervisor(self, yaml_text: str) -> tuple[Supervisor, EventBus]:
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config = parse_config(yaml_text, base_dir=base)
        events = EventBus()
        sup = Supervisor(config, reactor=reactor, events=events)
        sup.startService()
        self.addCleanup(sup.stopService)
        return sup, events

    async def start_failure(self, sup: Supervisor, model: str) -> StartFailed:
        """The StartFailed with which C{model}'s start fails (the test fails if it starts)."""
        try:
            (await sup.acquire_by_name(model)).release()
        except StartFailed as e:
            return e
        self.fail(f"the start of {model} did not fail")

    async def test_alternate_two_models(self) -> None:
        """
        Alternating a and b 20 times: every answer comes from the right
        model, and the previous server is gone (by pid) before the next runs.
        """
        port_a, port_b = free_ports(2)
        sup, events = self.supervisor(
            f"""
healthCheckTimeout: 15
models:
  a:
    cmd: {FAKE} --name a --port {port_a}
    proxy: http://127.0.0.1:{port_a}
    {ENV}
  b:
    cmd: {FAKE} --name b --port {port_b}
    proxy: http://127.0.0.1:{port_b}
    {ENV}
"""
        )
        running: set[str] = set()
        overlap: list[set[str]] = []

        def track(kind: str, data: dict[str, Any]) -> None:
            if kind != "modelStatus":
                return
            if data["state"] in ("stopped", "failed"):
                running.discard(data["model"])
            else:
                running.add(data["model"])
            if len(running) > 1:
                overlap.append(set(running))

        events.subscribe(track)
        http, pool = make_http(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        previous: int | None = None
        pids = set()
        for i in range(20):
            name = "ab"[i % 2]
            lease = await sup.acquire_by_name(name)
            try:
                pid = sup.status(name).pid
                assert pid is not None
                self.assertFalse(previous is not None and alive(previous), "two servers")
                self.assertEqual(group(previous) if previous else [], [])
                response = await http.get(lease.url + "/pid")
                answer = json.loads(await response.content())
                self.assertEqual((answer["served_by"], answer["pid"]), (name, pid))
            finally:
                lease.release()
            pids.add(pid)
            previous = pid
        self.assertEqual(len(pids), 20)
        self.assertEqual(overlap, [])

    async def test_grandchildren_of_a_shell_wrapper_are_reaped(self) -> None:
        """Stopping a C{sh -c} wrapper also stops what it started (the group)."""
        sup, _ = self.supervisor(
            """
models:
  g:
    cmd: sh -c 'sleep 300 & sleep 300; wait'
    proxy: http://127.0.0.1:9
    checkEndpoint: none
    unloadTimeout: 5
"""
        )
        lease = await sup.acquire_by_name("g")
        lease.release()
        pid = sup.status("g").pid
        assert pid is not None

        def sleeping() -> list[int]:
            return [p for p in group(pid) if command(p).startswith("sleep")]

        await wait_until(lambda: len(sleeping()) == 2, 5, "two sleeps")
        sleeps = sleeping()
        await sup.unload("g")
        self.assertEqual(sup.status("g").state, "stopped")
        # The unload ends when the group's last pipe closes; a sleep closes its
        # pipes early in its exit and shows as running (not yet a zombie) for
        # a moment after. Gone within a second, or it was never killed.
        await wait_until(
            lambda: [p for p in [pid, *sleeps] if alive(p)] == [], 1, "the sleeps to end"
        )
        # The guard may still be between closing its files and being a zombie.
        await wait_until(lambda: group(pid) == [], 2, "the group to be empty")

    async def test_stop_does_not_wait_for_the_guard(self) -> None:
        """
        Stopping a server takes as long as the server takes to exit: its guard
        (which holds the stdin pipe, so Twisted waits for it) leaves at once.
        """
        (port,) = free_ports(1)
        sup, _ = self.supervisor(
            f"""
models:
  m:
    cmd: {FAKE} --name m --port {port}
    proxy: http://127.0.0.1:{port}
    {ENV}
"""
        )
        (await sup.acquire_by_name("m")).release()
        pid = sup.status("m").pid
        assert pid is not None
        self.assertEqual(len(group(pid)), 2, [command(p) for p in group(pid)])  # server, guard
        started = time.monotonic()
        await sup.unload("m")
        took = time.monotonic() - started
        # A guard that lingered (1 s, as it once did) would show here.
        self.assertLess(took, 0.9)
        self.assertFalse(alive(pid))

    async def test_sigterm_ignored_then_sigkill(self) -> None:
        """A server deaf to SIGTERM is SIGKILLed after its unloadTimeout."""
        (port,) = free_ports(1)
        sup, _ = self.supervisor(
            f"""
models:
  deaf:
    cmd: {FAKE} --name deaf --port {port} --ignore-sigterm
    proxy: http://127.0.0.1:{port}
    {ENV}
    unloadTimeout: 1
"""
        )
        (await sup.acquire_by_name("deaf")).release()
        pid = sup.status("deaf").pid
        assert pid is not None
        started = time.monotonic()
        await sup.unload("deaf")
        elapsed = time.monotonic() - started
        self.assertFalse(alive(pid))
        self.assertGreaterEqual(elapsed, 1.0)
        self.assertLess(elapsed, 4.0)

    async def test_crash_while_ready_then_restart(self) -> None:
        """A server that dies after answering is started again by the next request."""
        (port,) = free_ports(1)
        sup, _ = self.supervisor(
            f"""
models:
  crashy:
    cmd: {FAKE} --name crashy --port {port} --crash-after 1
    proxy: http://127.0.0.1:{port}
    {ENV}
"""
        )
        http, pool = make_http(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        pids = []
        for _ in range(2):
            lease = await sup.acquire_by_name("crashy")
            try:
                response = await http.get(lease.url + "/pid")
                pids.append(json.loads(await response.content())["pid"])
            finally:
                lease.release()
            await wait_until(lambda: sup.status("crashy").state == "stopped", 10, "the crash")
            self.assertIn("exited unexpectedly (exit code 1)", sup.status("crashy").last_error)
        self.assertNotEqual(pids[0], pids[1])
        self.assertFalse(alive(pids[0]))

    async def test_exit_during_startup_fails_fast(self) -> None:
        """A server that dies while loading fails the request at once, with its output."""
        (port,) = free_ports(1)
        sup, _ = self.supervisor(
            f"""
healthCheckTimeout: 60
models:
  dies:
    cmd: {FAKE} --name dies --port {port} --exit-during-startup 7
    proxy: http://127.0.0.1:{port}
    {ENV}
"""
        )
        started = time.monotonic()
        failure = await self.start_failure(sup, "dies")
        self.assertIn("exit code 7", failure.message)
        self.assertIn("last output", failure.message)
        self.assertLess(time.monotonic() - started, 10)
        self.assertEqual(sup.status("dies").state, "failed")

    async def test_port_in_use_fails_without_spawning(self) -> None:
        """
        Another process listens on the model's port: the start fails at once
        with StartFailed naming the port, and nothing is spawned (its server
        would have answered our health checks). Once the port is free, the
        model starts.
        """
        (port,) = free_ports(1)
        squatter = socket.create_server(("127.0.0.1", port))
        self.addCleanup(squatter.close)
        spawned = record_spawns(self)
        sup, _ = self.supervisor(
            f"""
models:
  m:
    cmd: {FAKE} --name m --port {port}
    proxy: http://127.0.0.1:{port}
    {ENV}
"""
        )
        started = time.monotonic()
        failure = await self.start_failure(sup, "m")
        self.assertIn(f"port {port} on 127.0.0.1 is already in use", failure.message)
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(spawned, [])
        self.assertEqual(sup.status("m").state, "failed")
        squatter.close()
        (await sup.acquire_by_name("m")).release()
        self.assertEqual(len(spawned), 1)

    async def test_groups(self) -> None:
        """
        Groups with real servers: the members of a swap:false group run side
        by side (both answer), a persistent group's member survives an
        exclusive load, and that load stops the side-by-side pair (by pid).
        """
        port_k, port_a, port_b, port_c = free_ports(4)
        models = "\n".join(
            f"""
  {name}:
    cmd: {FAKE} --name {name} --port {port}
    proxy: http://127.0.0.1:{port}
    {ENV}"""
            for name, port in (("k", port_k), ("a", port_a), ("b", port_b), ("c", port_c))
        )
        sup, _ = self.supervisor(
            f"""
models:{models}
groups:
  keep: {{persistent: true, exclusive: false, members: [k]}}
  duo: {{swap: false, members: [a, b]}}
"""
        )
        http, pool = make_http(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)

        async def ask(name: str) -> int:
            lease = await sup.acquire_by_name(name)
            try:
                response = await http.get(lease.url + "/pid")
                answer = json.loads(await response.content())
            finally:
                lease.release()
            self.assertEqual(answer["served_by"], name)
            return int(answer["pid"])

        pids = {name: await ask(name) for name in ("k", "a", "b")}
        self.assertTrue(all(alive(pid) for pid in pids.values()), pids)
        self.assertEqual(await ask("a"), pids["a"])  # still the same servers
        self.assertEqual(await ask("k"), pids["k"])
        await ask("c")
        self.assertEqual([alive(pids[name]) for name in ("k", "a", "b")], [True, False, False])
        states = {s.model_id: s.state for s in sup.statuses()}
        self.assertEqual(states, {"k": "ready", "a": "stopped", "b": "stopped", "c": "ready"})

    async def test_stop_service_reaps_everything(self) -> None:
        """
        stopService fires only after the servers are gone; their guards and
        grandchildren are gone too a moment later.
        """
        port_a, port_b = free_ports(2)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config = parse_config(
            f"""
models:
  a:
    cmd: {FAKE} --name a --port {port_a} --fork-grandchild
    proxy: http://127.0.0.1:{port_a}
    {ENV}
  b:
    cmd: {FAKE} --name b --port {port_b}
    proxy: http://127.0.0.1:{port_b}
    {ENV}
profiles:
  p: [a, b]
""",
            base_dir=base,
        )
        sup = Supervisor(config, reactor=reactor)
        sup.startService()
        try:
            for name in ("p:a", "p:b"):
                (await sup.acquire_by_name(name)).release()
            pids = [sup.status(m).pid for m in ("a", "b")]
            members = [p for pid in pids if pid is not None for p in group(pid)]
            # 2 servers, 2 guards, 1 grandchild
            self.assertGreaterEqual(len(members), 5, [command(p) for p in members])
        finally:
            await sup.stopService()
        self.assertEqual([pid for pid in pids if pid is not None and alive(pid)], [])
        # The guards are not our children: each exits on its own once it sees
        # its server gone, a moment after stopService fired.
        await all_gone(members, 3, "the guards")


class GuardTests(SynchronousTestCase):
    """The guard's test for a dying llamaswap (L{_session._dying})."""

    def test_alive_process(self) -> None:
        """A running process with its own start time is not dying."""
        me = os.getpid()
        self.assertFalse(_session._dying(me, _session._start_time(me)))
        self.assertFalse(_session._dying(me, None))

    def test_gone_or_replaced(self) -> None:
        """A pid that is gone, or reused by a later process, counts as dying."""
        child = os.fork()
        if child == 0:
            os._exit(0)
        started = _session._start_time(child)
        os.waitpid(child, 0)
        self.assertTrue(_session._dying(child, started))
        self.assertTrue(_session._dying(os.getpid(), b"1"))  # another start time

    def test_zombie_leader(self) -> None:
        """
        A process whose main thread exited is a zombie (state Z) even while
        other threads still run and hold its files: that counts as dying.
        """
        child = os.fork()
        if child == 0:
            os._exit(0)
        try:
            deadline = time.monotonic() + 5
            while proc_stat(child) is None or proc_stat(child)[0] != "Z":  # type: ignore[index]
                self.assertLess(time.monotonic(), deadline, "no zombie")
                time.sleep(0.01)
            self.assertTrue(_session._dying(child, None))
        finally:
            os.waitpid(child, 0)


# A llamaswap stand-in whose main thread exits first (as the spawning thread
# does under kill -9 while a thread pool lives on): the server gets its
# parent-death signal while the stdin pipe is still open for LINGER seconds.
_MAIN_THREAD_EXITS_FIRST = """
import ctypes, os, subprocess, sys, threading, time
wrapper, linger = sys.argv[1], float(sys.argv[2])
server = subprocess.Popen(
    [sys.executable, "-I", "-S", wrapper, "5.0", "/bin/sh", "sh", "-c",
     "sleep 300 & sleep 300; wait"],
    stdin=subprocess.PIPE,
)
print(server.pid, flush=True)
threading.Thread(target=lambda: (time.sleep(linger), os._exit(0))).start()
sys.stdin.read()  # until the test says go
ctypes.CDLL(None).pthread_exit(None)
"""


class KillNineTests(TestCase):
    timeout = 60

    async def test_main_thread_exits_first(self) -> None:
        """
        llamaswap's main thread dies while another thread keeps its files (our
        stdin pipe) open for 10 s more: the server gets its parent-death signal
        and the guard, seeing llamaswap's main thread gone, stops the whole
        group (the shell's children too) at once, not when the pipe closes.
        """
        proto = ChildOutput()
        args = [PY, "-c", _MAIN_THREAD_EXITS_FIRST, _session.__file__, "10"]
        transport = reactor.spawnProcess(proto, PY, args, env=dict(os.environ))
        self.addCleanup(self._reap, transport, proto)
        await proto.wait_for(b"\n").addTimeout(10, reactor)
        server = int(proto.output.split()[0])
        await wait_until(lambda: len(group(server)) == 4, 10, "sh, two sleeps and the guard")
        members = group(server)
        self.addCleanup(self._kill_all, members)
        transport.closeStdin()  # go: the main thread exits
        started = time.monotonic()
        await all_gone(members, 3, "the group")
        self.assertLess(time.monotonic() - started, 3)
        self.assertFalse(proto.done, "the stand-in's other thread should still run")

    @staticmethod
    def _kill_all(pids: list[int]) -> None:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

    async def test_kill_9_of_twistd_leaves_no_child(self) -> None:
        """
        C{kill -9} of a C{twistd llamaswap} running two profile models (one
        with a grandchild, one behind C{sh -c}) leaves none of them running.
        """
        try:
            import llamaswap.web.tree  # noqa: F401
        except ImportError as e:
            raise SkipTest(f"the web modules are not importable yet: {e}") from e
        port_a, port_b = free_ports(2)
        base = os.path.abspath(self.mktemp())
        os.makedirs(base)
        config_path = os.path.join(base, "config.yaml")
        with open(config_path, "w") as f:
            f.write(
                f"""
models:
  a:
    cmd: {FAKE} --name a --port {port_a} --fork-grandchild
    proxy: http://127.0.0.1:{port_a}
    {ENV}
  b:
    cmd: sh -c '{FAKE} --name b --port {port_b}; echo b ended'
    proxy: http://127.0.0.1:{port_b}
    {ENV}
    unloadTimeout: 2
profiles:
  p: [a, b]
"""
            )
        proto = ChildOutput()
        args = [PY, "-m", "twisted", "--log-format=text", "llamaswap"]
        args += ["--config", config_path, "--listen", "tcp:0:interface=127.0.0.1"]
        transport = reactor.spawnProcess(proto, PY, args, env=fakeserver_env(), path=base)
        twistd = transport.pid
        self.addCleanup(self._reap, transport, proto)
        await proto.wait_for(b"/ui/)").addTimeout(20, reactor)  # the end of the line
        found = re.search(rb"llamaswap listening on http://127\.0\.0\.1:(\d+) ", proto.output)
        assert found is not None, proto.text()
        listen = int(found.group(1))
        http, pool = make_http(reactor, persistent=False)
        self.addCleanup(pool.closeCachedConnections)
        for name in ("p:a", "p:b"):
            body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
            url = f"http://127.0.0.1:{listen}/v1/chat/completions"
            response = await http.post(url, json=body)
            answer = json.loads(await response.content())
            self.assertEqual(response.code, 200, answer)
            self.assertEqual(answer["served_by"], name[2:])

        servers = children_of(twistd)
        self.assertEqual(len(servers), 2, [command(p) for p in servers])
        members = [p for pid in servers for p in group(pid)]
        # a: server, guard, grandchild; b: sh, guard, server.
        self.assertGreaterEqual(len(members), 6, [command(p) for p in members])

        os.kill(twistd, signal.SIGKILL)
        await proto.ended()
        await all_gone(members, 10, "the children")
        for pid in servers:
            self.assertEqual(group(pid), [])

    async def _reap(self, transport: Any, proto: ChildOutput) -> None:
        if transport.pid is not None:
            os.kill(transport.pid, signal.SIGKILL)
        await proto.ended()
