"""
Tests for L{llamaswap.web.relay}: streaming without buffering, backpressure,
cancellation before and after the upstream's headers, truncation, header
filtering and lease release. The upstream is a fake HTTP client whose
responses and body transports the tests drive by hand.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web._newclient import ResponseFailed
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaswap.errors import QueueFull, StartFailed
from llamaswap.events import EventBus
from llamaswap.http import make_http
from llamaswap.logs import LogHub
from llamaswap.testing.web import (
    CONFIG,
    Exchange,
    FakeSupervisor,
    Response,
    SiteClient,
    events_of,
    make_config,
)
from llamaswap.web.loading import LOADING_TICK
from llamaswap.web.relay import copy_response_headers, find_usage, forward_headers
from llamaswap.web.tree import build_root
from tests.exposition import parse_exposition


class FakeBodyTransport:
    """The producer a response body protocol sees (pause/resume/stop recorded)."""

    def __init__(self, response: FakeResponse) -> None:
        self.response = response
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")
        # As Agent does: closing the connection ends the body with a failure.
        self.response.end(Failure(ResponseFailed([Failure(ConnectionRefusedError("closed"))])))


class FakeResponse:
    def __init__(
        self, code: int = 200, headers: dict[str, str] | None = None, length: Any = UNKNOWN_LENGTH
    ) -> None:
        self.code = code
        self.phrase = b"OK"
        self.headers = Headers({k: [v] for k, v in (headers or {}).items()})
        self.length = length
        self.protocol: Any = None
        self.transport = FakeBodyTransport(self)

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        if self.protocol is not None and not getattr(self, "_ended", False):
            self._ended = True
            self.protocol.connectionLost(reason or Failure(ResponseDone()))


class Call:
    def __init__(self, method: str, url: bytes, kwargs: dict[str, Any]) -> None:
        self.method = method
        self.url = url
        self.kwargs = kwargs
        self.cancelled = False
        self.deferred: Deferred[Any] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[Any]) -> None:
        self.cancelled = True


class FakeHTTP:
    """A treq-like client whose requests stay pending until the test answers."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    def request(self, method: str, url: bytes, **kwargs: Any) -> Deferred[Any]:
        call = Call(method, url, kwargs)
        self.calls.append(call)
        return call.deferred

    def answer(self, response: FakeResponse) -> FakeResponse:
        self.calls[-1].deferred.callback(response)
        return response


class RelayHarness:
    def __init__(self, text: str = CONFIG) -> None:
        self.config = make_config(text)
        self.supervisor = FakeSupervisor(self.config)
        self.http = FakeHTTP()
        self.events = EventBus()
        self.clock = Clock()
        root: Resource = build_root(
            self.config,
            supervisor=self.supervisor,
            logs=LogHub(self.config, events=self.events),
            events=self.events,
            http=self.http,  # type: ignore[arg-type]
            reactor=self.clock,
        )
        self.client = SiteClient(root, events=self.events, clock=self.clock)
        self.requests = events_of(self.events, "request")

    def chat(
        self,
        model: str = "alpha",
        path: str = "/v1/chat/completions",
        stream: bool = True,
        **headers: str,
    ) -> Exchange:
        body = json.dumps({"model": model, "stream": stream}).encode()
        return self.client.start("POST", path, body, headers)

    def tick(self, n: int) -> None:
        """Let C{n} loading ticks pass, one by one."""
        for _ in range(n):
            self.clock.advance(LOADING_TICK)

    def ticking(self) -> bool:
        """Whether a loading stream's dot timer is still scheduled."""
        return any(isinstance(c.func, LoopingCall) for c in self.clock.getDelayedCalls())


SSE = {"Content-Type": "text/event-stream"}


class StreamingTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = RelayHarness()

    def test_headers_then_each_chunk_at_once(self) -> None:
        """Status and headers go out before the first token; each chunk as it arrives."""
        exchange = self.h.chat()
        self.assertEqual(exchange.transport.value(), b"")
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        head = exchange.response()
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("x-accel-buffering"), "no")
        self.assertEqual(head.header("content-type"), "text/event-stream")
        self.assertTrue(head.chunked)
        self.assertEqual(head.body, b"")
        upstream.send(b"data: one\n\n")
        self.assertEqual(exchange.response().body, b"data: one\n\n")
        upstream.send(b"data: two\n\n")
        self.assertEqual(exchange.response().body, b"data: one\n\ndata: two\n\n")
        self.assertFalse(exchange.response().complete)
        self.assertEqual(self.h.supervisor.released, [])
        upstream.end()
        self.assertTrue(exchange.response().complete)
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        self.assertEqual(self.h.requests[0]["status"], 200)

    def test_backpressure_reaches_upstream(self) -> None:
        """A client that stops reading pauses the upstream; resuming resumes it."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        client_side = exchange.transport.producer  # what the kernel buffer would call
        client_side.pauseProducing()
        self.assertEqual(upstream.transport.calls, ["pause"])
        client_side.resumeProducing()
        self.assertEqual(upstream.transport.calls, ["pause", "resume"])
        upstream.end()

    def test_known_length_is_kept(self) -> None:
        """An upstream Content-Length is relayed (no chunking) when the body is not decoded."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, {"Content-Type": "application/json"}, 2))
        upstream.send(b"{}")
        upstream.end()
        response = exchange.response()
        self.assertEqual(response.header("content-length"), "2")
        self.assertFalse(response.chunked)
        self.assertIsNone(response.header("x-accel-buffering"))
        self.assertEqual(response.body, b"{}")

    def test_usage_is_published(self) -> None:
        """The last C{usage} object of a stream is in the request event."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b'data: {"usage": {"prompt_tokens": 1}}\n\n')
        upstream.send(
            b'data: {"choices": [], "usage": {"prompt_tokens": 3, "total_tokens": 9}}\n\n'
        )
        upstream.send(b"data: [DONE]\n\n")
        upstream.end()
        self.assertTrue(exchange.response().complete)
        self.assertEqual(self.h.requests[0]["usage"], {"prompt_tokens": 3, "total_tokens": 9})


class CancellationTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = RelayHarness()

    def test_client_leaves_mid_stream(self) -> None:
        """Leaving mid-stream closes the upstream connection and releases the lease."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b"data: one\n\n")
        exchange.disconnect()
        self.assertIn("stop", upstream.transport.calls)
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        self.assertEqual(self.h.requests[0]["status"], 499)  # see OutcomeTests

    def test_client_leaves_before_headers(self) -> None:
        """Leaving while the upstream thinks cancels the upstream request."""
        exchange = self.h.chat()
        exchange.disconnect()
        self.assertTrue(self.h.http.calls[0].cancelled)
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        self.assertEqual(self.h.requests[0]["status"], 499)

    def test_client_leaves_while_queued(self) -> None:
        """Leaving while waiting for the model withdraws the request: no upstream call."""
        self.h.supervisor.hold = True
        exchange = self.h.chat("beta")
        exchange.disconnect()
        self.assertEqual(self.h.supervisor.cancelled, ["beta"])
        self.assertEqual(self.h.http.calls, [])
        self.assertEqual(self.h.supervisor.released, [])


class FailureTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = RelayHarness()

    def test_upstream_dies_mid_stream(self) -> None:
        """A truncated upstream body closes the client connection without a clean end."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b"data: one\n\n")
        upstream.end(Failure(ResponseFailed([Failure(ConnectionRefusedError("reset"))])))
        self.assertTrue(exchange.closed)
        response = exchange.response()
        self.assertEqual(response.body, b"data: one\n\n")
        self.assertFalse(response.complete)  # no terminating zero-length chunk
        self.assertEqual(self.h.supervisor.released, ["alpha"])

    def test_unreachable_is_502_and_others_still_served(self) -> None:
        """Connection refused before headers: JSON 502; the next request works."""
        exchange = self.h.chat()
        self.h.http.calls[0].deferred.errback(ConnectionRefusedError("nobody home"))
        response = exchange.response()
        self.assertEqual(response.status, 502)
        error = response.json()["error"]
        self.assertEqual(error["code"], "bad_gateway")
        self.assertIn("unreachable", error["message"])
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        other = self.h.chat("beta")
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.end()
        self.assertEqual(other.response().status, 200)


class RefusedTests(SynchronousTestCase):
    """
    A connection refused by a ready model's server (it may have just died):
    once the supervisor knows, one more try on a fresh lease.
    """

    def setUp(self) -> None:
        self.h = RelayHarness()
        self.h.supervisor.refusals = []

    def refuse(self, call: int) -> None:
        self.h.http.calls[call].deferred.errback(ConnectionRefusedError("nobody home"))

    def test_retried_on_a_fresh_lease(self) -> None:
        """
        The relay waits for the supervisor's verdict, releases the lease,
        acquires again and sends the same request; the client sees only the
        second answer.
        """
        exchange = self.h.chat(stream=False)
        self.refuse(0)
        self.assertEqual(len(self.h.supervisor.refusals), 1)
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])
        self.assertEqual(self.h.supervisor.released, [])
        self.assertFalse(exchange.closed)
        self.h.supervisor.refusals[0].callback(None)
        self.assertEqual(self.h.supervisor.acquired, ["alpha", "alpha"])
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        first, second = self.h.http.calls
        self.assertEqual((second.method, second.url), (first.method, first.url))
        self.assertEqual(second.kwargs["data"], first.kwargs["data"])
        upstream = self.h.http.answer(FakeResponse(200, {"Content-Type": "application/json"}))
        upstream.send(b'{"ok": true}')
        upstream.end()
        response = exchange.response()
        self.assertEqual((response.status, response.body), (200, b'{"ok": true}'))
        self.assertEqual(self.h.supervisor.released, ["alpha", "alpha"])

    def test_refused_twice_is_502(self) -> None:
        """Only one more try: refused again, the client gets the 502 (both leases released)."""
        exchange = self.h.chat()
        self.refuse(0)
        self.h.supervisor.refusals[0].callback(None)
        self.refuse(1)
        self.assertEqual(len(self.h.supervisor.refusals), 1)  # no second wait
        response = exchange.response()
        self.assertEqual(response.status, 502)
        self.assertIn("unreachable", response.json()["error"]["message"])
        self.assertEqual(len(self.h.http.calls), 2)
        self.assertEqual(self.h.supervisor.released, ["alpha", "alpha"])

    def test_second_acquire_fails(self) -> None:
        """The restart fails: the client gets that error (502 with its message)."""
        exchange = self.h.chat()
        self.refuse(0)
        self.h.supervisor.error = StartFailed("model alpha exited during startup (exit code 1)")
        self.h.supervisor.refusals[0].callback(None)
        response = exchange.response()
        self.assertEqual(response.status, 502)
        self.assertIn("exited during startup", response.json()["error"]["message"])
        self.assertEqual(self.h.supervisor.released, ["alpha"])

    def test_other_failures_are_not_retried(self) -> None:
        """A connection that failed after it was made (the request may have been sent): 502."""
        exchange = self.h.chat()
        self.h.http.calls[0].deferred.errback(
            ResponseFailed([Failure(ConnectionRefusedError("reset"))])
        )
        self.assertEqual(exchange.response().status, 502)
        self.assertEqual(self.h.supervisor.refusals, [])
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])

    def test_client_leaves_during_the_wait(self) -> None:
        """The client leaving cancels the wait: the lease is released, nothing more is sent."""
        exchange = self.h.chat()
        self.refuse(0)
        exchange.disconnect()
        self.assertTrue(self.h.supervisor.refusals[0].called)  # cancelled
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])
        self.assertEqual(len(self.h.http.calls), 1)


LOADING_CONFIG = CONFIG.replace("models:\n", "sendLoadingState: true\nmodels:\n", 1).replace(
    "    useModelName: beta-upstream\n",
    "    useModelName: beta-upstream\n    sendLoadingState: false\n",
)


def sse_events(response: Response) -> list[Any]:
    """The C{data:} payloads of an event stream (JSON decoded, C{[DONE]} kept)."""
    events = []
    for frame in response.body.decode().split("\n\n"):
        if frame.startswith("data: "):
            data = frame[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def reasoning(response: Response) -> str:
    """The C{reasoning_content} text of a loading stream so far."""
    return "".join(
        e["choices"][0]["delta"]["reasoning_content"]
        for e in sse_events(response)
        if isinstance(e, dict)
        and "choices" in e
        and "reasoning_content" in e["choices"][0]["delta"]
    )


class LoadingStateTests(SynchronousTestCase):
    """C{sendLoadingState}: streamed chat requests for a model that is not ready."""

    def setUp(self) -> None:
        self.h = RelayHarness(LOADING_CONFIG)
        self.h.supervisor.hold = True

    def test_progress_then_the_upstream_events(self) -> None:
        """200 event stream at once, a dot per tick, "Done!", then the model's own events."""
        exchange = self.h.chat("a1")
        head = exchange.response()
        self.assertEqual(head.status, 200)
        self.assertEqual(head.header("content-type"), "text/event-stream")
        self.assertEqual(head.header("cache-control"), "no-cache")
        self.assertEqual(head.header("x-accel-buffering"), "no")
        self.assertEqual(reasoning(head), "llamaswap loading model: alpha\n")
        first = sse_events(head)[0]
        self.assertEqual(first["object"], "chat.completion.chunk")
        self.assertEqual(first["choices"][0]["index"], 0)
        self.h.tick(3)
        self.h.clock.advance(0.1)
        self.assertEqual(reasoning(exchange.response()), "llamaswap loading model: alpha\n...")
        self.h.supervisor.grant()
        done = "llamaswap loading model: alpha\n...\nDone! (2.4s)\n\n"
        self.assertEqual(reasoning(exchange.response()), done)
        self.assertFalse(self.h.ticking())
        self.h.tick(3)
        self.assertEqual(reasoning(exchange.response()), done)
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b'data: {"choices": [{"delta": {"content": "hi"}}]}\n\n')
        upstream.send(b"data: [DONE]\n\n")
        upstream.end()
        response = exchange.response()
        self.assertTrue(response.complete)
        events = sse_events(response)
        self.assertEqual(events[-2], {"choices": [{"delta": {"content": "hi"}}]})
        self.assertEqual(events[-1], "[DONE]")
        self.assertEqual(self.h.supervisor.released, ["alpha"])
        self.assertEqual(self.h.requests[0]["status"], 200)

    def test_only_streamed_chat_for_a_model_not_ready(self) -> None:
        """No loading stream without stream=true, on other routes, or for opted-out models."""
        for exchange in (
            self.h.chat(stream=False),
            self.h.chat(path="/v/chat/completions"),
            self.h.chat(path="/v1/completions"),
            self.h.chat("beta"),
        ):
            self.assertEqual(exchange.transport.value(), b"")
        self.h.supervisor.hold = False  # the model is ready: a lease at once
        exchange = self.h.chat()
        self.assertEqual(exchange.transport.value(), b"")  # waits for the upstream's headers
        self.assertEqual(len(self.h.http.calls), 1)

    def test_refusals_stay_plain_errors(self) -> None:
        """A request refused at once (429, 404) gets its usual status, not a stream."""
        self.h.supervisor.error = QueueFull("the request queue is full")
        response = self.h.chat().response()
        self.assertEqual(response.status, 429)
        self.assertEqual(response.json()["error"]["code"], "queue_full")
        self.h.supervisor.error = None
        self.assertEqual(self.h.chat("nope").response().status, 404)

    def test_start_failure_ends_the_stream_with_an_error_event(self) -> None:
        """The swap fails after the 200: an error event in OpenAI's envelope, then [DONE]."""
        exchange = self.h.chat()
        self.h.tick(1)
        waiting, _ = self.h.supervisor.waiting.pop()
        waiting.errback(StartFailed("model alpha exited during startup; last output: boom"))
        response = exchange.response()
        self.assertTrue(response.complete)
        *_, error, done = sse_events(response)
        self.assertEqual(reasoning(response), "llamaswap loading model: alpha\n.")
        self.assertEqual(error["error"]["code"], "bad_gateway")
        self.assertIn("boom", error["error"]["message"])
        self.assertEqual(done, "[DONE]")
        self.assertEqual(self.h.http.calls, [])
        self.assertFalse(self.h.ticking())

    def test_queue_position_while_waiting(self) -> None:
        """A queued request is told its place whenever it changes, dots otherwise."""
        self.h.supervisor.place = (3, 5)
        exchange = self.h.chat("a1")
        queued = "llamaswap loading model: alpha\n\nqueued: 3 ahead of this request, 5 waiting\n"
        self.assertEqual(reasoning(exchange.response()), queued)
        self.h.tick(2)
        self.assertEqual(reasoning(exchange.response()), queued + "..")
        self.h.supervisor.place = (0, 2)
        self.h.tick(1)
        moved = queued + "..\nqueued: 0 ahead of this request, 2 waiting\n"
        self.assertEqual(reasoning(exchange.response()), moved)
        self.h.supervisor.grant()
        self.assertTrue(reasoning(exchange.response()).startswith(moved + "\nDone! ("))

    def test_first_in_line_sees_no_queue(self) -> None:
        """A request that only waits for its model's load is not told "0 ahead"."""
        self.h.supervisor.place = (0, 1)
        exchange = self.h.chat("a1")
        self.h.tick(2)
        self.assertEqual(reasoning(exchange.response()), "llamaswap loading model: alpha\n..")

    def test_upstream_error_after_loading(self) -> None:
        """The model answers 4xx/5xx after the 200: its JSON error (or ours) as an event."""
        exchange = self.h.chat()
        self.h.supervisor.grant()
        upstream = self.h.http.answer(FakeResponse(400, {"Content-Type": "application/json"}))
        upstream.send(b'{"error": {"message": "context too long",\n "code": 400}}')
        upstream.end()
        *_, error, done = sse_events(exchange.response())
        self.assertEqual(error, {"error": {"message": "context too long", "code": 400}})
        self.assertEqual(done, "[DONE]")
        self.assertEqual(self.h.supervisor.released, ["alpha"])

        exchange = self.h.chat()
        self.h.supervisor.grant()
        upstream = self.h.http.answer(FakeResponse(503, {"Content-Type": "text/plain"}))
        upstream.send(b"Loading model")
        upstream.end()
        *_, error, done = sse_events(exchange.response())
        self.assertEqual(error["error"]["code"], "service_unavailable")
        self.assertEqual(
            error["error"]["message"], "model alpha: upstream answered 503: Loading model"
        )

    def test_unreachable_after_loading(self) -> None:
        """The model's server refuses the connection: a 502 error event."""
        exchange = self.h.chat()
        self.h.supervisor.grant()
        self.h.http.calls[0].deferred.errback(ConnectionRefusedError("nobody home"))
        *_, error, done = sse_events(exchange.response())
        self.assertEqual((error["error"]["code"], done), ("bad_gateway", "[DONE]"))
        self.assertTrue(exchange.response().complete)

    def test_client_leaves_while_loading(self) -> None:
        """Leaving during the loading stream withdraws the request and stops the dots."""
        exchange = self.h.chat()
        self.h.tick(1)
        exchange.disconnect()
        self.assertEqual(self.h.supervisor.cancelled, ["alpha"])
        self.assertFalse(self.h.ticking())
        self.assertEqual(self.h.http.calls, [])


def requests_total(h: RelayHarness) -> dict[tuple[str, str], float]:
    """C{llamaswap_requests_total} from C{GET /metrics}: C{{(model, status): count}}."""
    response = h.client.request("GET", "/metrics")
    assert response.status == 200, response.body
    counts = {}
    for key, value in parse_exposition(response.body.decode()).items():
        match = re.fullmatch(r'llamaswap_requests_total\{model="(.*)",status="(\d+)"\}', key)
        if match:
            counts[(match[1], match[2])] = value
    return counts


class Breaking(FakeResponse):
    """An upstream response whose body cannot be read (a bug of ours, say)."""

    def deliverBody(self, protocol: Any) -> None:
        raise RuntimeError("cannot read the body")


class OutcomeTests(SynchronousTestCase):
    """
    What is recorded (the "request" event, C{/metrics}, the access log line)
    for answers that started with a 200 but did not end well: 499 when the
    client hung up, 502 when the upstream's body was cut short, the error's
    status when a loading stream ends with an error event.
    """

    def setUp(self) -> None:
        self.logs: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logs.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs.append)
        self.h = self.harness()

    def harness(self, text: str = CONFIG) -> RelayHarness:
        h = RelayHarness(text)
        h.client.site.log_requests = True
        return h

    def access_lines(self) -> list[tuple[str, int, int]]:
        """C{(path, status, bytes)} of each access log line but /metrics' (all at info level)."""
        lines = [
            e
            for e in self.logs
            if e["log_namespace"] == "llamaswap.http" and e.get("path") not in (None, "/metrics")
        ]
        self.assertEqual({e["log_level"] for e in lines} - {LogLevel.info}, set())
        return [(e["path"], e["status"], e["bytes"]) for e in lines]

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.logs if e["log_level"] in (LogLevel.error, LogLevel.critical)]

    def recorded(self, h: RelayHarness | None = None) -> list[tuple[int, int]]:
        """C{(status, bytes)} of each "request" event so far."""
        return [(e["status"], e["bytes"]) for e in (h or self.h).requests]

    def test_client_hangs_up_mid_stream(self) -> None:
        """The client saw a 200 and left mid-stream: 499 with the bytes sent; no error logged."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b"data: one\n\n")
        self.assertEqual(self.h.requests, [])  # still streaming: nothing recorded yet
        exchange.disconnect()
        self.assertEqual(exchange.response().status, 200)
        self.assertIn("stop", upstream.transport.calls)
        self.assertEqual(self.recorded(), [(499, 11)])
        self.assertEqual(self.access_lines(), [("/v1/chat/completions", 499, 11)])
        self.assertEqual(requests_total(self.h), {("alpha", "499"): 1})
        self.assertEqual(self.errors(), [])

    def test_client_hangs_up_during_a_long_plain_answer(self) -> None:
        """The same for a non-streamed answer whose body had only partly arrived."""
        exchange = self.h.chat(stream=False)
        upstream = self.h.http.answer(FakeResponse(200, {"Content-Type": "application/json"}, 100))
        upstream.send(b'{"choices": ')
        exchange.disconnect()
        self.assertEqual(exchange.response().header("content-length"), "100")
        self.assertEqual(self.recorded(), [(499, 12)])
        self.assertEqual(requests_total(self.h), {("alpha", "499"): 1})

    def test_upstream_dies_mid_stream(self) -> None:
        """
        A truncated upstream body: the client's connection is cut (it saw a
        200, then no clean end), the error is logged at error level, and the
        request is recorded as 502 with the bytes relayed. The next request is
        served and recorded as usual.
        """
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b"data: one\n\n")
        upstream.end(Failure(ResponseFailed([Failure(ConnectionRefusedError("reset"))])))
        self.assertTrue(exchange.closed)
        self.assertEqual(exchange.response().status, 200)
        self.assertFalse(exchange.response().complete)
        exchange.disconnect()  # the connection we closed is gone
        self.assertEqual(self.recorded(), [(502, 11)])
        self.assertEqual(self.access_lines(), [("/v1/chat/completions", 502, 11)])
        (error,) = self.errors()
        self.assertEqual(error["log_namespace"], "llamaswap.relay.Relay")
        self.assertEqual((error["model"], error["bytes"]), ("alpha", 11))
        self.assertIn("upstream failed after 11 bytes", formatEvent(error))
        self.assertEqual(self.h.supervisor.released, ["alpha"])

        other = self.h.chat()
        self.h.http.answer(FakeResponse(200, SSE)).end()
        self.assertTrue(other.response().complete)
        self.assertEqual(self.recorded(), [(502, 11), (200, 0)])
        self.assertEqual(requests_total(self.h), {("alpha", "502"): 1, ("alpha", "200"): 1})

    def test_complete_stream_is_200_even_if_the_client_then_leaves(self) -> None:
        """A stream that ended normally is 200, also when the client hangs up right after."""
        exchange = self.h.chat()
        upstream = self.h.http.answer(FakeResponse(200, SSE))
        upstream.send(b"data: one\n\n")
        upstream.send(b"data: [DONE]\n\n")
        upstream.end()
        self.assertTrue(exchange.response().complete)
        exchange.disconnect()
        self.assertEqual(self.recorded(), [(200, 25)])
        self.assertEqual(self.access_lines(), [("/v1/chat/completions", 200, 25)])
        self.assertEqual(requests_total(self.h), {("alpha", "200"): 1})
        self.assertEqual(self.errors(), [])

    def test_upstream_error_status_is_kept(self) -> None:
        """An upstream's own 500, relayed whole, is recorded as 500."""
        exchange = self.h.chat(stream=False)
        upstream = self.h.http.answer(FakeResponse(500, {"Content-Type": "application/json"}))
        upstream.send(b'{"error": "oops"}')
        upstream.end()
        self.assertEqual(exchange.response().status, 500)
        self.assertEqual(self.recorded(), [(500, 17)])
        self.assertEqual(requests_total(self.h), {("alpha", "500"): 1})

    def test_loading_stream_outcomes(self) -> None:
        """
        A loading stream (status 200 already sent) is recorded with its real
        outcome: the start failure's 502, the upstream's own error status, 502
        for a truncated body, 499 when the client left while loading, 200 when
        the answer is whole.
        """
        h = self.harness(LOADING_CONFIG)
        h.supervisor.hold = True

        exchange = h.chat()
        waiting, _ = h.supervisor.waiting.pop()
        waiting.errback(StartFailed("model alpha exited during startup"))
        self.assertEqual((exchange.response().status, exchange.response().complete), (200, True))

        for status in (503, 400):
            exchange = h.chat()
            h.supervisor.grant()
            upstream = h.http.answer(FakeResponse(status, {"Content-Type": "text/plain"}))
            upstream.send(b"no")
            upstream.end()
            self.assertTrue(exchange.response().complete)

        exchange = h.chat()
        h.supervisor.grant()
        upstream = h.http.answer(FakeResponse(200, SSE))
        upstream.send(b"data: one\n\n")
        upstream.end(Failure(ResponseFailed([Failure(ConnectionRefusedError("reset"))])))
        self.assertTrue(exchange.closed)
        exchange.disconnect()

        exchange = h.chat()
        h.tick(1)
        exchange.disconnect()

        exchange = h.chat()
        h.supervisor.grant()
        h.http.answer(FakeResponse(200, SSE)).end()
        self.assertTrue(exchange.response().complete)

        self.assertEqual([e["status"] for e in h.requests], [502, 503, 400, 502, 499, 200])
        self.assertEqual(
            requests_total(h),
            {
                ("alpha", "200"): 1,
                ("alpha", "400"): 1,
                ("alpha", "499"): 1,
                ("alpha", "502"): 2,
                ("alpha", "503"): 1,
            },
        )
        self.assertEqual([s for _, s, _ in self.access_lines()], [502, 503, 400, 502, 499, 200])

    def test_failure_after_a_loading_stream(self) -> None:
        """
        An unexpected failure once a loading stream said 200 cuts the
        connection (nothing else can be said) and is recorded as the 500 it is.
        """
        h = self.harness(LOADING_CONFIG)
        h.supervisor.hold = True
        exchange = h.chat()
        h.supervisor.grant()
        h.http.answer(Breaking(200, SSE))
        self.assertTrue(exchange.closed)
        self.assertFalse(exchange.response().complete)
        exchange.disconnect()
        self.assertEqual([e["status"] for e in h.requests], [500])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual(h.supervisor.released, ["alpha"])


class HeaderTests(SynchronousTestCase):
    def test_request_hop_by_hop_dropped(self) -> None:
        """Hop-by-hop headers and those named by C{Connection} are not forwarded."""
        h = RelayHarness()
        h.chat(
            **{
                "Connection": "keep-alive, X-Hop",
                "X-Hop": "1",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Upgrade": "h2c",
                "Proxy-Authorization": "Basic x",
                "Accept-Encoding": "br",
                "Authorization": "Bearer k",
                "X-End": "2",
            }
        )
        sent: Headers = h.http.calls[0].kwargs["headers"]
        names = {name.lower() for name, _ in sent.getAllRawHeaders()}
        self.assertEqual(names, {b"authorization", b"x-end", b"x-forwarded-for"})
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-for"), [b"10.1.2.3"])
        call = h.http.calls[0]
        self.assertEqual(call.url, b"http://127.0.0.1:9001/v1/chat/completions")
        self.assertEqual(call.kwargs["unbuffered"], True)
        self.assertEqual(call.kwargs["allow_redirects"], False)
        self.assertNotIn("timeout", call.kwargs)  # long generations must not time out

    def test_response_hop_by_hop_dropped(self) -> None:
        """The upstream's hop-by-hop response headers do not reach the client."""
        source = Headers(
            {
                b"Connection": [b"close, X-Private"],
                b"X-Private": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Transfer-Encoding": [b"chunked"],
                b"Content-Length": [b"12"],
                b"Content-Encoding": [b""],
                b"Content-Type": [b"text/plain"],
                b"Server": [b"llama.cpp"],
            }
        )
        target = Headers({b"Server": [b"TwistedWeb"]})
        copy_response_headers(source, target)
        self.assertEqual(
            dict(target.getAllRawHeaders()),
            {b"Content-Type": [b"text/plain"], b"Server": [b"llama.cpp"]},
        )

    def test_forwarded_for_appends(self) -> None:
        """An existing C{X-Forwarded-For} chain is extended with the client."""
        from twisted.internet.address import IPv4Address
        from twisted.web.test.requesthelper import DummyRequest

        request = DummyRequest([b""])
        request.client = IPv4Address("TCP", "192.0.2.1", 1)
        request.requestHeaders.setRawHeaders(b"X-Forwarded-For", [b"198.51.100.7"])
        headers = forward_headers(request)  # type: ignore[arg-type]
        self.assertEqual(headers.getRawHeaders(b"x-forwarded-for"), [b"198.51.100.7, 192.0.2.1"])

    def test_find_usage(self) -> None:
        """Usage is found in JSON and SSE tails; junk is ignored."""
        self.assertEqual(find_usage(b'{"a":1,"usage":{"x":{"y":2}}}'), {"x": {"y": 2}})
        self.assertIsNone(find_usage(b'..."usage": {"trunc'))
        self.assertIsNone(find_usage(b"no usage here"))


class CookieSetter(Resource):
    """Sets a cookie and reports the Cookie header it received."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Set-Cookie", b"session=user-a; Path=/")
        return request.getHeader(b"cookie") or b"(none)"


class UpstreamClientTests(TestCase):
    async def test_no_cookie_shared_between_requests(self) -> None:
        """A cookie an upstream sets is relayed, never replayed on later requests."""
        from twisted.internet import reactor
        from twisted.internet.endpoints import TCP4ServerEndpoint
        from twisted.web.server import Site

        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Site(CookieSetter())
        )
        self.addCleanup(port.stopListening)
        client, pool = make_http(reactor)
        self.addCleanup(pool.closeCachedConnections)
        url = f"http://127.0.0.1:{port.getHost().port}/"
        first = await client.get(url)
        self.assertEqual(first.headers.getRawHeaders(b"set-cookie"), [b"session=user-a; Path=/"])
        self.assertEqual(await first.content(), b"(none)")
        second = await client.get(url)
        self.assertEqual(await second.content(), b"(none)")


class UpstreamURLTests(SynchronousTestCase):
    """The upstream client's URL fast path sends exactly what treq's own parsing sends."""

    def test_ready_urls_match_treq(self) -> None:
        """A URL given the fast path has the text hyperlink's to_uri() gives; others go slow."""
        from hyperlink import EncodedURL
        from twisted.internet.testing import MemoryReactorClock

        client, _ = make_http(MemoryReactorClock())
        ready = getattr(client, "_ready")  # noqa: B009
        urls = [
            b"http://127.0.0.1:8080/v1/chat/completions",
            b"http://localhost:9000/base/upstream/a%2Fb;x=1?q=%41&r=(1)*2",
            b"https://a.example.com/x/../y/./z?a=b",
            b"http://127.0.0.1:8080/a?",  # hyperlink drops the empty query
            b"http://127.0.0.1:8080/a{b}|c",  # hyperlink escapes these
            b"http://127.0.0.1:8080/a?b=c?d",
            b"http://127.0.0.1:8080/a#frag",
            b"http://LOCALHOST:1/a",
            b"http://127.0.0.1:80/a",  # default port
            b"http://u:secret@h:1/a",  # the password is never sent as is
            b"http://h:abc/a",  # hyperlink refuses it: treq still will
        ]
        given = []
        for url in urls:
            fast = ready(url)
            if fast is not None:
                given.append(url)
                expected = EncodedURL.from_text(url.decode("ascii")).to_uri().to_text()
                self.assertEqual(fast.to_uri().to_text(), expected)
        self.assertEqual(given, urls[:3])
