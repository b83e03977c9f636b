# -*- test-case-name: tests.test_fakeserver -*-
"""The fake server's command line: L{parse_args} turns it into a frozen L{FakeOptions}."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TypeVar

from attrs import frozen

from llamaswap.testing.fake_gpu import parse_gpu_memory

_T = TypeVar("_T")


@frozen
class FakeOptions:
    """The command line, parsed and checked."""

    name: str
    port: int = 0
    host: str = "127.0.0.1"
    startup_delay: float = 0.0
    never_healthy: bool = False
    exit_during_startup: int | None = None
    crash_after: int | None = None
    ignore_sigterm: bool = False
    fork_grandchild: bool = False
    tokens: int = 8
    token_delay: float = 0.0
    echo: bool = False
    quiet: bool = False
    expect_model: str | None = None
    http_threads: int = 0  # 0: unlimited
    close_after_stream: bool = False
    keep_alive_timeout: float = 0.0  # 0: never
    accept_delay: float = 0.0
    read_delay: float = 0.0
    gpu_memory: str | None = None  # --gpu-memory SPEC, checked (see fake_gpu.parse_gpu_memory)
    gpu_release_delay: float = 0.0


# What --like-llama-server turns on: cpp-httplib's habits, with llama-server's
# n_threads_http for -np 1 (n_parallel + 4; the nproc - 1 alternative is machine-dependent).
LLAMA_SERVER_HTTP_THREADS = 5
LLAMA_SERVER_KEEP_ALIVE = 5.0


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0:  # also rejects NaN
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> FakeOptions:
    """
    Parse the command line (``sys.argv[1:]`` when C{argv} is None).

    Exits with status 2 and a usage message on bad input, like any argparse tool.
    """
    parser = argparse.ArgumentParser(
        prog="python -m llamaswap.fakeserver",
        description="Fake OpenAI-compatible upstream (a llama-server stand-in).",
        allow_abbrev=False,
    )
    _add_behaviour(parser)
    _add_connections(parser)
    _add_gpu(parser)
    ns = parser.parse_args(argv)
    like = bool(ns.like_llama_server)
    return FakeOptions(
        port=ns.port,
        host=ns.host,
        name=ns.name,
        startup_delay=ns.startup_delay,
        never_healthy=ns.never_healthy,
        exit_during_startup=ns.exit_during_startup,
        crash_after=ns.crash_after,
        ignore_sigterm=ns.ignore_sigterm,
        fork_grandchild=ns.fork_grandchild,
        tokens=ns.tokens,
        token_delay=ns.token_delay,
        echo=ns.echo,
        quiet=ns.quiet,
        expect_model=ns.expect_model,
        http_threads=_given(ns.http_threads, LLAMA_SERVER_HTTP_THREADS if like else 0),
        close_after_stream=_given(ns.close_after_stream, like),
        keep_alive_timeout=_given(ns.keep_alive_timeout, LLAMA_SERVER_KEEP_ALIVE if like else 0.0),
        accept_delay=ns.accept_delay,
        read_delay=ns.read_delay,
        gpu_memory=ns.gpu_memory,
        gpu_release_delay=ns.gpu_release_delay,
    )


def _add_behaviour(parser: argparse.ArgumentParser) -> None:
    """Where to listen, what to answer, and the ways to misbehave."""
    parser.add_argument("--port", type=_non_negative_int, required=True, help="0 picks one")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", default="fake", help="identifying string in every answer")
    parser.add_argument("--startup-delay", type=_non_negative_float, default=0.0, metavar="S")
    parser.add_argument("--never-healthy", action="store_true")
    parser.add_argument(
        "--exit-during-startup",
        type=int,
        nargs="?",
        const=3,
        default=None,
        metavar="CODE",
        help="exit with CODE (default 3) after the startup delay, or at once",
    )
    parser.add_argument("--crash-after", type=_non_negative_int, default=None, metavar="N")
    parser.add_argument("--ignore-sigterm", action="store_true")
    parser.add_argument("--fork-grandchild", action="store_true")
    parser.add_argument("--tokens", type=_non_negative_int, default=8, metavar="N")
    parser.add_argument(
        "--token-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="seconds between token events (one write each) on every streamed route",
    )
    parser.add_argument("--echo", action="store_true", help="echo request headers and body")
    parser.add_argument("--quiet", action="store_true", help="no per-request log line")
    parser.add_argument("--expect-model", default=None, metavar="MODEL")


def _add_connections(parser: argparse.ArgumentParser) -> None:
    """
    Connection handling as llama-server (cpp-httplib) does it. None = not given,
    so that --like-llama-server can fill in what was not given explicitly.
    """
    parser.add_argument(
        "--http-threads",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="serve at most N connections at once, each held from accept to close "
        "(idle keep-alive included); later ones wait unread, FIFO. 0: unlimited (default)",
    )
    parser.add_argument(
        "--close-after-stream",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="close the connection after each chunked (streamed) answer, "
        "without a Connection: close header",
    )
    parser.add_argument(
        "--keep-alive-timeout",
        type=_non_negative_float,
        default=None,
        metavar="S",
        help="silently close a connection idle (no request in progress) for S seconds. "
        "0: never (default)",
    )
    parser.add_argument(
        "--accept-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="read nothing from a new connection until S seconds after it was accepted",
    )
    parser.add_argument(
        "--read-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="handle each request S seconds after it arrived (every request of a connection)",
    )
    parser.add_argument(
        "--like-llama-server",
        action="store_true",
        help=f"preset: --close-after-stream --keep-alive-timeout {LLAMA_SERVER_KEEP_ALIVE:g} "
        f"--http-threads {LLAMA_SERVER_HTTP_THREADS}, each unless given explicitly",
    )


def _gpu_memory(text: str) -> str:
    try:
        parse_gpu_memory(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _add_gpu(parser: argparse.ArgumentParser) -> None:
    """Memory on the fake GPU (L{llamaswap.testing.fake_gpu}), for memory-aware proxies."""
    parser.add_argument(
        "--gpu-memory",
        type=_gpu_memory,
        default=None,
        metavar="SPEC",
        help="when LLAMASWAP_FAKE_GPU names a fake GPU, allocate this on it before listening, "
        "or exit 1 with 'CUDA error: out of memory (...)' on stderr. SPEC: a size (12GiB, "
        "512MiB, 1.5G, 100M; binary units; a bare number is MiB) on the first device of "
        "CUDA_VISIBLE_DEVICES (else 0), or DEV=SIZE,DEV=SIZE over several devices",
    )
    parser.add_argument(
        "--gpu-release-delay",
        type=_non_negative_float,
        default=0.0,
        metavar="S",
        help="after exiting (SIGTERM, SIGINT, a crash; not SIGKILL), the memory stays used "
        "for S seconds, as a driver frees it a moment after the process is gone. Default 0",
    )


def _given(value: _T | None, default: _T) -> _T:
    return default if value is None else value
