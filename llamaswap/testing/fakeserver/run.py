# -*- test-case-name: tests.test_fakeserver -*-
"""
Running the fake server as a program: plain-line logging to stdout/stderr,
and L{main}, which listens, announces itself, and stops on SIGTERM (unless
--ignore-sigterm) or SIGINT.

With C{--gpu-memory} and a fake GPU (C{LLAMASWAP_FAKE_GPU}, see
L{llamaswap.testing.fake_gpu}), the program takes its memory before it
listens (or exits 1, CUDA-like, when it does not fit) and gives it back, after
C{--gpu-release-delay}, however it ends but by SIGKILL.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType
from typing import IO, Any, cast

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from llamaswap.testing import fake_gpu
from llamaswap.testing.fakeserver.options import FakeOptions, parse_args
from llamaswap.testing.fakeserver.server import LOG_NAMESPACE, FakeServer, FakeSite
from llamaswap.testing.fakeserver.tree import build_root


@implementer(ILogObserver)
class _LineObserver:
    """Plain lines: info and below to stdout, warnings and above to stderr, flushed."""

    def __init__(self, out: IO[str], err: IO[str]) -> None:
        self._out = out
        self._err = err

    def __call__(self, event: LogEvent) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text = f"{text}\n{failure.getTraceback()}"
        stream = self._err if event.get("log_level", LogLevel.info) >= LogLevel.warn else self._out
        try:
            stream.write(text + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass  # stdout gone (the proxy closed its end): nothing useful to do


@implementer(ILogFilterPredicate)
class _OursOrSerious:
    """Our own events, and Twisted's errors; not Twisted's chatter."""

    def __call__(self, event: LogEvent) -> PredicateResult:
        if str(event.get("log_namespace", "")).startswith(LOG_NAMESPACE):
            return cast(PredicateResult, PredicateResult.maybe)
        if event.get("log_level", LogLevel.info) >= LogLevel.error:
            return cast(PredicateResult, PredicateResult.maybe)
        return cast(PredicateResult, PredicateResult.no)


def start_logging() -> None:
    """Send our log events (and Twisted's errors) to stdout/stderr as plain lines."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(line_buffering=True)
    observer = FilteringLogObserver(
        _LineObserver(sys.stdout, sys.stderr),
        [_OursOrSerious(), LogLevelFilterPredicate(LogLevel.info)],
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: Sequence[str] | None = None) -> int:
    """Run a fake upstream until SIGTERM/SIGINT; return the process exit status."""
    options = parse_args(argv)
    start_logging()
    from twisted.internet import reactor

    return _Program(options, reactor).run()


class _Program:
    """One run of the fake server as a process, on the global reactor."""

    def __init__(self, options: FakeOptions, reactor: Any) -> None:
        self.options = options
        self.reactor = reactor
        self.fake = FakeServer(options, reactor, exit_process=self._exit_process)
        self.log = self.fake.log
        self.exit_code = 0
        self.port: Any = None  # an IListeningPort once listening
        self.gpu_dir: str | None = None  # the fake GPU, while we hold memory on it

    def run(self) -> int:
        """Take the GPU memory, listen and serve until stopped; the exit status."""
        if not self._allocate_gpu():
            return 1
        try:
            return self._serve()
        finally:
            self._release_gpu()

    def _allocate_gpu(self) -> bool:
        """Take --gpu-memory on the fake GPU, if both are there; False: it did not fit."""
        options = self.options
        directory = fake_gpu.fake_gpu_dir()
        if options.gpu_memory is None or directory is None:
            return True
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        usage = fake_gpu.parse_gpu_memory(options.gpu_memory, visible)
        try:
            fake_gpu.allocate(directory, usage)
        except fake_gpu.AllocationError as e:
            # llama.cpp-like: the reason on stderr, exit 1, never listening.
            self.log.error("{error}", error=str(e))
            return False
        self.gpu_dir = directory
        self.log.info(
            "fakeserver {name}: allocated GPU memory {usage}",
            name=options.name,
            usage=", ".join(f"device {d}: {mib} MiB" for d, mib in usage.items()),
        )
        return True

    def _release_gpu(self) -> None:
        """Give the GPU memory back, --gpu-release-delay from now (once)."""
        directory, self.gpu_dir = self.gpu_dir, None
        if directory is not None:
            try:
                fake_gpu.release(directory, self.options.gpu_release_delay)
            except OSError as e:
                self.log.error("fakeserver: cannot release GPU memory: {e}", e=e)

    def _exit_process(self, code: int) -> None:
        """An abrupt exit (crash, /exit): no cleanup but the GPU memory's release."""
        self._release_gpu()
        os._exit(code)

    def _serve(self) -> int:
        options = self.options
        if options.exit_during_startup is not None:
            self.log.info("fakeserver {name}: loading model", name=options.name)
            self.log.info("fakeserver {name}: reading tensors", name=options.name)
            if options.startup_delay <= 0:
                self._say_load_failed()
                return options.exit_during_startup
            self.reactor.callLater(options.startup_delay, self._load_failed)
        site = FakeSite(build_root(self.fake), self.fake)
        try:
            self.port = self.reactor.listenTCP(options.port, site, interface=options.host)
        except Exception as e:  # CannotListenError: say why in one line
            self.log.error("fakeserver {name}: cannot listen: {e}", name=options.name, e=e)
            return 1
        self.reactor.callWhenRunning(self._started)
        self.reactor.run()
        return self.exit_code

    def _say_load_failed(self) -> None:
        self.log.error(
            "fakeserver {name}: failed to load model, exiting with {code}",
            name=self.options.name,
            code=self.options.exit_during_startup,
        )

    def _load_failed(self) -> None:
        self._say_load_failed()
        assert self.options.exit_during_startup is not None
        self.exit_code = self.options.exit_during_startup
        self.reactor.stop()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.reactor.callFromThread(self.fake.on_sigterm, self.reactor.stop)

    def _started(self) -> None:
        # Runs after Twisted installed its signal handlers, so ours replaces its
        # SIGTERM handler; and only then do we announce that we listen, so a
        # SIGTERM sent by whoever waits for that line meets our handler.
        options = self.options
        signal.signal(signal.SIGTERM, self._on_signal)
        assert self.port is not None
        self.log.info(
            "fakeserver {name} pid={pid} listening on {host}:{port}",
            name=options.name,
            pid=self.fake.pid,
            host=options.host,
            port=self.port.getHost().port,
        )
        if options.startup_delay > 0 and options.exit_during_startup is None:
            self.log.info("loading model for {delay}s", delay=options.startup_delay)
            self.reactor.callLater(options.startup_delay, self.log.info, "model loaded, ready")
        if options.fork_grandchild:
            self.fake.fork_grandchild()
