# -*- test-case-name: tests.test_fakeserver -*-
# twisted.web's Request and Resource methods are unannotated.
# mypy: disable-error-code="no-untyped-call"
"""
A fake OpenAI-compatible upstream, standing in for llama-server.

Run it as ``python -m llamaswap.fakeserver --port N --name X``. The demo
models of ``config.example.yaml``, the integration tests and the benchmarks
use it, so it needs no GPU and no model file. Every answer says who served it
(``X-Served-By`` header, ``served_by`` JSON field, "Hello from X (token i)"
content), and flags make it misbehave the way real upstreams do: slow to load
(``--startup-delay``), never healthy, exiting during start-up, crashing after
N requests, deaf to SIGTERM, leaving a grandchild in its process group.

Connections can be handled the way llama-server's cpp-httplib does it (all off
by default; ``--like-llama-server`` turns on the first three):
``--http-threads N`` (N workers, each tied to one connection from accept to
close, idle keep-alive included; later connections wait unread, FIFO),
``--close-after-stream`` (close after every chunked answer, with no
``Connection: close``), ``--keep-alive-timeout S`` (silently close a connection
idle for S seconds), plus ``--accept-delay S`` (a new connection is read S after
its accept) and ``--read-delay S`` (every request is handled S after it arrived).

Routes (JSON unless said otherwise; errors use OpenAI's ``{"error": {...}}``):

- ``GET /health`` (503 ``{"status": "loading"}`` while loading), ``/v1/models``,
  ``/props``, ``/`` (text ``"GET /"``), ``/env``, ``/pid``, ``/gzip``.
- ``POST /v1/chat/completions``, ``/v1/completions``, ``/completion``,
  ``/infill``, ``/v1/messages`` (Anthropic), ``/v1/responses``: streamed when
  the body says ``"stream": true``. The body may set ``fake_tokens``,
  ``fake_token_delay`` (seconds between token events) and ``fake_delay``
  (seconds before answering; also ``?wait=500ms``); ``max_tokens`` cuts short.
- ``POST /v1/embeddings`` (8-d, deterministic, float or base64),
  ``/v1/rerank``, ``/v1/reranking``, ``/rerank``,
  ``/v1/messages/count_tokens``, ``/v1/audio/transcriptions`` (multipart),
  ``/v1/audio/speech``, ``GET /v1/audio/voices``, ``/v1/images/generations``,
  ``/v1/images/edits`` (multipart). While loading, every POST route answers 503.
- Test helpers: ``/slow-respond?echo=TEXT&delay=100ms``, ``/big?mb=N``,
  ``/sse?events=N[&delay=S]``, ``/status/<code>[?location=URL]``, ``/echo/...`` (any
  method), ``/exit?code=N`` (dies without answering), ``GET /debug/stats``
  (counters, connections included), ``GET /debug/disconnects``. ``/sse`` is
  paced by ``--token-delay`` unless ``?delay=`` says otherwise.

The tree also runs in-process (``StubTreq(build_root(FakeServer(FakeOptions(
name="x"), clock)))``), driven by a test clock. The connection options live in
L{FakeSite} and its channels, so they need ``FakeSite(build_root(fake), fake)``
(a real port, or ``buildProtocol`` on an in-memory transport), not StubTreq.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from types import FrameType
from typing import IO, Any, TypeAlias, TypeVar, cast
from urllib.parse import parse_qs
from weakref import WeakKeyDictionary

from attrs import field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from zope.interface import implementer

JSONObject: TypeAlias = dict[str, Any]
RenderResult: TypeAlias = bytes | int
Handler: TypeAlias = Callable[[Request], RenderResult]
_T = TypeVar("_T")

LOG_NAMESPACE = "llamaswap.fakeserver"
EMBEDDING_DIM = 8
BIG_CHUNK = 64 * 1024
MIB = 1024 * 1024
# 1x1 transparent PNG: what the image endpoints hand back.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)
DEFAULT_SLOW_TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


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
    # Connection handling as llama-server (cpp-httplib) does it. None = not given,
    # so that --like-llama-server can fill in what was not given explicitly.
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
    )


def _given(value: _T | None, default: _T) -> _T:
    return default if value is None else value


def parse_duration(text: str) -> float:
    """
    Seconds from C{"0.5"}, C{"500ms"}, C{"2s"} or C{"1m"} (Go-style suffixes,
    so tests ported from llama-swap keep working).

    @raise ValueError: unparseable or negative.
    """
    units = (("ms", 0.001), ("us", 0.000001), ("s", 1.0), ("m", 60.0))
    for suffix, scale in units:
        if text.endswith(suffix):
            value = float(text[: -len(suffix)]) * scale
            break
    else:
        value = float(text)
    if not value >= 0:
        raise ValueError(f"bad duration: {text!r}")
    return value


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


class _HTTPError(Exception):
    """Raised by a handler to answer with a JSON error instead."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


@frozen
class _Generation:
    """What one generation request asked for, after defaults and overrides."""

    model: str
    tokens: int
    token_delay: float
    finish_reason: str  # "stop", or "length" when max_tokens cut it short
    prompt_tokens: int
    wait: float  # delay before anything is sent (fake_delay / ?wait=)


@frozen
class _Disconnect:
    path: str
    at: float
    frames_written: int


@frozen
class _Stream:
    """A response body: frames written at once, frames paced, frames at the end."""

    head: Sequence[bytes]
    paced: Iterable[bytes]
    tail: Iterable[bytes] = field(default=())
    delay: float = 0.0
    content_type: bytes = b"text/event-stream"


# Why a connection is not being read yet (see _Channel._hold).
_HOLD_WORKER = "worker"  # every --http-threads slot is taken
_HOLD_ACCEPT = "accept"  # its --accept-delay is not over


class _Channel(http.HTTPChannel):
    """
    HTTPChannel that reports when its socket is really closed (after flushing),
    and that can be held unread: while it waits for a worker slot
    (--http-threads) or for its --accept-delay, its transport is paused, so the
    request stays in the socket as it does in llama-server's accept queue.
    """

    def __init__(self) -> None:
        super().__init__()
        self._holds: set[str] = set()
        self._accept_call: IDelayedCall | None = None
        self._idle_call: IDelayedCall | None = None
        self._gone = False

    @property
    def _fake(self) -> FakeServer | None:
        site = getattr(self, "site", None)
        return site.fake if isinstance(site, FakeSite) else None

    def connectionMade(self) -> None:
        super().connectionMade()
        fake = self._fake
        if fake is None:
            return
        if fake.options.accept_delay > 0:
            self._hold(_HOLD_ACCEPT)
            self._accept_call = fake.clock.callLater(
                fake.options.accept_delay, self._accept_delay_over
            )
        if not fake.on_channel_open(self):
            self._hold(_HOLD_WORKER)
        if not self._holds:
            self._arm_idle()

    def worker_granted(self) -> None:
        """A worker slot freed up for this waiting connection."""
        self._release(_HOLD_WORKER)

    def _accept_delay_over(self) -> None:
        self._accept_call = None
        self._release(_HOLD_ACCEPT)

    def _hold(self, why: str) -> None:
        if not self._holds:
            IPushProducer(self.transport).pauseProducing()
        self._holds.add(why)

    def _release(self, why: str) -> None:
        self._holds.discard(why)
        if not self._holds and not self._gone:
            # Served from now on: read what waited in the socket.
            IPushProducer(self.transport).resumeProducing()
            self._arm_idle()

    # -- keep-alive timeout: armed while no request is in progress ------------

    def _arm_idle(self) -> None:
        fake = self._fake
        if fake is None or fake.options.keep_alive_timeout <= 0 or self._gone:
            return
        self._cancel_idle()
        self._idle_call = fake.clock.callLater(fake.options.keep_alive_timeout, self._idle_over)

    def _cancel_idle(self) -> None:
        if self._idle_call is not None:
            if self._idle_call.active():
                self._idle_call.cancel()
            self._idle_call = None

    def _idle_over(self) -> None:
        self._idle_call = None
        fake = self._fake
        if self.requests or self._gone or fake is None:
            return  # defensive: a request began (dataReceived cancels us)
        fake.closed_idle += 1
        self.loseConnection()  # silently, as cpp-httplib does: no response, no header

    def dataReceived(self, data: bytes) -> None:
        # Any byte starts a request: the connection is no longer idle.
        self._cancel_idle()
        super().dataReceived(data)

    def requestDone(self, request: http.Request) -> None:
        super().requestDone(request)
        # Still open, and no pipelined request took over: idle again.
        if self.persistent and not self.requests:
            self._arm_idle()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._gone = True
        self._cancel_idle()
        if self._accept_call is not None and self._accept_call.active():
            self._accept_call.cancel()
        self._accept_call = None
        super().connectionLost(reason)
        fake = self._fake
        if fake is not None:
            fake.on_channel_closed(self)


class _FakeRequest(server.Request):
    """A request that can wait before being handled, and close its connection after a stream."""

    @property
    def _fake(self) -> FakeServer | None:
        # No channel once the request is done (finish called twice only warns).
        site = getattr(getattr(self, "channel", None), "site", None)
        return site.fake if isinstance(site, FakeSite) else None

    def process(self) -> None:
        fake = self._fake
        delay = 0.0 if fake is None else fake.options.read_delay
        if fake is None or delay <= 0:
            super().process()
            return
        # The whole request has arrived; HTTPChannel buffers anything after it.
        call = fake.clock.callLater(delay, super().process)
        self.notifyFinish().addErrback(lambda _: call.cancel() if call.active() else None)

    def finish(self) -> None:
        fake = self._fake
        if (
            fake is not None
            and fake.options.close_after_stream
            and self.chunked
            and not self.finished
            and not self._disconnected
            and self.channel.persistent
        ):
            # cpp-httplib closes after every chunked answer, and says nothing
            # about it (no Connection: close; the headers are long gone anyway).
            # The terminating chunk is still written; requestDone then closes.
            self.channel.persistent = False
            fake.closed_after_stream += 1
        super().finish()


class FakeSite(server.Site):
    """Site without an access log (one stdout line per request is ours to write)."""

    protocol = _Channel  # type: ignore[assignment]
    requestFactory = _FakeRequest
    noisy = False

    def __init__(self, resource: IResource, fake: FakeServer) -> None:
        super().__init__(resource, logPath=None, reactor=fake.clock)
        self.fake = fake

    def log(self, request: http.Request) -> None:
        pass  # the combined-log line costs time and is noise here


class FakeServer:
    """
    The mutable state of one fake upstream: counters, the loading clock, the
    disconnect record, and the crash/exit behaviours.

    @param options: the parsed command line.
    @param clock: drives the startup delay and the token pacing.
    @param exit_process: abrupt exit (C{os._exit}); injectable for tests.
    """

    log = Logger(namespace=LOG_NAMESPACE)

    def __init__(
        self,
        options: FakeOptions,
        clock: IReactorTime,
        *,
        exit_process: Callable[[int], object] = os._exit,
    ) -> None:
        self.options = options
        self.clock = clock
        self.name = options.name
        self.name_bytes = options.name.encode("utf-8")
        self.pid = os.getpid()
        self.ready_at = clock.seconds() + options.startup_delay
        self.requests = 0
        self.health_checks = 0
        self.active = 0
        self.disconnects: list[_Disconnect] = []
        self.frames = 0  # stream frames written, all requests together
        self._frames_of: WeakKeyDictionary[Request, int] = WeakKeyDictionary()
        self.grandchild_pid: int | None = None
        self._exit_process = exit_process
        self._crash_channel: http.HTTPChannel | None = None
        self._ids = 0
        # Connections, and the --http-threads worker pool.
        self.connections_accepted = 0
        self.closed_after_stream = 0
        self.closed_idle = 0
        self.max_connections_served = 0
        self.max_connections_waiting = 0
        self._served: set[_Channel] = set()
        self._waiting: deque[_Channel] = deque()

    @property
    def loading(self) -> bool:
        """True while /health should answer 503."""
        return self.options.never_healthy or self.clock.seconds() < self.ready_at

    def next_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self.pid}-{self._ids}"

    # -- request accounting -------------------------------------------------

    def on_request(self, request: Request) -> None:
        """
        Count, log and watch one incoming request. /health and /debug/* are
        not counted (probes would otherwise trip --crash-after).
        """
        request.setHeader(b"x-served-by", self.name_bytes)
        path = request.path
        if path == b"/health":
            self.health_checks += 1
            return
        if path.startswith(b"/debug/"):
            return
        self.requests += 1
        if not self.options.quiet:
            self.log.info(
                "{method} {uri}",
                method=request.method.decode("ascii", "replace"),
                uri=request.uri.decode("utf-8", "replace"),
            )
        crash_after = self.options.crash_after
        if crash_after is not None:
            if self.requests > crash_after:
                self.crash(f"request {self.requests} arrived after --crash-after {crash_after}")
                return
            if self.requests == crash_after:
                # Serve this one completely, then die once its socket is closed.
                request.setHeader(b"connection", b"close")
                request.channel.persistent = False
                self._crash_channel = request.channel
        self.active += 1
        request.notifyFinish().addCallbacks(
            self._request_done, self._request_gone, errbackArgs=(request,)
        )

    def write_frame(self, request: Request, frame: bytes) -> None:
        """Write one piece of a streamed body, counting it."""
        request.write(frame)
        self._frames_of[request] = self._frames_of.get(request, 0) + 1
        self.frames += 1

    def _request_done(self, _: object) -> None:
        self.active -= 1

    def _request_gone(self, reason: Failure, request: Request) -> None:
        self.active -= 1
        path = request.path.decode("utf-8", "replace")
        written = self._frames_of.get(request, 0)
        self.disconnects.append(_Disconnect(path, time.monotonic(), written))
        self.log.info("client disconnected: {path}", path=path)

    def on_channel_open(self, channel: _Channel) -> bool:
        """
        A connection was accepted: give it a worker slot if one is free
        (C{True}), else queue it (C{False}: L{_Channel.worker_granted} later).
        """
        self.connections_accepted += 1
        limit = self.options.http_threads
        if limit and len(self._served) >= limit:
            self._waiting.append(channel)
            self.max_connections_waiting = max(self.max_connections_waiting, len(self._waiting))
            return False
        self._serve(channel)
        return True

    def _serve(self, channel: _Channel) -> None:
        self._served.add(channel)
        self.max_connections_served = max(self.max_connections_served, len(self._served))

    def on_channel_closed(self, channel: _Channel) -> None:
        if channel in self._served:
            self._served.discard(channel)
            # The freed worker takes the oldest waiting connection.
            if self._waiting:
                following = self._waiting.popleft()
                self._serve(following)
                following.worker_granted()
        elif channel in self._waiting:
            self._waiting.remove(channel)
        if channel is self._crash_channel:
            self.crash(f"served {self.options.crash_after} requests (--crash-after)")

    def crash(self, why: str) -> None:
        """Exit at once with status 1, like a segfaulting server (no cleanup)."""
        self.exit_now(1, why)

    def exit_now(self, code: int, why: str) -> None:
        self.log.error("exiting with status {code}: {why}", code=code, why=why)
        self._exit_process(code)

    def stats(self) -> JSONObject:
        return {
            "requests": self.requests,
            "health_checks": self.health_checks,
            "pid": self.pid,
            "active": self.active,
            "disconnects": len(self.disconnects),
            "frames": self.frames,
            "grandchild_pid": self.grandchild_pid,
            "loading": self.loading,
            "served_by": self.name,
            "connections_accepted": self.connections_accepted,
            "connections_served": len(self._served),
            "connections_waiting": len(self._waiting),
            "max_connections_served": self.max_connections_served,
            "max_connections_waiting": self.max_connections_waiting,
            "closed_after_stream": self.closed_after_stream,
            "closed_idle": self.closed_idle,
            "http_threads": self.options.http_threads,
            "close_after_stream": self.options.close_after_stream,
            "keep_alive_timeout": self.options.keep_alive_timeout,
        }

    # -- lifecycle helpers used by main() -----------------------------------

    def fork_grandchild(self) -> None:
        """Start ``sleep 300`` in our process group, holding our stdout/stderr."""
        child = subprocess.Popen(["sleep", "300"])
        self.grandchild_pid = child.pid
        self.log.info("forked grandchild pid={pid}", pid=child.pid)

    def on_sigterm(self, stop: Callable[[], object]) -> None:
        if self.options.ignore_sigterm:
            self.log.info("Ignoring SIGTERM")
        else:
            self.log.info("Received SIGTERM, exiting")
            stop()


# -- JSON helpers -------------------------------------------------------------


def _json(request: Request, obj: object, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return _dumps(obj)


def _error_body(status: int, message: str, kind: str, name: str) -> JSONObject:
    return {"error": {"code": status, "message": message, "type": kind}, "served_by": name}


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _read_json(request: Request) -> tuple[JSONObject, bytes]:
    raw = request.content.read() if request.content is not None else b""
    if not raw.strip():
        raise _HTTPError(400, "request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        raise _HTTPError(400, f"invalid JSON body: {e}") from None
    if not isinstance(body, dict):
        raise _HTTPError(400, "JSON body must be an object")
    return body, raw


def _words(value: object) -> int:
    """A rough token count of any JSON value (words in its strings)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(_words(v) for v in value)
    if isinstance(value, dict):
        return sum(_words(v) for v in value.values())
    return 0


def _embedding(text: str) -> list[float]:
    """A deterministic unit vector of dimension 8, rounded to float32."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_DIM]]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    packed = struct.pack(f"<{EMBEDDING_DIM}f", *(v / norm for v in raw))
    return list(struct.unpack(f"<{EMBEDDING_DIM}f", packed))


def _sse(obj: object) -> bytes:
    return b"data: " + _dumps(obj) + b"\n\n"


def _anthropic_event(kind: str, obj: JSONObject) -> bytes:
    return b"event: " + kind.encode("ascii") + b"\ndata: " + _dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# -- streaming ----------------------------------------------------------------


@implementer(IPushProducer)
class _FramePusher:
    """
    Writes frames as fast as the client takes them: a push producer that
    stops when the transport's buffer is full and goes on when it drains, so
    a large body never sits whole in memory.
    """

    def __init__(self, fake: FakeServer, request: Request, frames: Iterator[bytes]) -> None:
        self._fake = fake
        self._request = request
        self._frames = frames
        self._paused = False
        self._stopped = False

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        request = self._request
        for frame in self._frames:
            if self._stopped:
                return
            self._fake.write_frame(request, frame)
            if self._paused or self._stopped:
                return
        if not self._stopped:
            self._stopped = True
            request.unregisterProducer()
            request.finish()

    def stopProducing(self) -> None:
        self._stopped = True


class _Routes:
    """The request handlers; each takes a request and returns body bytes or NOT_DONE_YET."""

    def __init__(self, fake: FakeServer) -> None:
        self.fake = fake
        self.name = fake.name

    # -- generic helpers ----------------------------------------------------

    def error(self, request: Request, status: int, message: str, kind: str) -> bytes:
        return _json(request, _error_body(status, message, kind, self.name), status)

    def identity(self, request: Request, raw: bytes | None, model: str) -> JSONObject:
        """The fields every JSON answer to a POST carries."""
        out: JSONObject = {
            "served_by": self.name,
            "h_content_length": _header(request, b"content-length"),
        }
        if self.fake.options.echo:
            out["request_headers"] = _headers_dict(request)
            out["request_body"] = None if raw is None else raw.decode("utf-8", "replace")
        return out

    def check_model(self, model: str) -> None:
        expected = self.fake.options.expect_model
        if expected is not None and model != expected:
            raise _HTTPError(400, f"Invalid model: {model}, expected: {expected}")

    def generation(self, request: Request, body: JSONObject) -> _Generation:
        opts = self.fake.options
        model = body.get("model")
        if not isinstance(model, str) or not model:
            model = self.name
        self.check_model(model)
        tokens = body.get("fake_tokens", opts.tokens)
        if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= 10**7:
            raise _HTTPError(400, "fake_tokens must be an integer in [0, 10000000]")
        delay = body.get("fake_token_delay", opts.token_delay)
        if not isinstance(delay, int | float) or isinstance(delay, bool) or not 0 <= delay <= 60:
            raise _HTTPError(400, "fake_token_delay must be a number of seconds in [0, 60]")
        wait = body.get("fake_delay", 0)
        query_wait = request.args.get(b"wait")
        if query_wait:
            try:
                wait = parse_duration(query_wait[0].decode("ascii", "replace"))
            except ValueError:
                raise _HTTPError(400, "wait: bad duration") from None
        if not isinstance(wait, int | float) or isinstance(wait, bool) or not 0 <= wait <= 600:
            raise _HTTPError(400, "fake_delay must be a number of seconds in [0, 600]")
        finish = "stop"
        for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict"):
            limit = body.get(key)
            if isinstance(limit, int) and not isinstance(limit, bool) and 0 <= limit < tokens:
                tokens, finish = limit, "length"
                break
        prompt = sum(
            _words(body.get(k)) for k in ("messages", "prompt", "input", "system", "input_extra")
        )
        return _Generation(model, tokens, float(delay), finish, max(prompt, 1), float(wait))

    def token_text(self, i: int) -> str:
        text = f"Hello from {self.name} (token {i})"
        return text if i == 0 else " " + text

    def full_text(self, n: int) -> str:
        return "".join(self.token_text(i) for i in range(n))

    def usage(self, gen: _Generation) -> JSONObject:
        return {
            "prompt_tokens": gen.prompt_tokens,
            "completion_tokens": gen.tokens,
            "total_tokens": gen.prompt_tokens + gen.tokens,
        }

    def timings(self, gen: _Generation) -> JSONObject:
        predicted_ms = gen.tokens * gen.token_delay * 1000.0
        return {
            "prompt_n": gen.prompt_tokens,
            "prompt_ms": 1.0,
            "predicted_n": gen.tokens,
            "predicted_ms": predicted_ms,
            "predicted_per_second": gen.tokens / (predicted_ms / 1000.0) if predicted_ms else 0.0,
        }

    def deliver(
        self, request: Request, wait: float, produce: Callable[[], bytes | _Stream]
    ) -> RenderResult:
        """
        Answer with C{produce()}: a whole body, or a L{_Stream}. With a C{wait},
        answer later, and not at all if the client leaves in the meantime.
        """
        if wait <= 0:
            result = produce()
            if isinstance(result, bytes):
                return result
            return self.start_stream(request, result)
        d = Deferred.fromCoroutine(self._deliver_later(request, wait, produce))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(_ignore_cancel)
        return server.NOT_DONE_YET

    async def _deliver_later(
        self, request: Request, wait: float, produce: Callable[[], bytes | _Stream]
    ) -> None:
        await deferLater(self.fake.clock, wait)
        result = produce()
        if isinstance(result, bytes):
            request.setHeader(b"content-length", b"%d" % len(result))
            request.write(result)
            request.finish()
        else:
            self.start_stream(request, result)

    def start_stream(self, request: Request, stream: _Stream) -> int:
        """
        Send C{stream}, writing each frame as soon as it is due, and stop at
        once when the client goes away.

        @return: C{NOT_DONE_YET}.
        """
        request.setHeader(b"content-type", stream.content_type)
        request.setHeader(b"cache-control", b"no-cache")
        request.setHeader(b"x-accel-buffering", b"no")
        if stream.delay <= 0:
            frames = chain(stream.head, stream.paced, stream.tail)
            _FramePusher(self.fake, request, frames).start()
            return server.NOT_DONE_YET
        d = Deferred.fromCoroutine(self._paced(request, stream))
        request.notifyFinish().addErrback(lambda _: d.cancel())
        d.addErrback(_ignore_cancel)
        return server.NOT_DONE_YET

    async def _paced(self, request: Request, stream: _Stream) -> None:
        fake = self.fake
        # The status line and headers go out at once, as llama-server's do,
        # even for streams whose first frame is a token (completions, /sse).
        request.write(b"")
        for frame in stream.head:
            fake.write_frame(request, frame)
        for frame in stream.paced:
            await deferLater(fake.clock, stream.delay)  # cancelled when the client leaves
            fake.write_frame(request, frame)
        for frame in stream.tail:
            fake.write_frame(request, frame)
        request.finish()

    # -- plain GET routes ---------------------------------------------------

    def root(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return request.method + b" " + request.uri

    def health(self, request: Request) -> bytes:
        if self.fake.loading:
            return _json(
                request,
                {
                    "status": "loading",
                    "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"},
                },
                503,
            )
        return _json(request, {"status": "ok"})

    def models(self, request: Request) -> bytes:
        entry = {
            "id": self.name,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "fakeserver",
        }
        if request.postpath and request.postpath != [b""]:
            wanted = b"/".join(request.postpath).decode("utf-8", "replace")
            if wanted != self.name:
                return self.error(request, 404, f"model not found: {wanted}", "not_found_error")
            return _json(request, {**entry, "served_by": self.name})
        return _json(request, {"object": "list", "data": [entry], "served_by": self.name})

    def env(self, request: Request) -> bytes:
        return _json(request, dict(os.environ))

    def pid(self, request: Request) -> bytes:
        return _json(request, {"pid": self.fake.pid, "served_by": self.name})

    def props(self, request: Request) -> bytes:
        return _json(
            request,
            {
                "model": self.name,
                "model_path": f"/models/{self.name}.gguf",
                "total_slots": 1,
                "default_generation_settings": {"n_ctx": 4096, "n_predict": -1},
                "build_info": "fakeserver",
                "served_by": self.name,
            },
        )

    def stats(self, request: Request) -> bytes:
        return _json(request, self.fake.stats())

    def disconnects(self, request: Request) -> bytes:
        return _json(
            request,
            [
                {"path": d.path, "at": d.at, "frames_written": d.frames_written}
                for d in self.fake.disconnects
            ],
        )

    def slow_respond(self, request: Request) -> RenderResult:
        text = _query(request, b"echo", DEFAULT_SLOW_TEXT)
        try:
            delay = parse_duration(_query(request, b"delay", "0.1"))
        except ValueError:
            return self.error(request, 400, "delay: bad duration", "invalid_request_error")
        frames = [c.encode("utf-8") for c in text]
        # Go's simple-responder sleeps after each character; so do we (a pause
        # before the first one would only delay the headers).
        head, paced = frames[:1], frames[1:]
        return self.start_stream(
            request,
            _Stream(head, paced, delay=delay, content_type=b"text/plain; charset=utf-8"),
        )

    def big(self, request: Request) -> RenderResult:
        try:
            size = int(float(_query(request, b"mb", "1")) * MIB)
        except ValueError:
            return self.error(request, 400, "mb must be a number", "invalid_request_error")
        if size < 0:
            return self.error(request, 400, "mb must be >= 0", "invalid_request_error")
        request.setHeader(b"content-length", b"%d" % size)
        chunk = (b"0123456789abcdef" * (BIG_CHUNK // 16))[:BIG_CHUNK]
        full, rest = divmod(size, BIG_CHUNK)
        frames = chain((chunk for _ in range(full)), [chunk[:rest]] if rest else [])
        return self.start_stream(
            request, _Stream((), frames, content_type=b"application/octet-stream")
        )

    def sse(self, request: Request) -> RenderResult:
        try:
            count = int(_query(request, b"events", "100"))
        except ValueError:
            return self.error(request, 400, "events must be an integer", "invalid_request_error")
        try:
            # Paced like the token routes (--token-delay) unless ?delay= says otherwise.
            delay = parse_duration(_query(request, b"delay", str(self.fake.options.token_delay)))
        except ValueError:
            return self.error(request, 400, "delay: bad duration", "invalid_request_error")
        # Pre-split template: formatting one number is all the per-event work.
        prefix = (
            b'data: {"object":"chat.completion.chunk","model":"'
            + _dumps(self.name)[1:-1]
            + b'","choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}],"i":'
        )
        frames = (prefix + b"%d}\n\n" % i for i in range(max(count, 0)))
        return self.start_stream(request, _Stream((), frames, (SSE_DONE,), delay))

    def gzip(self, request: Request) -> bytes:
        accept = request.getHeader(b"accept-encoding") or b""
        payload = _dumps({"served_by": self.name, "text": "hello " * 200})
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"vary", b"Accept-Encoding")
        if b"gzip" in accept.lower():
            request.setHeader(b"content-encoding", b"gzip")
            return gzip.compress(payload, mtime=0)
        return payload

    def exit(self, request: Request) -> bytes:
        try:
            code = int(_query(request, b"code", "1"))
        except ValueError:
            code = 1
        self.fake.exit_now(code, "on request (/exit)")
        return b""  # only reached when exit_process is a test double

    def status(self, request: Request) -> bytes:
        segment = request.postpath[0] if request.postpath else b""
        try:
            code = int(segment)
        except ValueError:
            code = 0
        if not 100 <= code <= 599:
            return self.error(request, 400, "status must be 100..599", "invalid_request_error")
        location = request.args.get(b"location")
        if location:
            request.setHeader(b"location", location[0])
        body: JSONObject = {"status": code, "served_by": self.name}
        if code >= 400:
            body["error"] = {"code": code, "message": f"status {code} on demand", "type": "fake"}
        return _json(request, body, code)

    def echo(self, request: Request) -> bytes:
        raw = request.content.read() if request.content is not None else b""
        query = request.uri.partition(b"?")[2].decode("utf-8", "replace")
        out: JSONObject = {
            "method": request.method.decode("ascii", "replace"),
            "path": request.path.decode("utf-8", "replace"),
            "query": query,
            "args": parse_qs(query, keep_blank_values=True),
            "headers": _headers_dict(request),
            "body_length": len(raw),
            "body_sha256": hashlib.sha256(raw).hexdigest(),
            "content_length": _header(request, b"content-length"),
            "transfer_encoding": _header(request, b"transfer-encoding"),
            "served_by": self.name,
        }
        if len(raw) <= 65536:
            out["body"] = raw.decode("utf-8", "replace")
        return _json(request, out)

    # -- OpenAI ---------------------------------------------------------------

    def chat(self, request: Request) -> RenderResult:
        body, raw = _read_json(request)
        gen = self.generation(request, body)
        cid = self.fake.next_id("chatcmpl")
        created = int(time.time())

        def produce() -> bytes | _Stream:
            if not body.get("stream"):
                return _json(
                    request,
                    {
                        "id": cid,
                        "object": "chat.completion",
                        "created": created,
                        "model": gen.model,
                        "system_fingerprint": "fakeserver",
                        "choices": [
                            {
                                "index": 0,
                                "message": {
                                    "role": "assistant",
                                    "content": self.full_text(gen.tokens),
                                },
                                "logprobs": None,
                                "finish_reason": gen.finish_reason,
                            }
                        ],
                        "usage": self.usage(gen),
                        "timings": self.timings(gen),
                        **self.identity(request, raw, gen.model),
                    },
                )
            base = {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": gen.model,
                "system_fingerprint": "fakeserver",
                "served_by": self.name,
            }

            def chunk(delta: JSONObject, finish: str | None = None) -> JSONObject:
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
                return {**base, "choices": [choice]}

            tail = [_sse({**chunk({}, gen.finish_reason), "timings": self.timings(gen)})]
            if _include_usage(body):
                tail.append(_sse({**base, "choices": [], "usage": self.usage(gen)}))
            tail.append(SSE_DONE)
            return _Stream(
                [_sse(chunk({"role": "assistant", "content": ""}))],
                (_sse(chunk({"content": self.token_text(i)})) for i in range(gen.tokens)),
                tail,
                gen.token_delay,
            )

        return self.deliver(request, gen.wait, produce)

    def completions(self, request: Request) -> RenderResult:
        body, raw = _read_json(request)
        gen = self.generation(request, body)
        cid = self.fake.next_id("cmpl")
        created = int(time.time())
        base = {"id": cid, "object": "text_completion", "created": created, "model": gen.model}

        def choice(text: str, finish: str | None) -> JSONObject:
            return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}

        def produce() -> bytes | _Stream:
            if not body.get("stream"):
                return _json(
                    request,
                    {
                        **base,
                        "choices": [choice(self.full_text(gen.tokens), gen.finish_reason)],
                        "usage": self.usage(gen),
                        "timings": self.timings(gen),
                        **self.identity(request, raw, gen.model),
                    },
                )
            tail = [_sse({**base, "choices": [choice("", gen.finish_reason)]})]
            if _include_usage(body):
                tail.append(_sse({**base, "choices": [], "usage": self.usage(gen)}))
            tail.append(SSE_DONE)
            return _Stream(
                (),
                (
                    _sse({**base, "choices": [choice(self.token_text(i), None)]})
                    for i in range(gen.tokens)
                ),
                tail,
                gen.token_delay,
            )

        return self.deliver(request, gen.wait, produce)

    def native_completion(self, request: Request) -> RenderResult:
        """llama-server's own /completion and /infill."""
        body, raw = _read_json(request)
        gen = self.generation(request, body)

        def produce() -> bytes | _Stream:
            final = {
                "content": "",
                "stop": True,
                "model": gen.model,
                "tokens_predicted": gen.tokens,
                "tokens_evaluated": gen.prompt_tokens,
                "stop_type": "limit" if gen.finish_reason == "length" else "eos",
                "timings": self.timings(gen),
                "served_by": self.name,
            }
            if not body.get("stream"):
                return _json(
                    request,
                    {
                        **final,
                        "content": self.full_text(gen.tokens),
                        **self.identity(request, raw, gen.model),
                    },
                )
            # llama-server's native stream has no [DONE] terminator.
            return _Stream(
                (),
                (
                    _sse({"content": self.token_text(i), "stop": False, "index": 0})
                    for i in range(gen.tokens)
                ),
                [_sse(final)],
                gen.token_delay,
            )

        return self.deliver(request, gen.wait, produce)

    def embeddings(self, request: Request) -> bytes:
        body, raw = _read_json(request)
        model = _model_of(body, self.name)
        self.check_model(model)
        items = body.get("input", body.get("content"))
        if isinstance(items, str) or (
            isinstance(items, list) and items and all(isinstance(i, int) for i in items)
        ):
            items = [items]
        if not isinstance(items, list) or not items:
            raise _HTTPError(400, "input must be a string or a non-empty list")
        as_base64 = body.get("encoding_format") == "base64"
        data = []
        for index, item in enumerate(items):
            vector = _embedding(item if isinstance(item, str) else json.dumps(item))
            value: object = vector
            if as_base64:
                packed = struct.pack(f"<{EMBEDDING_DIM}f", *vector)
                value = base64.b64encode(packed).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": value})
        prompt = max(_words(items), 1)
        return _json(
            request,
            {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
                **self.identity(request, raw, model),
            },
        )

    def rerank(self, request: Request) -> bytes:
        body, raw = _read_json(request)
        model = _model_of(body, self.name)
        self.check_model(model)
        query = body.get("query")
        documents = body.get("documents")
        if not isinstance(query, str) or not isinstance(documents, list):
            raise _HTTPError(400, "rerank needs a string 'query' and a list 'documents'")
        texts = [d.get("text", "") if isinstance(d, dict) else str(d) for d in documents]
        query_words = set(query.lower().split())
        results = []
        for index, text in enumerate(texts):
            words = set(text.lower().split())
            overlap = len(query_words & words) / (len(query_words) or 1)
            # A tiny deterministic tie-breaker keeps equal overlaps ordered.
            jitter = hashlib.sha256(text.encode("utf-8")).digest()[0] / 1e5
            result: JSONObject = {"index": index, "relevance_score": overlap + jitter}
            if body.get("return_documents"):
                result["document"] = {"text": text}
            results.append(result)
        results.sort(key=lambda r: -float(r["relevance_score"]))
        top_n = body.get("top_n")
        if isinstance(top_n, int) and top_n >= 0:
            results = results[:top_n]
        tokens = max(_words(query) + _words(texts), 1)
        return _json(
            request,
            {
                "object": "list",
                "model": model,
                "results": results,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                **self.identity(request, raw, model),
            },
        )

    def responses(self, request: Request) -> RenderResult:
        """A minimal OpenAI Responses API: one assistant message of output_text."""
        body, raw = _read_json(request)
        gen = self.generation(request, body)
        rid, mid = self.fake.next_id("resp"), self.fake.next_id("msg")
        created = int(time.time())
        text = self.full_text(gen.tokens)
        usage = {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": gen.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.tokens,
        }

        def message(content: str, status: str) -> JSONObject:
            part = {"type": "output_text", "text": content, "annotations": []}
            return {
                "type": "message",
                "id": mid,
                "status": status,
                "role": "assistant",
                "content": [part] if status == "completed" else [],
            }

        def response(status: str, output: list[JSONObject], done: bool) -> JSONObject:
            return {
                "id": rid,
                "object": "response",
                "created_at": created,
                "status": status,
                "model": gen.model,
                "output": output,
                "parallel_tool_calls": True,
                "tool_choice": "auto",
                "tools": [],
                "usage": usage if done else None,
                "served_by": self.name,
            }

        def produce() -> bytes | _Stream:
            if not body.get("stream"):
                done = response("completed", [message(text, "completed")], True)
                return _json(request, {**done, **self.identity(request, raw, gen.model)})
            seq = iter(range(10**9))

            def event(kind: str, **fields: Any) -> bytes:
                payload = {"type": kind, "sequence_number": next(seq), **fields}
                return b"event: " + kind.encode() + b"\ndata: " + _dumps(payload) + b"\n\n"

            part = {"type": "output_text", "text": "", "annotations": []}
            where = {"item_id": mid, "output_index": 0, "content_index": 0}
            head = [
                event("response.created", response=response("in_progress", [], False)),
                event("response.in_progress", response=response("in_progress", [], False)),
                event(
                    "response.output_item.added", output_index=0, item=message("", "in_progress")
                ),
                event("response.content_part.added", part=part, **where),
            ]
            deltas = (
                event("response.output_text.delta", delta=self.token_text(i), logprobs=[], **where)
                for i in range(gen.tokens)
            )

            def tail() -> Iterator[bytes]:
                # A generator: runs after the deltas, so sequence numbers stay in order.
                yield event("response.output_text.done", text=text, logprobs=[], **where)
                yield event("response.content_part.done", part={**part, "text": text}, **where)
                final = message(text, "completed")
                yield event("response.output_item.done", output_index=0, item=final)
                yield event("response.completed", response=response("completed", [final], True))

            return _Stream(head, deltas, tail(), gen.token_delay)

        return self.deliver(request, gen.wait, produce)

    # -- Anthropic ------------------------------------------------------------

    def messages(self, request: Request) -> RenderResult:
        body, raw = _read_json(request)
        gen = self.generation(request, body)
        mid = self.fake.next_id("msg")
        stop_reason = "max_tokens" if gen.finish_reason == "length" else "end_turn"
        message: JSONObject = {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": gen.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": 0},
        }

        def produce() -> bytes | _Stream:
            if not body.get("stream"):
                done = {
                    **message,
                    "content": [{"type": "text", "text": self.full_text(gen.tokens)}],
                    "stop_reason": stop_reason,
                    "usage": {"input_tokens": gen.prompt_tokens, "output_tokens": gen.tokens},
                }
                return _json(request, {**done, **self.identity(request, raw, gen.model)})
            head = [
                _anthropic_event("message_start", {"type": "message_start", "message": message}),
                _anthropic_event(
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                _anthropic_event("ping", {"type": "ping"}),
            ]
            deltas = (
                _anthropic_event(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": self.token_text(i)},
                    },
                )
                for i in range(gen.tokens)
            )
            tail = [
                _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
                _anthropic_event(
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                        "usage": {"output_tokens": gen.tokens},
                    },
                ),
                _anthropic_event("message_stop", {"type": "message_stop"}),
            ]
            return _Stream(head, deltas, tail, gen.token_delay)

        return self.deliver(request, gen.wait, produce)

    def count_tokens(self, request: Request) -> bytes:
        body, raw = _read_json(request)
        model = _model_of(body, self.name)
        self.check_model(model)
        count = max(_words(body.get("messages")) + _words(body.get("system")), 1)
        return _json(request, {"input_tokens": count, **self.identity(request, raw, model)})

    # -- audio and images ---------------------------------------------------

    def transcriptions(self, request: Request) -> bytes:
        files = request.args.get(b"file")
        models = request.args.get(b"model")
        if not files or not models:
            raise _HTTPError(400, "multipart form needs 'model' and 'file' parts")
        model = models[0].decode("utf-8", "replace")
        self.check_model(model)
        return _json(
            request,
            {
                "text": f"The length of the file is {len(files[0])} bytes",
                "model": model,
                "h_content_type": _header(request, b"content-type"),
                **self.identity(request, None, model),
            },
        )

    def speech(self, request: Request) -> bytes:
        body, _ = _read_json(request)
        model = _model_of(body, self.name)
        self.check_model(model)
        text = str(body.get("input", ""))
        request.setHeader(b"content-type", b"audio/mpeg")
        # An ID3v2 header, then our signature: enough to look like an mp3 download.
        return b"ID3\x04\x00\x00\x00\x00\x00\x00" + f"{self.name}: {text}".encode()

    def voices(self, request: Request) -> bytes:
        model = _query(request, b"model", self.name)
        return _json(request, {"voices": ["voice1"], "model": model, "served_by": self.name})

    def image_generations(self, request: Request) -> bytes:
        body, raw = _read_json(request)
        model = _model_of(body, self.name)
        self.check_model(model)
        return self._images(request, model, body.get("n"), str(body.get("prompt", "")), raw)

    def image_edits(self, request: Request) -> bytes:
        if not request.args.get(b"image") and not request.args.get(b"image[]"):
            raise _HTTPError(400, "multipart form needs an 'image' part")
        model = _first_arg(request, b"model") or self.name
        self.check_model(model)
        n = _first_arg(request, b"n")
        prompt = _first_arg(request, b"prompt") or ""
        return self._images(request, model, int(n) if n and n.isdigit() else 1, prompt, None)

    def _images(
        self, request: Request, model: str, n: object, prompt: str, raw: bytes | None
    ) -> bytes:
        count = n if isinstance(n, int) and 1 <= n <= 10 else 1
        b64 = base64.b64encode(PNG_1X1).decode("ascii")
        return _json(
            request,
            {
                "created": int(time.time()),
                "data": [{"b64_json": b64, "revised_prompt": prompt} for _ in range(count)],
                "model": model,
                **self.identity(request, raw, model),
            },
        )


def _ignore_cancel(reason: Failure) -> None:
    # The client left and we cancelled our own work: that is the happy path.
    reason.trap(CancelledError)


def _include_usage(body: JSONObject) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and bool(options.get("include_usage"))


def _model_of(body: JSONObject, default: str) -> str:
    model = body.get("model")
    return model if isinstance(model, str) and model else default


def _query(request: Request, name: bytes, default: str) -> str:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else default


def _first_arg(request: Request, name: bytes) -> str | None:
    values = request.args.get(name)
    return values[0].decode("utf-8", "replace") if values else None


def _headers_dict(request: Request) -> dict[str, str]:
    return {
        name.decode("latin-1").lower(): ", ".join(v.decode("latin-1") for v in values)
        for name, values in request.requestHeaders.getAllRawHeaders()
    }


# -- the resource tree ----------------------------------------------------------


class _NotFound(Resource):
    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def render(self, request: Request) -> bytes:
        path = request.path.decode("utf-8", "replace")
        body = _error_body(404, f"no route for {path}", "not_found_error", self._name)
        return _json(request, body, 404)


class _Node(Resource):
    """An inner node: unknown children get a JSON 404, never Twisted's HTML page."""

    def __init__(self, name: str, here: _Endpoint | None = None) -> None:
        super().__init__()
        self._name = name
        self.here = here

    def getChild(self, path: bytes, request: Request) -> IResource:
        return _NotFound(self._name)

    def render(self, request: Request) -> RenderResult:
        if self.here is not None:
            return self.here.render(request)
        return _NotFound(self._name).render(request)


class _Root(_Node):
    """
    The root: traversal asks it for a child exactly once per request, which
    makes it the place to brand, count and log every request (whatever Site
    serves the tree, StubTreq's included).
    """

    def __init__(self, fake: FakeServer) -> None:
        super().__init__(fake.name)
        self._fake = fake

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:
        self._fake.on_request(request)
        return super().getChildWithDefault(path, request)  # type: ignore[no-any-return]

    def render(self, request: Request) -> RenderResult:
        # Only reached with an empty path (e.g. "OPTIONS *"): no child was asked for.
        self._fake.on_request(request)
        return super().render(request)


class _Endpoint(Resource):
    """
    A leaf answering some methods. C{gated} routes answer 503 while the model
    is "loading", as llama-server does.
    """

    isLeaf = True

    def __init__(
        self, routes: _Routes, handlers: dict[bytes, Handler], *, gated: bool = False
    ) -> None:
        super().__init__()
        self._routes = routes
        self._handlers = handlers
        if b"GET" in handlers and b"HEAD" not in handlers:
            self._handlers = {**handlers, b"HEAD": handlers[b"GET"]}
        self._gated = gated

    def render(self, request: Request) -> RenderResult:
        routes = self._routes
        handler = self._handlers.get(request.method) or self._handlers.get(b"*")
        if handler is None:
            request.setHeader(b"allow", b", ".join(sorted(self._handlers)))
            method = request.method.decode("ascii", "replace")
            return routes.error(
                request, 405, f"method {method} not allowed", "invalid_request_error"
            )
        if self._gated and routes.fake.loading:
            return routes.error(request, 503, "Loading model", "unavailable_error")
        try:
            return handler(request)
        except _HTTPError as e:
            return routes.error(request, e.status, e.message, e.kind)


def build_root(fake: FakeServer) -> Resource:
    """The resource tree of the fake upstream."""
    r = _Routes(fake)
    name = fake.name

    def get(handler: Handler) -> _Endpoint:
        return _Endpoint(r, {b"GET": handler})

    def post(handler: Handler) -> _Endpoint:
        return _Endpoint(r, {b"POST": handler}, gated=True)

    tree: dict[str, _Endpoint] = {
        "": get(r.root),
        "health": get(r.health),
        "props": get(r.props),
        "env": get(r.env),
        "pid": get(r.pid),
        "slow-respond": get(r.slow_respond),
        "big": get(r.big),
        "sse": get(r.sse),
        "gzip": get(r.gzip),
        "exit": _Endpoint(r, {b"*": r.exit}),
        "status": _Endpoint(r, {b"*": r.status}),
        "echo": _Endpoint(r, {b"*": r.echo}),
        "debug/stats": get(r.stats),
        "debug/disconnects": get(r.disconnects),
        "completion": post(r.native_completion),
        "completions": post(r.native_completion),
        "infill": post(r.native_completion),
        "rerank": post(r.rerank),
        "reranking": post(r.rerank),
        "embedding": post(r.embeddings),
        "embeddings": post(r.embeddings),
        "v1/models": get(r.models),
        "v1/chat/completions": post(r.chat),
        "v1/completions": post(r.completions),
        "v1/embeddings": post(r.embeddings),
        "v1/rerank": post(r.rerank),
        "v1/reranking": post(r.rerank),
        "v1/messages": post(r.messages),
        "v1/messages/count_tokens": post(r.count_tokens),
        "v1/responses": post(r.responses),
        "v1/audio/transcriptions": post(r.transcriptions),
        "v1/audio/speech": post(r.speech),
        "v1/audio/voices": get(r.voices),
        "v1/images/generations": post(r.image_generations),
        "v1/images/edits": post(r.image_edits),
    }
    root = _Root(fake)
    for path, endpoint in tree.items():
        *parents, last = (segment.encode() for segment in path.split("/"))
        node: _Node = root
        for segment in parents:
            child = node.children.get(segment)
            if not isinstance(child, _Node):
                # A leaf that also has children (/v1/messages) becomes a node.
                here = child if isinstance(child, _Endpoint) else None
                child = _Node(name, here)
                node.putChild(segment, child)
            node = child
        existing = node.children.get(last)
        if isinstance(existing, _Node):
            existing.here = endpoint
        else:
            node.putChild(last, endpoint)
    return root


# -- running it -----------------------------------------------------------------


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
    from twisted.internet import reactor as _reactor

    reactor: Any = _reactor
    fake = FakeServer(options, reactor)
    log = fake.log
    exit_code = [0]

    if options.exit_during_startup is not None:
        code = options.exit_during_startup
        log.info("fakeserver {name}: loading model", name=options.name)
        log.info("fakeserver {name}: reading tensors", name=options.name)
        if options.startup_delay <= 0:
            log.error(
                "fakeserver {name}: failed to load model, exiting with {code}",
                name=options.name,
                code=code,
            )
            return code

        def fail() -> None:
            log.error(
                "fakeserver {name}: failed to load model, exiting with {code}",
                name=options.name,
                code=code,
            )
            exit_code[0] = code
            reactor.stop()

        reactor.callLater(options.startup_delay, fail)

    site = FakeSite(build_root(fake), fake)
    try:
        port = reactor.listenTCP(options.port, site, interface=options.host)
    except Exception as e:  # CannotListenError: say why in one line
        log.error("fakeserver {name}: cannot listen: {e}", name=options.name, e=e)
        return 1

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reactor.callFromThread(fake.on_sigterm, reactor.stop)

    def started() -> None:
        # Runs after Twisted installed its signal handlers, so ours replaces its
        # SIGTERM handler; and only then do we announce that we listen, so a
        # SIGTERM sent by whoever waits for that line meets our handler.
        signal.signal(signal.SIGTERM, on_signal)
        log.info(
            "fakeserver {name} pid={pid} listening on {host}:{port}",
            name=options.name,
            pid=fake.pid,
            host=options.host,
            port=port.getHost().port,
        )
        if options.startup_delay > 0 and options.exit_during_startup is None:
            log.info("loading model for {delay}s", delay=options.startup_delay)
            reactor.callLater(options.startup_delay, log.info, "model loaded, ready")
        if options.fork_grandchild:
            fake.fork_grandchild()

    reactor.callWhenRunning(started)
    reactor.run()
    return exit_code[0]


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy, so that class names (and
    # thus Logger namespaces) are "llamaswap.fakeserver.*".
    from llamaswap.fakeserver import main as _main

    sys.exit(_main())
