"""
Tests for L{llamaswap.logs} and its web views (L{llamaswap.web.logs},
L{llamaswap.web.events}, L{llamaswap.web.ui}).

Unit tests drive a L{LogHub} through a private L{LogPublisher} and talk HTTP
to the resources over a L{StringTransport} (so the test plays the part of a
socket that stops reading) or through L{StubTreq}. The integration tests use
real ports on 127.0.0.1.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer, error, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import (
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.python.logfile import LogFile
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from llamaswap.config import Config, LogRotation, ModelConfig
from llamaswap.events import EventBus
from llamaswap.http import make_http
from llamaswap.logs import COMBINED, PROXY, UPSTREAM, LogHub, LogStream
from llamaswap.supervisor import ModelStatus
from llamaswap.web.events import SSE_BUFFER_BYTES, build_events_resource
from llamaswap.web.logs import build_logs_resource
from llamaswap.web.ui import build_ui_resource
from tests.fakeserver_helper import free_port
from tests.proctools import TWISTD, ChildOutput, twistd_env

MODELS = ("alpha", "org/beta")


def make_config(models: tuple[str, ...] = MODELS, **kwargs: Any) -> Config:
    """A Config with fake models; C{alpha} has alias C{a1}."""
    built = {
        model_id: ModelConfig(
            id=model_id,
            cmd=("true",),
            cmd_line="true",
            proxy="http://127.0.0.1:1",
            aliases=("a1",) if model_id == "alpha" else (),
            ttl=30 if model_id == "alpha" else 0,
        )
        for model_id in models
    }
    return Config(models=built, **kwargs)


def upstream(publisher: Any, model: str, text: str, stream: str = "stdout") -> None:
    """Log one child-output line the way the supervisor does."""
    Logger(namespace=f"llamaswap.upstream.{model}", observer=publisher).info(
        "{line}", line=text, model=model, stream=stream
    )


def proxy(publisher: Any) -> Logger:
    return Logger(namespace="llamaswap.test", observer=publisher)


class HubCase(SynchronousTestCase):
    def start_hub(self, **config: Any) -> tuple[LogHub, LogPublisher]:
        publisher = LogPublisher()
        hub = LogHub(make_config(**config), publisher=publisher)
        hub.startService()
        self.addCleanup(lambda: hub.running and hub.stopService())
        return hub, publisher


class LogHubTests(HubCase):
    def test_history_is_bounded_by_bytes(self) -> None:
        """
        History never exceeds C{logHistoryBytes}; the newest lines are kept,
        whole, and the oldest go first.
        """
        hub, pub = self.start_hub(log_history_bytes=1024)
        log = proxy(pub)
        for i in range(1000):
            log.info("line {i:04d} " + "x" * 40, i=i)
        history = hub.history(PROXY)
        self.assertLessEqual(len(history), 1024)
        self.assertGreater(len(history), 1024 - 60)
        lines = history.decode().splitlines()
        self.assertTrue(lines[0].startswith("[INFO] line "))
        self.assertTrue(lines[-1].startswith("[INFO] line 0999 "))
        numbers = [int(line.split()[2]) for line in lines]
        self.assertEqual(numbers, list(range(1000 - len(lines), 1000)))

    def test_bound_applies_to_every_stream(self) -> None:
        """Per-model and upstream histories are bounded the same way."""
        hub, pub = self.start_hub(log_history_bytes=1024)
        for i in range(500):
            upstream(pub, "alpha", f"token {i} " + "y" * 30)
        self.assertLessEqual(len(hub.history("alpha")), 1024)
        self.assertLessEqual(len(hub.history(UPSTREAM)), 1024)
        self.assertTrue(hub.history("alpha").endswith(b"token 499 " + b"y" * 30 + b"\n"))

    def test_oversized_entry_is_cut_to_the_bound(self) -> None:
        """One line longer than the whole bound is truncated, not kept whole."""
        hub, pub = self.start_hub(log_history_bytes=1024)
        upstream(pub, "alpha", "z" * 5000)
        self.assertEqual(len(hub.history("alpha")), 1024)

    def test_ordering_across_sources(self) -> None:
        """With logToStdout both, the combined stream keeps arrival order."""
        hub, pub = self.start_hub(log_to_stdout="both")
        log = proxy(pub)
        log.info("one")
        upstream(pub, "alpha", "two")
        log.warn("three")
        upstream(pub, "org/beta", "four")
        self.assertEqual(
            hub.history(COMBINED).decode().splitlines(),
            ["[INFO] one", "[alpha] two", "[WARN] three", "[org/beta] four"],
        )

    def test_per_model_streams(self) -> None:
        """
        Each model's stream has only its own raw lines; the upstream stream has
        all of them tagged with the model id. Braces survive (the line is a
        field, not a format).
        """
        hub, pub = self.start_hub()
        upstream(pub, "alpha", "a {not a field}")
        upstream(pub, "org/beta", "b line", stream="stderr")
        upstream(pub, "alpha", "a again\n")
        self.assertEqual(hub.history("alpha"), b"a {not a field}\na again\n")
        self.assertEqual(hub.history("org/beta"), b"b line\n")
        self.assertEqual(
            hub.history(UPSTREAM),
            b"[alpha] a {not a field}\n[org/beta] b line\n[alpha] a again\n",
        )
        self.assertEqual(hub.history(PROXY), b"")

    def test_unknown_model_goes_to_upstream_only(self) -> None:
        """Output from a model not in the config still reaches the upstream stream."""
        hub, pub = self.start_hub()
        upstream(pub, "ghost", "boo")
        self.assertEqual(hub.history(UPSTREAM), b"[ghost] boo\n")
        self.assertIsNone(hub.resolve("ghost"))

    def test_combined_follows_log_to_stdout(self) -> None:
        """C{/logs} shows what logToStdout names, as in llama-swap HEAD."""
        expected = {
            "proxy": b"[INFO] p\n",
            "upstream": b"[alpha] u\n",
            "both": b"[INFO] p\n[alpha] u\n",
            "none": b"",
        }
        for mode, history in expected.items():
            hub, pub = self.start_hub(log_to_stdout=mode)
            proxy(pub).info("p")
            upstream(pub, "alpha", "u")
            self.assertEqual(hub.history(COMBINED), history, mode)
            # The dedicated streams keep everything regardless.
            self.assertEqual(hub.history(PROXY), b"[INFO] p\n")
            self.assertEqual(hub.history("alpha"), b"u\n")
            hub.stopService()

    def test_log_level_filters_proxy_lines_only(self) -> None:
        """logLevel warn hides info proxy lines but never upstream output."""
        hub, pub = self.start_hub(log_level="warn")
        log = proxy(pub)
        log.debug("d")
        log.info("i")
        log.warn("w")
        log.error("e")
        upstream(pub, "alpha", "raw")
        self.assertEqual(hub.history(PROXY), b"[WARN] w\n[ERROR] e\n")
        self.assertEqual(hub.history("alpha"), b"raw\n")

    def test_failure_traceback_is_kept(self) -> None:
        """A logged failure shows its message and traceback."""
        hub, pub = self.start_hub()
        try:
            raise ZeroDivisionError("boom")
        except ZeroDivisionError:
            proxy(pub).failure("it broke")
        text = hub.history(PROXY).decode()
        self.assertTrue(text.startswith("[CRITICAL] it broke\n"))
        self.assertIn("ZeroDivisionError", text)

    def test_resolve_names(self) -> None:
        """Stream names: empty (combined), proxy, upstream, ids (with slashes), aliases."""
        hub, _ = self.start_hub()
        self.assertEqual(hub.resolve(""), COMBINED)
        self.assertEqual(hub.resolve("proxy"), PROXY)
        self.assertEqual(hub.resolve("upstream"), UPSTREAM)
        self.assertEqual(hub.resolve("org/beta"), "org/beta")
        self.assertEqual(hub.resolve("a1"), "alpha")
        self.assertIsNone(hub.resolve("combined"))
        self.assertIsNone(hub.resolve("nope"))

    def test_observer_is_total(self) -> None:
        """
        A subscriber that raises is dropped without disturbing the others, and
        events that cannot be formatted do not make the observer raise.
        """
        hub, pub = self.start_hub()
        got: list[bytes] = []

        def broken(entry: bytes) -> None:
            raise RuntimeError("subscriber bug")

        hub.subscribe(PROXY, broken)
        hub.subscribe(PROXY, got.append)
        proxy(pub).info("first")
        proxy(pub).info("second")
        self.assertEqual(got, [b"[INFO] first\n", b"[INFO] second\n"])
        self.assertEqual(hub.stream(PROXY).subscriber_count(), 1)
        hub({"log_format": "{missing", "log_level": LogLevel.info, "log_namespace": "x"})
        hub({"log_namespace": "llamaswap.upstream.alpha"})  # no fields at all
        hub({})
        self.assertEqual(hub.internal_errors, 0)

    def test_reentrant_logging_keeps_order(self) -> None:
        """A subscriber whose delivery logs again does not recurse or reorder."""
        hub, pub = self.start_hub()
        got: list[bytes] = []
        log = proxy(pub)

        def chatty(entry: bytes) -> None:
            got.append(entry)
            if entry == b"[INFO] outer\n":
                log.info("inner")

        hub.subscribe(PROXY, chatty)
        log.info("outer")
        log.info("after")
        self.assertEqual(got, [b"[INFO] outer\n", b"[INFO] inner\n", b"[INFO] after\n"])

    def test_stop_ends_subscriptions(self) -> None:
        """stopService stops observing and tells every subscriber it is over."""
        hub, pub = self.start_hub()
        closed: list[str] = []
        got: list[bytes] = []
        hub.subscribe(PROXY, got.append, lambda: closed.append("proxy"))
        hub.subscribe("alpha", got.append, lambda: closed.append("alpha"))
        hub.stopService()
        self.assertEqual(sorted(closed), ["alpha", "proxy"])
        proxy(pub).info("late")
        self.assertEqual(got, [])
        self.assertEqual(hub.history(PROXY), b"")


class LogFileRotationTests(SynchronousTestCase):
    """logRotation bounds the log file twistd writes (--logfile), which it never prunes."""

    def test_hub_bounds_twistd_log_file(self) -> None:
        """
        At start the hub sets logRotation's size and count on the LogFile twistd's
        observer writes to; rotations then delete what is beyond the count,
        files left by an earlier run included.
        """
        folder = Path(self.mktemp())
        folder.mkdir()
        for number in range(1, 6):
            (folder / f"x.log.{number}").write_text("old\n")
        log_file = LogFile("x.log", str(folder))
        self.addCleanup(log_file.close)
        publisher = LogPublisher()
        publisher.addObserver(textFileLogObserver(log_file))  # what twistd --logfile adds
        config = make_config(log_rotation=LogRotation(max_bytes=1024, keep=2))
        hub = LogHub(config, publisher=publisher)
        hub.startService()
        self.addCleanup(hub.stopService)
        self.assertEqual((log_file.rotateLength, log_file.maxRotatedFiles), (1024, 2))
        for i in range(100):
            proxy(publisher).info("line {i} " + "x" * 60, i=i)
        self.assertEqual(sorted(p.name for p in folder.iterdir()), ["x.log", "x.log.1", "x.log.2"])
        self.assertNotIn("old", (folder / "x.log.2").read_text())

    def test_reload_changes_the_bound(self) -> None:
        """A config reload applies the new logRotation to the same file."""
        folder = Path(self.mktemp())
        folder.mkdir()
        log_file = LogFile("x.log", str(folder))
        self.addCleanup(log_file.close)
        publisher = LogPublisher()
        publisher.addObserver(textFileLogObserver(log_file))
        hub = LogHub(make_config(), publisher=publisher)
        hub.startService()
        self.addCleanup(hub.stopService)
        self.assertEqual((log_file.rotateLength, log_file.maxRotatedFiles), (10 * 2**20, 5))
        hub.reconfigure(make_config(log_rotation=LogRotation(max_bytes=4096, keep=1)))
        self.assertEqual((log_file.rotateLength, log_file.maxRotatedFiles), (4096, 1))

    def test_default_bound(self) -> None:
        """Without logRotation: 10 MiB files, 5 kept (twistd's own is 1 MB, all kept)."""
        self.assertEqual(make_config().log_rotation, LogRotation(max_bytes=10 * 2**20, keep=5))


class StdoutFilterTests(SynchronousTestCase):
    """logToStdout decides what observers registered before the hub (twistd's) get."""

    def run_mode(self, mode: str, level: str = "info") -> list[str]:
        publisher = LogPublisher()
        seen: list[LogEvent] = []
        publisher.addObserver(seen.append)  # stands in for twistd's file observer
        hub = LogHub(make_config(log_to_stdout=mode, log_level=level), publisher=publisher)
        hub.startService()
        log = proxy(publisher)
        log.debug("debug")
        log.info("info")
        upstream(publisher, "alpha", "child")
        log.critical("crash")
        hub.stopService()
        log.debug("after stop")
        return [formatEvent(event) for event in seen]

    def test_modes(self) -> None:
        """proxy / upstream / both / none; critical events always pass."""
        self.assertEqual(self.run_mode("proxy"), ["info", "crash", "after stop"])
        self.assertEqual(self.run_mode("upstream"), ["child", "crash", "after stop"])
        self.assertEqual(self.run_mode("both"), ["info", "child", "crash", "after stop"])
        self.assertEqual(self.run_mode("none"), ["crash", "after stop"])
        self.assertEqual(
            self.run_mode("both", level="debug"),
            ["debug", "info", "child", "crash", "after stop"],
        )

    def test_owner_can_still_remove_its_observer(self) -> None:
        """While wrapped, removeObserver(original) removes it; re-adding does not double it."""
        publisher = LogPublisher()
        seen: list[LogEvent] = []
        publisher.addObserver(seen.append)
        hub = LogHub(make_config(), publisher=publisher)
        hub.startService()
        self.addCleanup(hub.stopService)
        publisher.addObserver(seen.append)
        proxy(publisher).info("once")
        self.assertEqual(len(seen), 1)
        publisher.removeObserver(seen.append)
        proxy(publisher).info("gone")
        self.assertEqual(len(seen), 1)

    def test_stop_restores_the_original_observer(self) -> None:
        """After stopService the publisher holds the very same observer objects."""
        publisher = LogPublisher()

        def observer(event: LogEvent) -> None:
            pass

        publisher.addObserver(observer)
        hub = LogHub(make_config(), publisher=publisher)
        hub.startService()
        self.assertIsNot(publisher._observers[0], observer)
        hub.stopService()
        self.assertEqual(len(publisher._observers), 1)
        self.assertIs(publisher._observers[0], observer)


# --- HTTP, over an in-memory transport --------------------------------------------


def connect(root: Resource) -> tuple[HTTPChannel, StringTransport]:
    """An HTTP connection to C{root}: the test is the client's socket."""
    site = Site(root, reactor=MemoryReactorClock())
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
        peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
    )
    channel.makeConnection(transport)
    return channel, transport


def get(channel: HTTPChannel, path: str, headers: str = "") -> None:
    channel.dataReceived(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())


def dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """Split a raw chunked HTTP response into (head, body-so-far)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    body = b""
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body += rest[:size]
        rest = rest[size + 2 :]
    return head, body


def logs_root(hub: LogHub) -> Resource:
    root = Resource()
    root.putChild(b"logs", build_logs_resource(hub))
    root.putChild(b"ui", build_ui_resource())
    return root


class LogStreamTests(HubCase):
    def open_stream(self, hub: LogHub, path: str) -> tuple[HTTPChannel, StringTransport]:
        channel, transport = connect(logs_root(hub))
        self.addCleanup(channel.connectionLost, Failure(ConnectionError("test over")))
        get(channel, path)
        return channel, transport

    def test_history_then_live(self) -> None:
        """/logs/stream sends the history at once, then each new line as it comes."""
        hub, pub = self.start_hub()
        proxy(pub).info("before")
        _, transport = self.open_stream(hub, "/logs/stream")
        head, body = dechunk(transport.value())
        self.assertIn(b"HTTP/1.1 200 OK", head)
        self.assertEqual(body, b"[INFO] before\n")
        proxy(pub).info("after")
        self.assertEqual(dechunk(transport.value())[1], b"[INFO] before\n[INFO] after\n")
        # One chunk per line: the live line went out in its own write.
        self.assertTrue(transport.value().endswith(b"\r\nd\r\n[INFO] after\n\r\n"))

    def test_stream_headers(self) -> None:
        """Streams are plain text, never sniffed, never buffered by proxies."""
        hub, _ = self.start_hub()
        _, transport = self.open_stream(hub, "/logs/stream/proxy")
        head = transport.value().partition(b"\r\n\r\n")[0].lower()
        for header in (
            b"content-type: text/plain; charset=utf-8",
            b"x-content-type-options: nosniff",
            b"x-accel-buffering: no",
            b"cache-control: no-cache",
            b"transfer-encoding: chunked",
        ):
            self.assertIn(header, head)

    def test_no_history(self) -> None:
        """?no-history (any value) skips the history on every stream variant."""
        hub, pub = self.start_hub()
        proxy(pub).info("old")
        upstream(pub, "org/beta", "old child")
        streams = [
            self.open_stream(hub, path)[1]
            for path in (
                "/logs/stream?no-history",
                "/logs/stream/proxy?no-history=1",
                "/logs/stream/org/beta?no-history",
            )
        ]
        proxy(pub).info("new")
        upstream(pub, "org/beta", "new child")
        bodies = [dechunk(t.value())[1] for t in streams]
        self.assertEqual(bodies, [b"[INFO] new\n", b"[INFO] new\n", b"new child\n"])

    def test_model_streams_by_id_with_slash_and_alias(self) -> None:
        """/logs/stream/<id> works for ids with slashes (raw or %2F) and aliases."""
        hub, pub = self.start_hub()
        upstream(pub, "org/beta", "b1")
        upstream(pub, "alpha", "a1")
        bodies = {
            path: dechunk(self.open_stream(hub, path)[1].value())[1]
            for path in (
                "/logs/stream/org/beta",
                "/logs/stream/org%2Fbeta",
                "/logs/stream/a1",
                "/logs/stream/upstream",
            )
        }
        self.assertEqual(
            bodies,
            {
                "/logs/stream/org/beta": b"b1\n",
                "/logs/stream/org%2Fbeta": b"b1\n",
                "/logs/stream/a1": b"a1\n",
                "/logs/stream/upstream": b"[org/beta] b1\n[alpha] a1\n",
            },
        )

    def test_unknown_stream_is_400_json(self) -> None:
        """An unknown logger name is a 400 with an OpenAI-shaped JSON error."""
        hub, _ = self.start_hub()
        stub = StubTreq(logs_root(hub))
        response = self.successResultOf(stub.get("http://x/logs/stream/nope"))
        self.assertEqual(response.code, 400)
        body = json.loads(self.successResultOf(response.content()))
        self.assertIn("invalid logger", body["error"]["message"])

    def test_logs_history_text(self) -> None:
        """GET /logs is the combined history as text/plain."""
        hub, pub = self.start_hub()
        proxy(pub).info("hello")
        upstream(pub, "alpha", "not in combined by default")
        stub = StubTreq(logs_root(hub))
        response = self.successResultOf(stub.get("http://x/logs"))
        self.assertEqual(response.code, 200)
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"text/plain; charset=utf-8"]
        )
        self.assertEqual(self.successResultOf(response.content()), b"[INFO] hello\n")

    def test_logs_html_redirects_to_ui(self) -> None:
        """A browser asking /logs for HTML is sent to the UI's log page."""
        hub, _ = self.start_hub()
        stub = StubTreq(logs_root(hub))
        response = self.successResultOf(
            stub.get("http://x/logs", headers={"Accept": "text/html,*/*"}, allow_redirects=False)
        )
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/ui/#logs"])

    def test_slow_client_drops_lines_with_a_marker(self) -> None:
        """
        While the client's socket is full the stream writes nothing more (its
        buffer does not grow); on resume it says how many lines were dropped.
        """
        hub, pub = self.start_hub()
        _, transport = self.open_stream(hub, "/logs/stream?no-history")
        log = proxy(pub)
        log.info("kept")
        transport.producer.pauseProducing()  # the socket is full
        before = len(transport.value())
        for i in range(10_000):
            log.info("flood {i} " + "f" * 100, i=i)
        self.assertEqual(len(transport.value()), before)
        transport.producer.resumeProducing()
        log.info("back")
        body = dechunk(transport.value())[1]
        self.assertEqual(body, b"[INFO] kept\n[10000 lines dropped]\n[INFO] back\n")

    def test_disconnect_unsubscribes_at_once(self) -> None:
        """A client that goes away is removed from the stream immediately."""
        hub, pub = self.start_hub()
        channel, _ = connect(logs_root(hub))
        get(channel, "/logs/stream/alpha")
        self.assertEqual(hub.stream("alpha").subscriber_count(), 1)
        channel.connectionLost(Failure(ConnectionError("client gone")))
        self.assertEqual(hub.stream("alpha").subscriber_count(), 0)
        upstream(pub, "alpha", "nobody listens")  # must not raise

    def test_stop_finishes_streams(self) -> None:
        """Stopping the hub ends every stream with a clean chunked end."""
        hub, _ = self.start_hub()
        _, transport = self.open_stream(hub, "/logs/stream")
        hub.stopService()
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))

    def test_method_not_allowed(self) -> None:
        """Only GET and HEAD are served under /logs."""
        hub, _ = self.start_hub()
        stub = StubTreq(logs_root(hub))
        response = self.successResultOf(stub.post("http://x/logs/stream"))
        self.assertEqual(response.code, 405)
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"GET, HEAD"])

    def test_errors_follow_accept(self) -> None:
        """Errors are JSON by default, text or HTML when C{Accept} asks, as on other routes."""
        hub, _ = self.start_hub()
        stub = StubTreq(logs_root(hub))

        def error(path: str, accept: str) -> tuple[int, list[bytes], bytes]:
            response = self.successResultOf(stub.get("http://x" + path, headers={"Accept": accept}))
            body = self.successResultOf(response.content())
            return response.code, response.headers.getRawHeaders(b"content-type"), body

        code, kind, body = error("/logs/stream/nope", "text/plain")
        self.assertEqual((code, kind), (400, [b"text/plain; charset=utf-8"]))
        self.assertEqual(
            body, b"llamaswap: invalid logger. Use 'proxy', 'upstream' or a model's ID\n"
        )
        code, kind, body = error("/logs/nothing", "application/json, text/plain")
        self.assertEqual((code, kind), (404, [b"application/json"]))
        self.assertEqual(json.loads(body)["error"]["code"], "not_found")
        code, kind, body = error("/ui/missing.js", "text/html")
        self.assertEqual((code, kind), (404, [b"text/html; charset=utf-8"]))
        self.assertIn(b"<p>not found: /ui/missing.js</p>", body)


class UIResourceTests(SynchronousTestCase):
    def setUp(self) -> None:
        root = Resource()
        root.putChild(b"ui", build_ui_resource())
        self.stub = StubTreq(root)

    def fetch(self, path: str) -> tuple[int, dict[str, list[bytes]], bytes]:
        response = self.successResultOf(self.stub.get("http://x" + path, allow_redirects=False))
        headers = dict(response.headers.getAllRawHeaders())
        return response.code, headers, self.successResultOf(response.content())

    def test_redirect_and_index(self) -> None:
        """/ui redirects to /ui/, which is the HTML page."""
        code, headers, _ = self.fetch("/ui")
        self.assertEqual((code, headers[b"Location"]), (302, [b"/ui/"]))
        code, headers, body = self.fetch("/ui/")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"text/html; charset=utf-8"])
        self.assertIn(b"<title>llamaswap</title>", body)

    def test_assets_and_fallbacks(self) -> None:
        """Assets have their types; extension-less paths get the page; others 404."""
        code, headers, body = self.fetch("/ui/app.js")
        self.assertEqual(code, 200)
        self.assertEqual(headers[b"Content-Type"], [b"text/javascript; charset=utf-8"])
        self.assertIn(b"EventSource", body)
        self.assertEqual(self.fetch("/ui/style.css")[0], 200)
        self.assertIn(b"<title>llamaswap</title>", self.fetch("/ui/models")[2])
        self.assertEqual(self.fetch("/ui/missing.js")[0], 404)
        self.assertEqual(self.fetch("/ui/../logs.py")[0], 404)

    def test_no_external_resources(self) -> None:
        """The UI loads nothing from outside the proxy (no CDN)."""
        for name in ("index.html", "app.js", "style.css"):
            body = self.fetch("/ui/" + name)[2]
            self.assertNotIn(b"http://", body, name)
            self.assertNotIn(b"https://", body, name)


# --- /api/events ------------------------------------------------------------------


class FakeSupervisor:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.states = {model_id: "stopped" for model_id in config.models}
        self.queued: dict[str, int] = {}
        self.oldest_wait: dict[str, float] = {}
        self.reasons: dict[str, str] = {}

    def statuses(self) -> list[ModelStatus]:
        return [
            ModelStatus(
                model_id=model_id,
                state=state,
                pid=None,
                in_flight=0,
                ttl=0,
                ttl_remaining=None,
                last_error=None,
                queued=self.queued.get(model_id, 0),
                oldest_wait=self.oldest_wait.get(model_id),
                stop_reason=self.reasons.get(model_id),
            )
            for model_id, state in self.states.items()
        ]


def sse_events(raw: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of every complete SSE frame in a raw response."""
    body = dechunk(raw)[1].decode()
    out = []
    for frame in body.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data: "):
                out.append(json.loads(line[len("data: ") :]))
    return out


class EventsTests(HubCase):
    def open_events(self) -> tuple[EventBus, FakeSupervisor, LogPublisher, StringTransport]:
        hub, pub = self.start_hub()
        bus = EventBus()
        supervisor = FakeSupervisor(hub.config)
        self.clock = Clock()
        root = Resource()
        api = Resource()
        root.putChild(b"api", api)
        api.putChild(
            b"events",
            build_events_resource(hub.config, bus, supervisor, hub, clock=self.clock),
        )
        proxy(pub).info("early")
        bus.publish("request", {"id": 1, "model": "alpha", "status": 200})
        channel, transport = connect(root)
        self.addCleanup(channel.connectionLost, Failure(ConnectionError("test over")))
        get(channel, "/api/events")
        return bus, supervisor, pub, transport

    def test_initial_snapshot_then_live(self) -> None:
        """
        The feed starts with the models, the log histories and recent requests,
        then follows state changes, request summaries and log lines.
        """
        bus, supervisor, pub, transport = self.open_events()
        head = transport.value().partition(b"\r\n\r\n")[0].lower()
        self.assertIn(b"content-type: text/event-stream", head)
        self.assertIn(b"cache-control: no-cache", head)
        first = sse_events(transport.value())
        self.assertEqual([e["type"] for e in first], ["modelStatus", "logData", "requests"])
        self.assertEqual(
            [(m["id"], m["state"], m["aliases"]) for m in first[0]["data"]],
            [("alpha", "stopped", ["a1"]), ("org/beta", "stopped", [])],
        )
        self.assertEqual(first[1]["data"], {"source": "proxy", "lines": ["[INFO] early"]})
        self.assertEqual(first[2]["data"][0]["model"], "alpha")

        supervisor.states["alpha"] = "starting"
        bus.publish("modelStatus", {"model": "alpha", "state": "starting", "pid": 7})
        upstream(pub, "alpha", "loading weights")
        bus.publish("request", {"id": 2, "model": "alpha", "status": 200, "duration": 0.5})
        live = sse_events(transport.value())[len(first) :]
        self.assertEqual(
            [e["type"] for e in live], ["modelStatus", "logData", "request", "modelStatus"]
        )
        self.assertEqual(live[0]["data"][0]["state"], "starting")
        self.assertEqual(
            live[1]["data"], {"source": "upstream", "lines": ["[alpha] loading weights"]}
        )
        self.assertEqual(live[2]["data"]["id"], 2)

    def test_slow_client_is_bounded(self) -> None:
        """
        A UI that stops reading holds at most SSE_BUFFER_BYTES of frames; the
        rest are dropped and, on resume, it is told so and resynchronised.
        """
        _, _, pub, transport = self.open_events()
        transport.producer.pauseProducing()
        before = len(transport.value())
        seen = len(sse_events(transport.value()))
        log = proxy(pub)
        for i in range(5000):
            log.info("flood {i} " + "f" * 200, i=i)
        self.assertEqual(len(transport.value()), before)
        transport.producer.resumeProducing()
        after = sse_events(transport.value())[seen:]
        delivered = sum(len(e["data"]["lines"]) for e in after if e["type"] == "logData")
        self.assertLess(delivered, 5000)
        self.assertGreater(len(transport.value()) - before, SSE_BUFFER_BYTES // 2)
        # The bound counts frames; chunk framing adds a few bytes per frame.
        self.assertLess(len(transport.value()) - before, SSE_BUFFER_BYTES + 16 * 1024)
        self.assertEqual([e["type"] for e in after[-2:]], ["dropped", "modelStatus"])
        self.assertEqual(after[-2]["data"]["count"], 5000 - delivered)

    def test_unannounced_changes_are_polled(self) -> None:
        """
        A status change no event announced (a lease released, a TTL restarted)
        reaches the UI within a second; an unchanged status sends nothing.
        """
        _, supervisor, _, transport = self.open_events()
        count = len(sse_events(transport.value()))
        self.clock.advance(1)
        self.assertEqual(len(sse_events(transport.value())), count)
        supervisor.states["org/beta"] = "ready"
        self.clock.advance(1)
        new = sse_events(transport.value())[count:]
        self.assertEqual([e["type"] for e in new], ["modelStatus"])
        self.assertEqual(new[0]["data"][1]["state"], "ready")

    def test_queue_events_send_snapshots(self) -> None:
        """
        A C{queue} event sends a snapshot with each model's queue (C{queued},
        C{oldest_wait} in seconds); one that changes nothing the UI shows
        sends nothing, and neither does the oldest wait growing (the UI counts
        it up between snapshots).
        """
        bus, supervisor, _, transport = self.open_events()
        first = sse_events(transport.value())
        self.assertEqual(
            [(m["id"], m["queued"], m["oldest_wait"]) for m in first[0]["data"]],
            [("alpha", 0, None), ("org/beta", 0, None)],
        )

        def new_events() -> list[dict[str, Any]]:
            nonlocal seen
            events = sse_events(transport.value())
            fresh, seen = events[seen:], len(events)
            return fresh

        seen = len(first)
        supervisor.queued["alpha"] = 2
        supervisor.oldest_wait["alpha"] = 0.0
        bus.publish("queue", {"model": "alpha", "queued": 2})
        [snapshot] = new_events()
        self.assertEqual(snapshot["type"], "modelStatus")
        self.assertEqual(
            [(m["id"], m["queued"], m["oldest_wait"]) for m in snapshot["data"]],
            [("alpha", 2, 0.0), ("org/beta", 0, None)],
        )
        bus.publish("queue", {"model": "alpha", "queued": 2})
        self.assertEqual(new_events(), [])
        for _ in range(3):  # the wait grows with the clock, as the supervisor's does
            supervisor.oldest_wait["alpha"] += 1
            self.clock.advance(1)
        self.assertEqual(new_events(), [])

        supervisor.queued["alpha"] = 3
        bus.publish("queue", {"model": "alpha", "queued": 3})
        [snapshot] = new_events()
        self.assertEqual(
            (snapshot["data"][0]["queued"], snapshot["data"][0]["oldest_wait"]), (3, 3.0)
        )
        # The oldest left as another came: the same count, a later oldest (seen by the poll).
        supervisor.oldest_wait["alpha"] = 1.0
        self.clock.advance(1)
        [snapshot] = new_events()
        self.assertEqual(
            (snapshot["data"][0]["queued"], snapshot["data"][0]["oldest_wait"]), (3, 1.0)
        )
        del supervisor.queued["alpha"], supervisor.oldest_wait["alpha"]
        bus.publish("queue", {"model": "alpha", "queued": 0})
        [snapshot] = new_events()
        self.assertEqual(
            (snapshot["data"][0]["queued"], snapshot["data"][0]["oldest_wait"]), (0, None)
        )

    def test_stopping_reason(self) -> None:
        """A stopping model's snapshot says why (the supervisor's status); others: null."""
        bus, supervisor, _, transport = self.open_events()
        seen = len(sse_events(transport.value()))
        self.assertIsNone(sse_events(transport.value())[0]["data"][0]["reason"])
        supervisor.states["alpha"], supervisor.reasons["alpha"] = "stopping", "ttl"
        bus.publish(
            "modelStatus", {"model": "alpha", "state": "stopping", "pid": 7, "reason": "ttl"}
        )
        supervisor.states["alpha"] = "stopped"
        del supervisor.reasons["alpha"]
        bus.publish("modelStatus", {"model": "alpha", "state": "stopped", "pid": None})
        supervisor.states["alpha"] = "starting"
        bus.publish("modelStatus", {"model": "alpha", "state": "starting", "pid": 8})
        snapshots = [e["data"] for e in sse_events(transport.value())[seen:]]
        self.assertEqual(
            [(m[0]["state"], m[0]["reason"], m[1]["reason"]) for m in snapshots],
            [("stopping", "ttl", None), ("stopped", None, None), ("starting", None, None)],
        )

    def test_disconnect_unsubscribes(self) -> None:
        """A UI that leaves is dropped from the feed, the log streams and the poll."""
        hub, _ = self.start_hub()
        bus = EventBus()
        clock = Clock()
        resource = build_events_resource(
            hub.config, bus, FakeSupervisor(hub.config), hub, clock=clock
        )
        root = Resource()
        root.putChild(b"events", resource)
        channel, _ = connect(root)
        get(channel, "/events")
        self.assertEqual(hub.stream(PROXY).subscriber_count(), 1)
        self.assertEqual(len(resource.clients), 1)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        channel.connectionLost(Failure(ConnectionError("gone")))
        self.assertEqual(hub.stream(PROXY).subscriber_count(), 0)
        self.assertEqual(hub.stream(UPSTREAM).subscriber_count(), 0)
        self.assertEqual(len(resource.clients), 0)
        self.assertEqual(clock.getDelayedCalls(), [])
        bus.publish("modelStatus", {"model": "alpha", "state": "ready", "pid": 1})


class LogStreamUnitTests(SynchronousTestCase):
    def test_subscriber_sees_entries_in_order(self) -> None:
        """LogStream delivers entries in append order and unsubscribe is idempotent."""
        stream = LogStream("s", 100)
        got: list[bytes] = []
        unsubscribe = stream.subscribe(got.append)
        stream.append(b"1\n")
        stream.append(b"2\n")
        unsubscribe()
        unsubscribe()
        stream.append(b"3\n")
        self.assertEqual(got, [b"1\n", b"2\n"])
        self.assertEqual(stream.history(), [b"1\n", b"2\n", b"3\n"])


# --- real ports -------------------------------------------------------------------


class Collector(Protocol):
    """A raw HTTP client that records everything it receives."""

    def __init__(self) -> None:
        self.data = b""
        self.waiters: list[tuple[Callable[[bytes], bool], Deferred[None]]] = []
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self.waiters):
            check, d = item
            if check(self.data):
                self.waiters.remove(item)
                d.callback(None)

    def wait_for(self, check: Callable[[bytes], bool]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if check(self.data):
            d.callback(None)
        else:
            self.waiters.append((check, d))
        return d

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)


# Module level: a Logger class attribute is a descriptor that renames its namespace.
WORK_LOG = Logger(namespace="llamaswap.upstream.alpha")


class WorkResource(Resource):
    """Stands in for proxied requests: each logs one line, answers after a tick."""

    isLeaf = True

    def render_GET(self, request: Request) -> int:
        n = request.args.get(b"n", [b"0"])[0].decode()
        WORK_LOG.info("{line}", line=f"served request {n}", model="alpha", stream="stdout")

        def finish() -> None:
            request.write(f"ok {n}\n".encode())
            request.finish()

        reactor.callLater(0, finish)  # type: ignore[attr-defined]
        return NOT_DONE_YET


class ConcurrentStreamTests(TestCase):
    timeout = 60

    async def test_hundred_clients_receive_every_line(self) -> None:
        """
        100 clients stream /logs/stream/alpha over real sockets while 50
        requests are served; every client receives every request's line, in
        order, and a client that never reads leaves the server's buffer bounded.
        """
        hub = LogHub(make_config(log_to_stdout="none"))  # the real global publisher
        hub.startService()
        self.addCleanup(hub.stopService)
        root = logs_root(hub)
        root.putChild(b"work", WorkResource())
        channels: list[HTTPChannel] = []

        class TrackingSite(Site):
            def buildProtocol(self, addr: Any) -> Any:
                channel = super().buildProtocol(addr)
                channels.append(channel)
                return channel

        site = TrackingSite(root)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

        async def open_client(path: str) -> Collector:
            client = await endpoint.connect(Factory.forProtocol(Collector))
            client.transport.write(
                f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode()  # type: ignore[union-attr]
            )
            self.addCleanup(lambda: client.lost)
            self.addCleanup(client.transport.loseConnection)  # type: ignore[union-attr]
            await client.wait_for(lambda data: b"\r\n\r\n" in data)
            return client

        clients = await defer.gatherResults(
            [
                defer.Deferred.fromCoroutine(open_client("/logs/stream/alpha?no-history"))
                for _ in range(100)
            ]
        )
        self.assertEqual(hub.stream("alpha").subscriber_count(), 100)
        # One extra client, on another stream, that never reads: its socket
        # fills, then it drops lines.
        sleeper = await open_client("/logs/stream/org/beta?no-history")
        sleeper.transport.pauseProducing()  # type: ignore[union-attr]

        async def work(n: int) -> None:
            worker = await open_client(f"/work?n={n}")
            await worker.wait_for(lambda data: f"ok {n}\n".encode() in data)

        await defer.gatherResults([defer.Deferred.fromCoroutine(work(n)) for n in range(50)])
        last = b"served request 49\n"
        await defer.gatherResults([c.wait_for(lambda d: last in d) for c in clients])
        for client in clients:
            body = dechunk(client.data)[1].decode()
            self.assertEqual(
                sorted(body.splitlines()),
                sorted(f"served request {n}" for n in range(50)),
            )

        # Flood the never-reading client well past any socket buffer.
        log = Logger(namespace="llamaswap.upstream.org/beta")
        for i in range(20_000):
            log.info("{line}", line=f"flood {i} " + "x" * 500, model="org/beta", stream="stdout")
        # Site wraps each HTTPChannel; peek at the server sockets' user-space buffers.
        transports = [c._channel.transport for c in channels]  # type: ignore[attr-defined]
        buffered = [len(t.dataBuffer) + t._tempDataLen for t in transports]
        # ~10 MB were logged; no connection holds more than the history bound
        # plus one socket buffer's worth of data in user space.
        self.assertLess(max(buffered), 64 * 1024 + 512 + hub.config.log_history_bytes)
        # When it reads again it learns what it missed, then gets new lines.
        sleeper.transport.resumeProducing()  # type: ignore[union-attr]
        await sleeper.wait_for(lambda data: b" lines dropped]\n" in data)
        log.info("{line}", line="fresh", model="org/beta", stream="stdout")
        await sleeper.wait_for(lambda data: data.endswith(b"fresh\n\r\n"))


# --- logToStdout under real twistd -----------------------------------------------


class TwistdStdoutTests(TestCase):
    """What C{twistd -n llamaswap} prints follows logToStdout."""

    timeout = 90

    async def run_twistd(self, mode: str) -> str:
        """Start twistd, load a fake model, stop twistd; return its stdout."""
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        listen, model_port = free_port(), free_port()
        config = folder / "config.yaml"
        config.write_text(
            f"logToStdout: {mode}\n"
            "models:\n"
            "  alpha:\n"
            f"    cmd: ${{PYTHON}} -m llamaswap.fakeserver --port {model_port} --name alpha\n"
            f"    proxy: http://127.0.0.1:{model_port}\n",
            encoding="utf-8",
        )
        output = ChildOutput()
        process = reactor.spawnProcess(  # type: ignore[attr-defined]
            output,
            TWISTD[0],
            [*TWISTD, "-n", "--pidfile=", "llamaswap",
             "--config", str(config), "--listen", f"tcp:{listen}:interface=127.0.0.1"],
            env=twistd_env(),
            path=str(folder),
        )  # fmt: skip

        async def stop() -> None:
            if process.pid is not None:
                process.signalProcess("TERM")
            await output.ended()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        http, pool = make_http(reactor)
        self.addCleanup(pool.closeCachedConnections)
        base = f"http://127.0.0.1:{listen}"
        for _ in range(200):  # up to ~20 s for twistd to listen
            try:
                response = await http.get(base + "/health")
                await response.content()
                break
            except error.ConnectionRefusedError:
                await deferLater(reactor, 0.1)  # type: ignore[arg-type]
        response = await http.post(base + "/api/models/load/alpha")
        self.assertEqual(response.code, 200, await response.content())
        process.signalProcess("TERM")
        await output.ended()
        return output.text()

    async def test_proxy_mode(self) -> None:
        """Default (proxy): llamaswap's lines, none of the model's output."""
        out = await self.run_twistd("proxy")
        self.assertIn("starting alpha", out)
        self.assertNotIn("fakeserver alpha pid=", out)

    async def test_upstream_mode(self) -> None:
        """upstream: the model's output, none of llamaswap's own lines."""
        out = await self.run_twistd("upstream")
        self.assertIn("fakeserver alpha pid=", out)
        self.assertNotIn("starting alpha", out)


class ThreadTests(TestCase):
    async def test_events_from_threads_are_delivered_on_the_reactor_thread(self) -> None:
        """A line logged from a worker thread reaches subscribers on the reactor thread."""
        publisher = LogPublisher()
        hub = LogHub(make_config(), publisher=publisher)
        hub.startService()
        self.addCleanup(hub.stopService)
        delivered: Deferred[int] = Deferred()
        hub.subscribe(PROXY, lambda entry: delivered.callback(threading.get_ident()))
        await deferToThread(proxy(publisher).info, "from a thread")
        self.assertEqual(await delivered, threading.get_ident())
        self.assertEqual(hub.history(PROXY), b"[INFO] from a thread\n")

    async def test_the_hop_goes_through_the_reactor_given(self) -> None:
        """An injected reactor carries the hop; nothing reaches subscribers before it runs it."""
        hops: list[tuple[Any, ...]] = []

        class Recording:
            def callFromThread(self, f: Any, *args: Any) -> None:
                hops.append((f, *args))

        publisher = LogPublisher()
        hub = LogHub(make_config(), publisher=publisher, reactor=Recording())  # type: ignore[arg-type]
        hub.startService()
        self.addCleanup(hub.stopService)
        await deferToThread(proxy(publisher).info, "from a thread")
        self.assertEqual(hub.history(PROXY), b"")
        [(f, event)] = hops
        f(event)  # what the reactor thread would run
        self.assertEqual(hub.history(PROXY), b"[INFO] from a thread\n")
