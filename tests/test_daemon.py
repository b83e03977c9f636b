# -*- test-case-name: tests.test_daemon -*-
"""
Operations tests: llamaswap run the way it is deployed.

These launch real C{twistd} processes (daemonized, and in the foreground with
a socket handed over the way systemd's socket activation does it) with a model
served by L{llamaswap.fakeserver}, and check what an operator sees: the
pidfile, the logfile, the exit status, and that no model server outlives the
proxy. See docs/deployment.md.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fakeserver_helper import free_port
from tests.proctools import (
    TWISTD,
    ChildOutput,
    alive,
    proc_stat,
    send_signal,
    twistd_env,
    wait_until,
)


def _write_config(
    folder: Path, *, start_port: int, model_options: str = "", settings: str = ""
) -> Path:
    """
    A config whose only model runs C{./run.sh}, a wrapper next to the config:
    it only works if relative paths resolve against the config's folder (the
    daemon itself runs in C{/}).
    """
    run_sh = folder / "run.sh"
    run_sh.write_text(
        "#!/bin/sh\n"
        "# Written by tests/test_daemon.py: a wrapper found relative to the config.\n"
        f'exec {shlex.quote(sys.executable)} -m llamaswap.fakeserver "$@"\n'
    )
    run_sh.chmod(0o755)
    config = folder / "c.yaml"
    config.write_text(
        f"startPort: {start_port}\n{settings}"
        "healthCheckTimeout: 30\n"
        "unloadTimeout: 5\n"
        "models:\n"
        "  X:\n"
        f"    cmd: ./run.sh --port ${{PORT}} --name X {model_options}\n"
    )
    return config


def _descendants(root: int) -> dict[int, int]:
    """Every live descendant of C{root}: pid -> starttime (to detect pid reuse)."""
    parents: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None and stat.state != "Z":
                parents[int(entry)] = (stat.ppid, stat.starttime)
    found: dict[int, int] = {}
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, start) in parents.items():
            if ppid == parent and pid not in found:
                found[pid] = start
                frontier.append(pid)
    return found


def _run(argv: list[str], env: dict[str, str], **kw: Any) -> ChildOutput:
    proto = ChildOutput()
    reactor.spawnProcess(proto, argv[0], argv, env=env, **kw)
    return proto


class _Daemon:
    """Paths and pid of one daemonized twistd."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pidfile = folder / "l.pid"
        self.logfile = folder / "l.log"

    def argv(self, config: Path, listen: str, *twistd_options: str) -> list[str]:
        return [
            *TWISTD,
            *twistd_options,
            "--pidfile",
            str(self.pidfile),
            "--logfile",
            str(self.logfile),
            "llamaswap",
            "--config",
            str(config),
            "--listen",
            listen,
        ]

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def pid(self) -> int:
        return int(self.pidfile.read_text().strip())


def kill_on_cleanup(case: TestCase, daemon: _Daemon) -> None:
    """A failing test must not leave a daemon (or its models) running."""

    def cleanup() -> None:
        try:
            pid = daemon.pid()
        except (OSError, ValueError):
            return
        for child in _descendants(pid):
            send_signal(child, signal.SIGKILL)
        send_signal(pid, signal.SIGKILL)

    case.addCleanup(cleanup)


class DaemonCase(TestCase):
    """A folder for a daemon's files, and an HTTP client that keeps no connection."""

    timeout = 90

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        self.http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]
        self.addCleanup(pool.closeCachedConnections)


class DaemonModeTests(DaemonCase):
    """C{twistd --pidfile … --logfile … llamaswap …} (the classic daemon)."""

    def _kill_on_cleanup(self, daemon: _Daemon) -> None:
        kill_on_cleanup(self, daemon)

    async def test_serves_and_stops_cleanly(self) -> None:
        """
        Daemonized (and moved to C{/} with C{--rundir}, as init scripts do),
        llamaswap writes its pid, answers through a model started from a
        wrapper given relative to the config (model servers run in the config's
        folder), logs to the logfile, and on SIGTERM stops its model servers and
        their children, removes the pidfile and exits.
        """
        config = _write_config(
            self.folder,
            start_port=free_port(),
            model_options="--fork-grandchild",
            settings="logToStdout: both\n",  # the model server's output goes to the logfile too
        )
        daemon = _Daemon(self.folder)
        self._kill_on_cleanup(daemon)

        launcher = _run(
            daemon.argv(config, "tcp:0:interface=127.0.0.1", "--rundir", "/"),
            twistd_env(),
            path=str(self.folder),
        )
        code, _ = await launcher.ended()
        # The launching process waits for startApplication, then exits 0.
        self.assertEqual(code, 0, launcher.output.decode(errors="replace"))
        pid = daemon.pid()
        self.assertTrue(alive(pid))
        self.assertEqual(os.readlink(f"/proc/{pid}/cwd"), "/")

        await wait_until(lambda: "listening on" in daemon.log(), 30, "the listening line")
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", daemon.log())
        assert match is not None, daemon.log()
        base = f"http://127.0.0.1:{match.group(1)}"

        response = await self.http.post(
            f"{base}/v1/chat/completions",
            json={"model": "X", "messages": [{"role": "user", "content": "hi"}]},
        )
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(json.loads(body)["served_by"], "X")

        # The model server and the grandchild it forked.
        children = _descendants(pid)
        self.assertGreaterEqual(len(children), 2, f"descendants of {pid}: {children}")
        for child in children:
            cwd = os.readlink(f"/proc/{child}/cwd")
            self.assertEqual(cwd, str(self.folder), f"pid {child} runs in {cwd}")

        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not alive(pid), 30, "the daemon to exit")
        survivors = [child for child, start in children.items() if alive(child, start)]
        self.assertEqual(survivors, [], "model servers survived the daemon")
        self.assertFalse(daemon.pidfile.exists(), "the pidfile was left behind")

        log = daemon.log()
        self.assertIn("llamaswap listening on", log)
        after_start = log.split("listening on", 1)[1]
        self.assertRegex(after_start, r"\bX\b", "no proxy log line about model X")
        # twistd got SIGTERM; then the model server did, and its last words were
        # relayed before the daemon exited: llamaswap waited for it.
        stopping = after_start.split("Received SIGTERM, shutting down.", 1)[1]
        self.assertIn("Received SIGTERM, exiting", stopping)
        self.assertIn("Server Shut Down.", stopping)

    async def test_config_error_before_daemonizing(self) -> None:
        """
        A broken config is reported on the launching terminal with its dotted
        path, the exit status is 1, and no pidfile or daemon is left.
        """
        config = self.folder / "c.yaml"
        config.write_text("models:\n  X:\n    cmd: run --port ${PORT}\n    ttl: -5\n")
        daemon = _Daemon(self.folder)
        self._kill_on_cleanup(daemon)

        launcher = _run(daemon.argv(config, "tcp:0"), twistd_env(), path=str(self.folder))
        code, _ = await launcher.ended()
        self.assertEqual(code, 1)
        self.assertIn(b"models.X.ttl", launcher.output)
        self.assertFalse(daemon.pidfile.exists())

    async def test_port_in_use(self) -> None:
        """
        If the listening port is taken, the launching process prints one line
        naming the address and what to do, whole (twistd would pass on only
        100 bytes from the daemon), and exits 1 (what a C{Type=forking} unit or
        an init script checks): it is found before the fork, so no daemon,
        pidfile or log file is left.
        """
        config = _write_config(self.folder, start_port=free_port())
        daemon = _Daemon(self.folder)
        self._kill_on_cleanup(daemon)
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        launcher = _run(
            daemon.argv(config, f"tcp:{port}:interface=127.0.0.1"),
            twistd_env(),
            path=str(self.folder),
        )
        code, _ = await launcher.ended()
        self.assertEqual(code, 1)
        self.assertEqual(
            launcher.text(),
            f"llamaswap: cannot listen on 127.0.0.1:{port}: address already in use (is another "
            "llamaswap running? choose another port with --listen tcp:PORT:interface=127.0.0.1)\n",
        )
        self.assertFalse(daemon.pidfile.exists())
        self.assertFalse(daemon.logfile.exists())

    async def test_log_files_are_bounded(self) -> None:
        """
        The daemon's log file rotates at logRotation.maxBytes and keeps
        logRotation.keep rotated files: older ones, those of an earlier run
        included, are deleted. With logRequests, the UI's own files (the page,
        app.js, the favicon) leave no access line; API requests do.
        """
        settings = "logRequests: true\nlogRotation: {maxBytes: 1024, keep: 2}\n"
        config = _write_config(self.folder, start_port=free_port(), settings=settings)
        daemon = _Daemon(self.folder)
        self._kill_on_cleanup(daemon)
        for number in range(1, 7):  # left by an earlier run that kept everything
            Path(f"{daemon.logfile}.{number}").write_text(f"stale {number}\n")
        port = free_port()
        base = f"http://127.0.0.1:{port}"

        def logs() -> dict[str, str]:
            return {
                path.name: path.read_text(errors="replace")
                for path in sorted(self.folder.glob("l.log*"))
            }

        launcher = _run(
            daemon.argv(config, f"tcp:{port}:interface=127.0.0.1"),
            twistd_env(),
            path=str(self.folder),
        )
        code, _ = await launcher.ended()
        self.assertEqual(code, 0, launcher.text())
        pid = daemon.pid()
        await wait_until(
            lambda: "listening on" in "".join(logs().values()), 30, "the listening line"
        )
        for _ in range(30):  # ~3 KB of access lines: rotations
            response = await self.http.get(f"{base}/v1/models")
            await response.content()
        for path in ("/ui/", "/ui/app.js", "/favicon.ico"):
            response = await self.http.get(f"{base}{path}")
            await response.content()
            if path != "/favicon.ico":
                self.assertEqual(response.code, 200, path)
        await (await self.http.get(f"{base}/running")).content()
        await wait_until(
            lambda: '"GET /running"' in "".join(logs().values()), 30, "the last access line"
        )
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not alive(pid), 30, "the daemon to exit")

        files = logs()
        self.assertEqual(sorted(files), ["l.log", "l.log.1", "l.log.2"])
        text = "".join(files.values())
        self.assertNotIn("stale", text)
        self.assertIn('"GET /v1/models" 200', text)
        for path in ("/ui/", "/ui/app.js", "/favicon.ico"):
            self.assertNotIn(f'"GET {path}"', text)
        for name, content in files.items():
            # Each line is written whole, so a file passes the bound by at most one line.
            self.assertLess(len(content.encode()), 1024 + 1024, name)


class SocketActivationTests(TestCase):
    """C{--listen systemd:domain=INET:index=0}, as C{llamaswap.socket} starts us."""

    timeout = 60

    async def test_adopts_inherited_socket(self) -> None:
        """
        Given a listening socket as fd 3 with C{LISTEN_FDS}/C{LISTEN_PID}/
        C{LISTEN_FDNAMES} (what systemd passes), twistd -n serves on it, and
        exits 0 on SIGTERM.
        """
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        config = _write_config(folder, start_port=free_port())
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]

        # systemd sets LISTEN_PID to the pid it execs; a tiny launcher sets it
        # to its own pid and execs twistd, which keeps the pid (and fd 3).
        launch = (
            "import os, sys; os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
        )
        argv = [sys.executable, "-c", launch, *TWISTD[1:], "--nodaemon", "--pidfile="]
        argv += ["llamaswap", "--config", str(config)]
        argv += ["--listen", "systemd:domain=INET:index=0"]
        env = twistd_env(LISTEN_FDS="1", LISTEN_FDNAMES="llamaswap.socket")
        proto = _run(
            argv,
            env,
            path=str(folder),
            childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
        )
        self.addCleanup(_kill_if_running, proto)
        listener.close()  # only the child holds the socket now

        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]
        response = await http.get(f"http://127.0.0.1:{port}/v1/models")
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertIn("X", [m["id"] for m in json.loads(body)["data"]])

        os.kill(proto.pid, signal.SIGTERM)
        status = await proto.ended()
        # After a clean shutdown twistd re-raises the signal it got, so it dies
        # "by SIGTERM", which systemd counts as a successful stop.
        self.assertEqual(status, (None, signal.SIGTERM), proto.output.decode(errors="replace"))
        self.assertIn(b"Server Shut Down.", proto.output)


def _kill_if_running(proto: ProcessProtocol) -> None:
    # transport.pid becomes None once the child is reaped: no risk of pid reuse.
    pid = getattr(proto.transport, "pid", None)
    if pid is not None:
        send_signal(pid, signal.SIGKILL)
