# -*- test-case-name: tests.test_fakeserver,tests.test_http_integration -*-
"""
Start the fake upstream (``llamaswap.fakeserver``) as a real child process.

Usable from any test::

    from tests.fakeserver_helper import free_port, start_fakeserver

    server, port = start_fakeserver("--name", "alpha", "--tokens", "3")
    self.addCleanup(server.stop)
    urlopen(server.url("/health"))

``start_fakeserver`` blocks until the child prints its "listening on" line
(typically 0.3 s), so call it from a test method or ``setUp``, before the
reactor work of the test starts. The child runs in its own session (so
``stop`` can kill its whole process group) and its stdout/stderr are read by
two daemon threads into ``server.stdout_lines``/``server.stderr_lines``.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO, Any

import yaml

from llamaswap.config import Config, parse_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTENING = " listening on "


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """
    C{n} distinct TCP ports that were free a moment ago (held together while
    picked; the OS may hand them out again).
    """
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(s)
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS may hand it out again)."""
    return free_ports(1, host)[0]


def port_block(count: int, host: str = "127.0.0.1") -> int:
    """
    First of C{count} consecutive ports that were all free a moment ago, for a
    config's C{startPort}. Taken below Linux's ephemeral range (32768+), so
    that outgoing connections made meanwhile cannot grab one of them.
    """
    for _ in range(100):
        first = random.randrange(20000, 32768 - count)
        sockets = []
        try:
            for port in range(first, first + count):
                s = socket.socket()
                sockets.append(s)
                s.bind((host, port))
            return first
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no block of {count} free ports")


def fakeserver_command(*args: str) -> list[str]:
    """The argv that runs the fake upstream with this interpreter."""
    return [sys.executable, "-m", "llamaswap.fakeserver", *args]


def fakeserver_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment, with the checkout importable even when not installed."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = REPO_ROOT if not path else REPO_ROOT + os.pathsep + path
    env.update(extra or {})
    return env


class FakeServerProcess:
    """
    A running fake upstream.

    @ivar process: the L{subprocess.Popen}.
    @ivar port: the port it listens on, once known (see L{wait_listening}).
    @ivar stdout_lines: every stdout line so far (without newlines).
    @ivar stderr_lines: every stderr line so far.
    """

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.host = "127.0.0.1"
        if "--host" in self.args:
            self.host = self.args[self.args.index("--host") + 1]
        self.port: int | None = None
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            fakeserver_command(*self.args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=fakeserver_env(env),
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        assert self.process.stdout is not None and self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout_lines)),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr_lines)),
        ]
        for reader in self._readers:
            reader.daemon = True
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, stream: IO[bytes], lines: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            with self._changed:
                lines.append(line)
                if self.port is None and LISTENING in line:
                    self.port = int(line.rsplit(":", 1)[1])
                self._changed.notify_all()
        stream.close()
        with self._changed:
            self._changed.notify_all()

    def output(self) -> str:
        """stdout and stderr so far, as text (stdout first)."""
        with self._changed:
            return "\n".join([*self.stdout_lines, *self.stderr_lines])

    def wait_for_line(self, text: str, timeout: float = 10.0) -> str:
        """
        Block until a stdout or stderr line contains C{text}; return that line.

        @raise TimeoutError: not seen within C{timeout} seconds (or the process ended).
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in (*self.stdout_lines, *self.stderr_lines):
                    if text in line:
                        return line
                left = deadline - time.monotonic()
                ended = not any(r.is_alive() for r in self._readers)
                if left <= 0 or ended:
                    raise TimeoutError(f"no line containing {text!r}; output:\n{self.output()}")
                self._changed.wait(left)

    def wait_listening(self, timeout: float = 10.0) -> int:
        """Block until the server listens; return its port."""
        try:
            self.wait_for_line(LISTENING, timeout)
        except TimeoutError:
            self.stop()
            raise
        assert self.port is not None
        return self.port

    def url(self, path: str = "/") -> str:
        return f"http://{self.host}:{self.port}{path}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def signal(self, sig: int) -> None:
        """Send C{sig} to the server process only (not its group)."""
        if self.alive:
            os.kill(self.process.pid, sig)

    def wait_exit(self, timeout: float = 10.0) -> int:
        """Block until the process exits; return its status (negative: killed by a signal)."""
        code = self.process.wait(timeout)
        for reader in self._readers:
            reader.join(2.0)
        return code

    def stop(self, grace: float = 3.0) -> int:
        """
        SIGTERM the process group, SIGKILL it after C{grace}; return the exit
        status. Safe to call twice; always suitable for C{addCleanup}.
        """
        if self.alive:
            self._kill_group(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        # Also reap anything left in the group (e.g. --fork-grandchild).
        self._kill_group(signal.SIGKILL)
        return self.wait_exit(grace)

    def _kill_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except ProcessLookupError:
            pass


def spawn_fakeserver(*args: str, env: dict[str, str] | None = None) -> FakeServerProcess:
    """Start the fake upstream without waiting for it (for start-up failure tests)."""
    return FakeServerProcess(args, env)


def start_fakeserver(
    *args: str, env: dict[str, str] | None = None, timeout: float = 10.0
) -> tuple[FakeServerProcess, int]:
    """
    Start the fake upstream and wait until it listens.

    C{args} are its command-line flags; ``--port 0`` (an OS-chosen port, no
    race) is added unless given, and ``--name fake`` unless given.

    @return: the process handle and the port.
    @raise TimeoutError: it did not listen within C{timeout} (it is stopped).
    """
    argv = list(args)
    if "--port" not in argv:
        argv += ["--port", "0"]
    if "--name" not in argv:
        argv += ["--name", "fake"]
    server = FakeServerProcess(argv, env)
    port = server.wait_listening(timeout)
    return server, port


def fake_model(label: str, *flags: str, port: int | None = None, **keys: Any) -> dict[str, Any]:
    """
    A config entry for a model served by the fake upstream, answering as
    C{label} (C{flags} are its command-line flags, C{keys} more model keys).
    """
    port = port or free_port()
    return {
        "cmd": f"{sys.executable} -m llamaswap.fakeserver --port {port} --name {label} "
        f"--quiet {' '.join(flags)}",
        "proxy": f"http://127.0.0.1:{port}",
        "env": [f"PYTHONPATH={REPO_ROOT}"],
        **keys,
    }


def make_config(models: dict[str, dict[str, Any]], **top: Any) -> Config:
    """A config with these C{models} (see L{fake_model}) and C{top}-level keys."""
    return parse_config(yaml.safe_dump({"models": models, **top}))


def upstream_port(config: Config, model: str) -> int:
    """The port C{model}'s server listens on (from its C{proxy} URL)."""
    return int(config.models[model].proxy.rsplit(":", 1)[1])
