# -*- test-case-name: tests.test_fakeserver -*-
"""
The fake upstream's state and its connections: L{FakeServer} (counters, the
loading clock, the disconnect record, crash and exit behaviours, the
--http-threads worker pool) and L{FakeSite}, whose channels and requests
behave the way llama-server's cpp-httplib does when asked to
(--http-threads, --close-after-stream, --keep-alive-timeout, --accept-delay,
--read-delay). The routes live in L{openai}, L{anthropic} and L{probes}; the
tree that joins them in L{tree}.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections import deque
from collections.abc import Callable
from typing import Any, TypeAlias
from weakref import WeakKeyDictionary

from attrs import frozen
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource
from twisted.web.server import Request

from llamaswap.testing.fakeserver.options import FakeOptions

JSONObject: TypeAlias = dict[str, Any]

# What run.start_logging lets through. A Logger class attribute names its events after the
# class (llamaswap.testing.fakeserver.server.FakeServer), whatever namespace it was given.
LOG_NAMESPACE = "llamaswap.testing.fakeserver"


@frozen
class _Disconnect:
    path: str
    at: float
    frames_written: int


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
            and self.channel is not None  # None once the client left
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

    log = Logger()

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
