"""
Tests for L{llamaswap.testing.fakeserver}, run as a real child process on a real port.

The clients are blocking (the official openai/anthropic SDKs, http.client and
raw sockets): the server lives in another process, so nothing here needs the
reactor. Most checks share one server (started on first use, stopped at exit);
the misbehaviour flags each get their own.
"""

from __future__ import annotations

import atexit
import base64
import gzip
import http.client
import json
import os
import signal
import socket
import struct
import time
from typing import Any

import anthropic
import openai
from treq import collect, content
from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http import HTTPChannel

from llamaswap.testing.fakeserver import (
    FakeOptions,
    FakeServer,
    FakeSite,
    build_root,
    parse_args,
    parse_duration,
)
from tests.fakeserver_helper import (
    FakeServerProcess,
    free_port,
    spawn_fakeserver,
    start_fakeserver,
)
from tests.proctools import alive

_shared: FakeServerProcess | None = None


def shared_server() -> FakeServerProcess:
    """One well-behaved server (name "alpha", 3 tokens, --echo) for the read-only checks."""
    global _shared
    if _shared is None or not _shared.alive:
        _shared, _ = start_fakeserver("--name", "alpha", "--tokens", "3", "--echo")
        atexit.register(_shared.stop)
    return _shared


def call(
    server: FakeServerProcess,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, http.client.HTTPResponse, bytes]:
    """One HTTP request on a fresh connection: (status, response, body)."""
    assert server.port is not None
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response, response.read()
    finally:
        conn.close()


def call_json(
    server: FakeServerProcess, method: str, path: str, payload: object = None
) -> tuple[int, Any]:
    body = None if payload is None else json.dumps(payload).encode()
    status, _, raw = call(server, method, path, body, {"content-type": "application/json"})
    return status, json.loads(raw)


def sse_data(raw: bytes) -> list[str]:
    """The data: payloads of an SSE body, in order."""
    return [
        line[len(b"data: ") :].decode() for line in raw.split(b"\n") if line.startswith(b"data: ")
    ]


def wait_until(predicate: Any, timeout: float = 5.0, step: float = 0.02) -> Any:
    """Poll C{predicate} (a real child process is involved) until it is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


class OpenAISDKTests(TestCase):
    """The official openai SDK talks to the fake server, streaming and not."""

    def setUp(self) -> None:
        self.server = shared_server()
        self.client = openai.OpenAI(base_url=self.server.url("/v1"), api_key="k", max_retries=0)
        self.addCleanup(self.client.close)

    def test_chat(self) -> None:
        """A chat completion names the requested model and says who served it."""
        r = self.client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}]
        )
        self.assertEqual(r.model, "m1")
        self.assertEqual(r.object, "chat.completion")
        self.assertEqual(r.choices[0].message.role, "assistant")
        self.assertEqual(r.choices[0].finish_reason, "stop")
        self.assertEqual(
            r.choices[0].message.content,
            "Hello from alpha (token 0) Hello from alpha (token 1) Hello from alpha (token 2)",
        )
        assert r.usage is not None
        self.assertEqual(r.usage.completion_tokens, 3)
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + 3)
        self.assertEqual((r.model_extra or {})["served_by"], "alpha")

    def test_chat_stream(self) -> None:
        """Streamed deltas add up to the non-streamed content, then usage when asked."""
        stream = self.client.chat.completions.create(
            model="m1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(
            text, "Hello from alpha (token 0) Hello from alpha (token 1) Hello from alpha (token 2)"
        )
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        self.assertEqual(finishes[-1], "stop")
        self.assertEqual(finishes.count("stop"), 1)
        usage = chunks[-1].usage
        assert usage is not None
        self.assertEqual(usage.completion_tokens, 3)
        self.assertEqual({c.model for c in chunks}, {"m1"})

    def test_stream_overrides_and_pacing(self) -> None:
        """fake_tokens and fake_token_delay in the body shape the stream; events arrive paced."""
        stream = self.client.chat.completions.create(
            model="m1",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            extra_body={"fake_tokens": 4, "fake_token_delay": 0.05},
        )
        arrivals = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
        self.assertEqual(len(arrivals), 4)
        # Three gaps of 50 ms: events were written one by one, not buffered.
        self.assertGreater(arrivals[-1] - arrivals[0], 0.12)

    def test_max_tokens_cuts_short(self) -> None:
        """max_tokens below the token count ends with finish_reason "length"."""
        r = self.client.chat.completions.create(
            model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=1
        )
        self.assertEqual(r.choices[0].finish_reason, "length")
        self.assertEqual(r.choices[0].message.content, "Hello from alpha (token 0)")

    def test_completions(self) -> None:
        """Legacy completions work streamed and not."""
        r = self.client.completions.create(model="c1", prompt="once upon")
        self.assertEqual(r.model, "c1")
        self.assertIn("Hello from alpha (token 2)", r.choices[0].text)
        chunks = list(self.client.completions.create(model="c1", prompt="x", stream=True))
        self.assertEqual("".join(c.choices[0].text for c in chunks), r.choices[0].text)
        self.assertEqual(chunks[-1].choices[0].finish_reason, "stop")

    def test_embeddings(self) -> None:
        """Embeddings are deterministic 8-d unit vectors, identical as base64 and floats."""
        default = self.client.embeddings.create(model="e1", input=["alpha", "beta"])
        floats = self.client.embeddings.create(
            model="e1", input=["alpha", "beta"], encoding_format="float"
        )
        self.assertEqual(default.model, "e1")
        self.assertEqual([d.index for d in default.data], [0, 1])
        self.assertEqual([d.embedding for d in default.data], [d.embedding for d in floats.data])
        vector = default.data[0].embedding
        self.assertEqual(len(vector), 8)
        self.assertAlmostEqual(sum(v * v for v in vector), 1.0, places=5)
        self.assertNotEqual(default.data[0].embedding, default.data[1].embedding)
        again = self.client.embeddings.create(model="e1", input="alpha", encoding_format="float")
        self.assertEqual(again.data[0].embedding, vector)

    def test_embeddings_base64_is_float32_le(self) -> None:
        """encoding_format=base64 is little-endian float32, as the SDK expects."""
        _, body = call_json(
            self.server,
            "POST",
            "/v1/embeddings",
            {"model": "e", "input": "alpha", "encoding_format": "base64"},
        )
        _, floats = call_json(
            self.server, "POST", "/v1/embeddings", {"model": "e", "input": "alpha"}
        )
        decoded = struct.unpack("<8f", base64.b64decode(body["data"][0]["embedding"]))
        self.assertEqual(list(decoded), floats["data"][0]["embedding"])

    def test_responses(self) -> None:
        """The minimal Responses API gives output_text, streamed and not."""
        r = self.client.responses.create(model="r1", input="hello")
        self.assertEqual(r.model, "r1")
        self.assertIn("Hello from alpha", r.output_text)
        with self.client.responses.stream(model="r1", input="hello") as stream:
            final = stream.get_final_response()
        self.assertEqual(final.output_text, r.output_text)

    def test_audio_and_images(self) -> None:
        """Transcription (multipart), speech, and image generation/edit answer in shape."""
        t = self.client.audio.transcriptions.create(model="w1", file=("a.wav", b"x" * 123))
        self.assertEqual(t.text, "The length of the file is 123 bytes")
        speech = self.client.audio.speech.create(model="tts", voice="alloy", input="hi")
        self.assertTrue(speech.content.startswith(b"ID3"))
        self.assertIn(b"alpha", speech.content)
        images = self.client.images.generate(model="sd", prompt="a cat", n=2)
        self.assertEqual(len(images.data or []), 2)
        edited = self.client.images.edit(model="sd", image=("a.png", b"\x89PNG"), prompt="x")
        self.assertEqual(len(edited.data or []), 1)


class AnthropicSDKTests(TestCase):
    """The official anthropic SDK talks to /v1/messages, streaming and not."""

    def setUp(self) -> None:
        self.server = shared_server()
        self.client = anthropic.Anthropic(base_url=self.server.url(), api_key="k", max_retries=0)
        self.addCleanup(self.client.close)

    def test_message(self) -> None:
        """A non-streamed message has one text block, end_turn and usage."""
        m = self.client.messages.create(
            model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        )
        self.assertEqual(m.model, "claude-x")
        self.assertEqual(m.role, "assistant")
        self.assertEqual(m.stop_reason, "end_turn")
        block = m.content[0]
        assert block.type == "text"
        self.assertIn("Hello from alpha (token 0)", block.text)
        self.assertEqual(m.usage.output_tokens, 3)

    def test_stream(self) -> None:
        """The SDK's stream helper assembles the text and final message from our events."""
        with self.client.messages.stream(
            model="claude-x", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
            final = stream.get_final_message()
        self.assertEqual(
            text, "Hello from alpha (token 0) Hello from alpha (token 1) Hello from alpha (token 2)"
        )
        self.assertEqual(final.stop_reason, "end_turn")
        self.assertEqual(final.usage.output_tokens, 3)

    def test_stream_event_order(self) -> None:
        """The raw event sequence is Anthropic's, each frame named with event:."""
        body = json.dumps(
            {"model": "c", "max_tokens": 10, "stream": True, "messages": [], "fake_tokens": 2}
        ).encode()
        _, _, raw = call(self.server, "POST", "/v1/messages", body)
        events = [
            line[len(b"event: ") :].decode()
            for line in raw.split(b"\n")
            if line.startswith(b"event: ")
        ]
        self.assertEqual(
            events,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ],
        )

    def test_count_tokens(self) -> None:
        """count_tokens answers with input_tokens."""
        count = self.client.messages.count_tokens(
            model="claude-x", messages=[{"role": "user", "content": "one two three"}]
        )
        self.assertGreaterEqual(count.input_tokens, 3)


class RouteTests(TestCase):
    """The plain HTTP routes, with http.client."""

    def setUp(self) -> None:
        self.server = shared_server()

    def test_identity(self) -> None:
        """Every answer carries X-Served-By; JSON answers echo the body and Content-Length."""
        body = json.dumps({"model": "m9", "messages": [{"role": "user", "content": "x"}]})
        status, response, raw = call(
            self.server, "POST", "/v1/chat/completions", body.encode(), {"x-test": "1"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(response.getheader("x-served-by"), "alpha")
        answer = json.loads(raw)
        self.assertEqual(answer["served_by"], "alpha")
        self.assertEqual(answer["model"], "m9")
        self.assertEqual(answer["h_content_length"], str(len(body)))
        self.assertEqual(answer["request_body"], body)
        self.assertEqual(answer["request_headers"]["x-test"], "1")
        _, health, _ = call(self.server, "GET", "/health")
        self.assertEqual(health.getheader("x-served-by"), "alpha")

    def test_small_routes(self) -> None:
        """/, /health, /pid, /env, /props and /v1/models answer as documented."""
        self.assertEqual(call(self.server, "GET", "/")[2], b"GET /")
        self.assertEqual(call_json(self.server, "GET", "/health"), (200, {"status": "ok"}))
        self.assertEqual(call_json(self.server, "GET", "/pid")[1]["pid"], self.server.pid)
        self.assertEqual(call_json(self.server, "GET", "/env")[1]["PATH"], os.environ["PATH"])
        self.assertEqual(call_json(self.server, "GET", "/props")[1]["model"], "alpha")
        models = call_json(self.server, "GET", "/v1/models")[1]
        self.assertEqual([m["id"] for m in models["data"]], ["alpha"])
        self.assertEqual(call_json(self.server, "GET", "/v1/models/alpha")[1]["id"], "alpha")
        voices = call_json(self.server, "GET", "/v1/audio/voices?model=v")[1]
        self.assertEqual(voices["voices"], ["voice1"])
        status, _, raw = call(self.server, "HEAD", "/health")
        self.assertEqual((status, raw), (200, b""))

    def test_errors_are_json(self) -> None:
        """Bad JSON and empty bodies give 400, unknown routes 404, wrong methods 405: all JSON."""
        status, _, raw = call(self.server, "POST", "/v1/chat/completions", b"{nope")
        self.assertEqual(status, 400)
        self.assertIn("invalid JSON", json.loads(raw)["error"]["message"])
        self.assertEqual(call(self.server, "POST", "/v1/embeddings", b"")[0], 400)
        self.assertEqual(call(self.server, "POST", "/v1/embeddings", b"[1]")[0], 400)
        for path in ("/nope", "/v1/nope", "/v1/chat/nope/deeper"):
            status, _, raw = call(self.server, "GET", path)
            self.assertEqual(status, 404, path)
            self.assertEqual(json.loads(raw)["error"]["code"], 404)
        status, response, raw = call(self.server, "DELETE", "/v1/models")
        self.assertEqual(status, 405)
        self.assertEqual(response.getheader("allow"), "GET, HEAD")
        self.assertEqual(json.loads(raw)["error"]["code"], 405)
        status, _, raw = call(self.server, "GET", "/v1/chat/completions")
        self.assertEqual(status, 405)

    def test_status_on_demand(self) -> None:
        """/status/<code> answers that status, with a Location when asked."""
        status, body = call_json(self.server, "GET", "/status/418")
        self.assertEqual((status, body["status"]), (418, 418))
        status, response, _ = call(self.server, "POST", "/status/302?location=/elsewhere")
        self.assertEqual((status, response.getheader("location")), (302, "/elsewhere"))
        self.assertEqual(call(self.server, "GET", "/status/204")[::2], (204, b""))
        self.assertEqual(call(self.server, "GET", "/status/99")[0], 400)

    def test_echo(self) -> None:
        """/echo/... reports method, path, query, headers, body and its framing."""
        status, echo = call_json(self.server, "PUT", "/echo/a/b?x=1&y=", {"k": "v"})
        self.assertEqual(status, 200)
        self.assertEqual(echo["method"], "PUT")
        self.assertEqual(echo["path"], "/echo/a/b")
        self.assertEqual(echo["query"], "x=1&y=")
        self.assertEqual(echo["args"], {"x": ["1"], "y": [""]})
        self.assertEqual(echo["body"], '{"k": "v"}')
        self.assertEqual(echo["content_length"], "10")
        self.assertIsNone(echo["transfer_encoding"])
        self.assertEqual(echo["headers"]["content-type"], "application/json")
        assert self.server.port is not None
        conn = http.client.HTTPConnection(self.server.host, self.server.port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/echo", body=iter([b"abc", b"defg"]), encode_chunked=True)
        chunked = json.loads(conn.getresponse().read())
        self.assertEqual(chunked["transfer_encoding"], "chunked")
        self.assertEqual((chunked["body_length"], chunked["body"]), (7, "abcdefg"))
        self.assertIsNone(chunked["content_length"])

    def test_native_completion_and_infill(self) -> None:
        """/completion and /infill speak llama-server's native format, streamed and not."""
        for path in ("/completion", "/infill"):
            status, body = call_json(self.server, "POST", path, {"prompt": "x", "n_predict": 2})
            self.assertEqual(status, 200)
            self.assertTrue(body["stop"])
            self.assertEqual(
                body["content"], "Hello from alpha (token 0) Hello from alpha (token 1)"
            )
            payload = json.dumps({"prompt": "x", "stream": True}).encode()
            frames = [json.loads(d) for d in sse_data(call(self.server, "POST", path, payload)[2])]
            self.assertEqual([f["stop"] for f in frames], [False, False, False, True])
            self.assertEqual(
                "".join(f["content"] for f in frames),
                body["content"] + (" Hello from alpha (token 2)"),
            )

    def test_rerank(self) -> None:
        """All three rerank routes rank documents by overlap with the query."""
        request = {"model": "rr", "query": "cat", "documents": ["dog", "a cat", "fish"], "top_n": 2}
        for path in ("/v1/rerank", "/v1/reranking", "/rerank"):
            status, body = call_json(self.server, "POST", path, request)
            self.assertEqual(status, 200, path)
            self.assertEqual(len(body["results"]), 2)
            self.assertEqual(body["results"][0]["index"], 1)
            self.assertEqual(body["model"], "rr")
            scores = [r["relevance_score"] for r in body["results"]]
            self.assertEqual(scores, sorted(scores, reverse=True))

    def test_gzip(self) -> None:
        """/gzip compresses only for clients that accept gzip."""
        _, response, raw = call(self.server, "GET", "/gzip", headers={"accept-encoding": "gzip"})
        self.assertEqual(response.getheader("content-encoding"), "gzip")
        self.assertEqual(json.loads(gzip.decompress(raw))["served_by"], "alpha")
        _, response, raw = call(self.server, "GET", "/gzip")
        self.assertIsNone(response.getheader("content-encoding"))
        self.assertEqual(json.loads(raw)["served_by"], "alpha")

    def test_bulk_bodies(self) -> None:
        """/big streams exactly N MiB, /sse N events then [DONE]."""
        status, response, raw = call(self.server, "GET", "/big?mb=2")
        self.assertEqual((status, len(raw)), (200, 2 * 1024 * 1024))
        self.assertEqual(response.getheader("content-length"), str(2 * 1024 * 1024))
        status, response, raw = call(self.server, "GET", "/sse?events=500")
        self.assertEqual(response.getheader("content-type"), "text/event-stream")
        data = sse_data(raw)
        self.assertEqual((len(data), data[-1]), (501, "[DONE]"))
        self.assertEqual(json.loads(data[499])["i"], 499)

    def test_slow_respond(self) -> None:
        """/slow-respond sends its text one character at a time, delay apart."""
        started = time.monotonic()
        status, _, raw = call(self.server, "GET", "/slow-respond?echo=abcd&delay=40ms")
        self.assertEqual((status, raw), (200, b"abcd"))
        self.assertGreater(time.monotonic() - started, 0.1)
        self.assertEqual(call(self.server, "GET", "/slow-respond?delay=soon")[0], 400)

    def test_request_accounting(self) -> None:
        """/debug/stats counts requests but not health probes or /debug itself."""
        before = call_json(self.server, "GET", "/debug/stats")[1]
        call(self.server, "GET", "/health")
        call(self.server, "GET", "/pid?probe=accounting")
        after = call_json(self.server, "GET", "/debug/stats")[1]
        self.assertEqual(after["requests"], before["requests"] + 1)
        self.assertEqual(after["health_checks"], before["health_checks"] + 1)
        self.assertEqual((after["pid"], after["active"]), (self.server.pid, 0))
        self.server.wait_for_line("GET /pid?probe=accounting")  # one stdout line per request

    def test_parse_duration(self) -> None:
        """Durations are seconds or Go-style suffixed numbers."""
        self.assertEqual(
            [parse_duration(t) for t in ("0.5", "250ms", "2s", "1m")], [0.5, 0.25, 2.0, 60.0]
        )
        self.assertRaises(ValueError, parse_duration, "-1")
        self.assertRaises(ValueError, parse_duration, "soon")


class DisconnectTests(TestCase):
    """A client that goes away mid-stream stops the generation at once."""

    def test_stream_stops_when_client_leaves(self) -> None:
        """The disconnect is logged and recorded within moments, and no frame follows it."""
        server, port = start_fakeserver("--name", "d", "--token-delay", "0.02", "--tokens", "500")
        self.addCleanup(server.stop)
        body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        received = b""
        while b"(token 1)" not in received:
            received += sock.recv(65536)
        sock.close()
        closed_at = time.monotonic()

        def records() -> list[dict[str, Any]]:
            _, value = call_json(server, "GET", "/debug/disconnects")
            return list(value)

        found = wait_until(records)
        self.assertEqual(len(found), 1)
        self.assertEqual(found[0]["path"], "/v1/chat/completions")
        # Same CLOCK_MONOTONIC on Linux; generous bounds for a loaded CI machine.
        self.assertLess(found[0]["at"] - closed_at, 1.0)
        self.assertLess(found[0]["frames_written"], 100)
        server.wait_for_line("client disconnected: /v1/chat/completions")
        frames = call_json(server, "GET", "/debug/stats")[1]["frames"]
        time.sleep(0.1)  # five token intervals: a generation still running would show
        stats = call_json(server, "GET", "/debug/stats")[1]
        self.assertEqual((stats["frames"], stats["active"]), (frames, 0))

    def test_bulk_stream_stops_when_client_leaves(self) -> None:
        """/big stops pushing chunks when the reader leaves."""
        server, port = start_fakeserver("--name", "d", "--quiet")
        self.addCleanup(server.stop)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(b"GET /big?mb=256 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = 0
        while received < 1024 * 1024:
            received += len(sock.recv(65536))
        sock.close()
        found = wait_until(lambda: call_json(server, "GET", "/debug/disconnects")[1])
        self.assertEqual(found[0]["path"], "/big")
        self.assertLess(found[0]["frames_written"], 4096)  # 256 MiB is 4096 chunks


class LifecycleTests(TestCase):
    """Startup delay, crashes, exits and signals, each on its own server."""

    def test_startup_delay(self) -> None:
        """/health and the API answer 503 while loading, then 200; SIGTERM exits cleanly."""
        started = time.monotonic()
        server, _ = start_fakeserver("--name", "slow", "--startup-delay", "0.6")
        self.addCleanup(server.stop)
        self.assertEqual(call_json(server, "GET", "/health")[0], 503)
        self.assertEqual(call_json(server, "GET", "/health")[1]["status"], "loading")
        status, body = call_json(server, "POST", "/v1/chat/completions", {"messages": []})
        self.assertEqual((status, body["error"]["code"]), (503, 503))
        self.assertEqual(call_json(server, "GET", "/pid")[0], 200)  # utility routes always answer
        self.assertTrue(wait_until(lambda: call_json(server, "GET", "/health")[0] == 200))
        self.assertGreater(time.monotonic() - started, 0.55)
        self.assertEqual(call_json(server, "GET", "/health")[1], {"status": "ok"})
        server.signal(signal.SIGTERM)
        self.assertEqual(server.wait_exit(), 0)
        self.assertIn("Received SIGTERM, exiting", server.stdout_lines)

    def test_never_healthy(self) -> None:
        """--never-healthy keeps /health at 503."""
        server, _ = start_fakeserver("--name", "sick", "--never-healthy", "--quiet")
        self.addCleanup(server.stop)
        self.assertEqual(call_json(server, "GET", "/health")[0], 503)
        time.sleep(0.2)
        self.assertEqual(call_json(server, "GET", "/health")[0], 503)

    def test_crash_after(self) -> None:
        """--crash-after 2 serves two requests fully (health not counted), then exits 1."""
        server, _ = start_fakeserver("--name", "c", "--crash-after", "2")
        self.addCleanup(server.stop)
        self.assertEqual(call(server, "GET", "/health")[0], 200)
        self.assertEqual(call(server, "GET", "/pid")[0], 200)
        status, response, raw = call(server, "GET", "/big?mb=1")
        self.assertEqual((status, len(raw)), (200, 1024 * 1024))
        self.assertEqual(response.getheader("connection"), "close")
        self.assertEqual(server.wait_exit(5), 1)
        self.assertIn("exiting with status 1", server.output())

    def test_exit_during_startup(self) -> None:
        """--exit-during-startup prints to stdout and stderr, then exits 3 without listening."""
        server = spawn_fakeserver(
            "--name", "x", "--port", str(free_port()), "--exit-during-startup"
        )
        self.addCleanup(server.stop)
        self.assertEqual(server.wait_exit(), 3)
        self.assertIn("loading model", "\n".join(server.stdout_lines))
        self.assertIn("failed to load model", "\n".join(server.stderr_lines))
        self.assertIsNone(server.port)

    def test_exit_after_startup_delay(self) -> None:
        """With a startup delay it listens (503) first, then exits with the given code."""
        server, _ = start_fakeserver(
            "--name", "x", "--exit-during-startup", "7", "--startup-delay", "0.3"
        )
        self.addCleanup(server.stop)
        self.assertEqual(call(server, "GET", "/health")[0], 503)
        self.assertEqual(server.wait_exit(), 7)

    def test_ignore_sigterm(self) -> None:
        """--ignore-sigterm logs and keeps serving; only SIGKILL ends it."""
        server, _ = start_fakeserver("--name", "stubborn", "--ignore-sigterm")
        self.addCleanup(server.stop)
        server.signal(signal.SIGTERM)
        server.wait_for_line("Ignoring SIGTERM")
        self.assertEqual(call(server, "GET", "/health")[0], 200)
        self.assertTrue(server.alive)
        server.signal(signal.SIGKILL)
        self.assertEqual(server.wait_exit(), -signal.SIGKILL)

    def test_fork_grandchild(self) -> None:
        """--fork-grandchild leaves a sleep in the server's process group; a group kill ends it."""
        server, _ = start_fakeserver("--name", "g", "--fork-grandchild", "--quiet")
        self.addCleanup(server.stop)
        grandchild = call_json(server, "GET", "/debug/stats")[1]["grandchild_pid"]
        self.assertIsInstance(grandchild, int)
        self.assertEqual(os.getpgid(grandchild), server.pid)
        server.stop()
        self.assertTrue(wait_until(lambda: not alive(grandchild)))

    def test_expect_model(self) -> None:
        """--expect-model rejects other model names with a 400 naming both."""
        server, _ = start_fakeserver("--name", "e", "--expect-model", "good", "--quiet")
        self.addCleanup(server.stop)
        ok = call_json(server, "POST", "/v1/chat/completions", {"model": "good", "messages": []})
        self.assertEqual(ok[0], 200)
        status, body = call_json(server, "POST", "/v1/embeddings", {"model": "bad", "input": "x"})
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["message"], "Invalid model: bad, expected: good")


class InProcessTests(SynchronousTestCase):
    """
    The resource tree also runs in-process under StubTreq with a Clock: the
    way unit tests elsewhere can use it as an upstream without sockets.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.exits: list[int] = []

    def stub(self, **options: Any) -> tuple[FakeServer, StubTreq]:
        fake = FakeServer(
            FakeOptions(name="unit", **options), self.clock, exit_process=self.exits.append
        )
        return fake, StubTreq(build_root(fake))

    def test_startup_delay_follows_the_clock(self) -> None:
        """/health is 503 until the injected clock passes the startup delay."""
        _, stub = self.stub(startup_delay=5.0)
        response = self.successResultOf(stub.get("http://fake/health"))
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders("x-served-by"), ["unit"])
        self.clock.advance(5)
        self.assertEqual(self.successResultOf(stub.get("http://fake/health")).code, 200)

    def test_paced_stream(self) -> None:
        """Each token frame is written when the clock reaches it, not before."""
        _, stub = self.stub(tokens=3, token_delay=1.0)
        d = stub.post(
            "http://fake/v1/chat/completions", json={"model": "m", "stream": True, "messages": []}
        )
        stub.flush()
        response = self.successResultOf(d)
        chunks: list[bytes] = []
        done = collect(response, chunks.append)
        stub.flush()
        self.assertEqual(len(sse_data(b"".join(chunks))), 1)  # the role delta only
        # role, token 0, token 1, then token 2 with the final chunk and [DONE].
        for seen in (2, 3, 6):
            self.clock.advance(1)
            stub.flush()
            self.assertEqual(len(sse_data(b"".join(chunks))), seen)
        self.successResultOf(done)
        self.assertEqual(sse_data(b"".join(chunks))[-1], "[DONE]")

    def test_crash_after_zero(self) -> None:
        """--crash-after 0 exits (status 1) on the first counted request."""
        _, stub = self.stub(crash_after=0)
        stub.get("http://fake/health")
        self.assertEqual(self.exits, [])
        stub.get("http://fake/pid")
        self.assertEqual(self.exits, [1])

    def test_exit_route(self) -> None:
        """/exit?code=N exits with N."""
        _, stub = self.stub()
        stub.get("http://fake/exit?code=4")
        self.assertEqual(self.exits, [4])


# -- connection handling like llama-server (cpp-httplib) ----------------------------

# Every streamed route, as (method, path, JSON body or None).
STREAMED_ROUTES: list[tuple[bytes, bytes, dict[str, Any] | None]] = [
    (b"POST", b"/v1/chat/completions", {"model": "m", "stream": True, "messages": []}),
    (b"POST", b"/v1/completions", {"model": "m", "stream": True, "prompt": "x"}),
    (b"POST", b"/completion", {"stream": True, "prompt": "x"}),
    (b"POST", b"/infill", {"stream": True, "prompt": "x"}),
    (b"POST", b"/v1/responses", {"model": "m", "stream": True, "input": "x"}),
    (b"POST", b"/v1/messages", {"model": "m", "stream": True, "max_tokens": 9, "messages": []}),
    (b"GET", b"/sse?events=3", None),
]


def raw_request(method: bytes, path: bytes, payload: object = None) -> bytes:
    """The bytes of one keep-alive HTTP/1.1 request."""
    body = b"" if payload is None else json.dumps(payload).encode()
    head = b"%s %s HTTP/1.1\r\nHost: x\r\n" % (method, path)
    if payload is not None:
        head += b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body)
    return head + b"\r\n" + body


def read_response(sock: socket.socket) -> tuple[http.client.HTTPResponse, bytes]:
    """Read one whole response from C{sock}: (response, body). A truncated body raises."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response, response.read()


def exchange(
    sock: socket.socket, method: bytes, path: bytes, payload: object = None
) -> tuple[http.client.HTTPResponse, bytes]:
    """Send one request on C{sock} and read its whole response."""
    sock.sendall(raw_request(method, path, payload))
    return read_response(sock)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return sock


def closed_by_server(sock: socket.socket, timeout: float = 10.0) -> bytes | None:
    """
    Wait for the server to close C{sock}; return what it sent first (b"" when
    nothing), or None if it did not close within C{timeout}.
    """
    sock.settimeout(timeout)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return received


class ConnectionUnitTests(SynchronousTestCase):
    """
    The connection options on an in-memory transport, with a Clock: the fake's
    own FakeSite and channels, minus the sockets.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def site(self, **options: Any) -> tuple[FakeServer, FakeSite]:
        fake = FakeServer(FakeOptions(name="unit", quiet=True, **options), self.clock)
        return fake, FakeSite(build_root(fake), fake)

    def connect(self, site: FakeSite) -> tuple[HTTPChannel, StringTransportWithDisconnection]:
        channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        assert isinstance(channel, HTTPChannel)
        transport = StringTransportWithDisconnection()
        transport.protocol = channel
        channel.makeConnection(transport)
        return channel, transport

    def answers(self, transport: StringTransportWithDisconnection) -> int:
        return transport.value().count(b"HTTP/1.1 200 OK")

    def test_http_threads_queue_fifo(self) -> None:
        """
        With --http-threads 1 a second and third connection stay unread (paused)
        while the first is open, even idle; each close hands the worker to the oldest.
        """
        fake, site = self.site(http_threads=1)
        first, t1 = self.connect(site)
        _, t2 = self.connect(site)
        third, t3 = self.connect(site)
        self.assertEqual([t.producerState for t in (t1, t2, t3)], ["producing", "paused", "paused"])
        first.dataReceived(raw_request(b"GET", b"/pid"))
        self.assertEqual(self.answers(t1), 1)
        self.assertEqual(t2.producerState, "paused")  # an idle keep-alive still holds it
        stats = fake.stats()
        self.assertEqual((stats["connections_waiting"], stats["max_connections_waiting"]), (2, 2))
        t1.loseConnection()
        self.assertEqual((t2.producerState, t3.producerState), ("producing", "paused"))
        t2.loseConnection()
        self.assertEqual(t3.producerState, "producing")
        third.dataReceived(raw_request(b"GET", b"/pid"))
        self.assertEqual(self.answers(t3), 1)
        stats = fake.stats()
        self.assertEqual(stats["connections_accepted"], 3)
        self.assertEqual((stats["max_connections_served"], stats["connections_waiting"]), (1, 0))

    def test_unlimited_by_default(self) -> None:
        """Without --http-threads every connection is read at once."""
        fake, site = self.site()
        transports = [self.connect(site)[1] for _ in range(10)]
        self.assertEqual({t.producerState for t in transports}, {"producing"})
        self.assertEqual(fake.stats()["max_connections_served"], 10)

    def test_close_after_stream_every_route(self) -> None:
        """
        --close-after-stream: every streamed answer is complete (terminating
        chunk), then the server closes, without a Connection: close header.
        """
        fake, site = self.site(close_after_stream=True, tokens=2)
        for method, path, payload in STREAMED_ROUTES:
            channel, transport = self.connect(site)
            channel.dataReceived(raw_request(method, path, payload))
            head, _, body = transport.value().partition(b"\r\n\r\n")
            self.assertIn(b"Transfer-Encoding: chunked", head, path)
            self.assertNotIn(b"connection:", head.lower(), path)
            self.assertTrue(body.endswith(b"\r\n0\r\n\r\n"), path)
            self.assertFalse(transport.connected, path)
        self.assertEqual(fake.stats()["closed_after_stream"], len(STREAMED_ROUTES))

    def test_close_after_paced_stream(self) -> None:
        """A paced stream closes only once its last token and terminator are out."""
        _, site = self.site(close_after_stream=True, tokens=2, token_delay=1.0)
        channel, transport = self.connect(site)
        channel.dataReceived(raw_request(b"POST", b"/v1/chat/completions", STREAMED_ROUTES[0][2]))
        self.clock.advance(1)
        self.assertTrue(transport.connected)
        self.clock.advance(1)
        self.assertFalse(transport.connected)
        self.assertTrue(transport.value().endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"))

    def test_non_streamed_keeps_alive(self) -> None:
        """Answers with a Content-Length (JSON, /big) leave the connection reusable."""
        fake, site = self.site(close_after_stream=True)
        channel, transport = self.connect(site)
        chat = {"model": "m", "messages": []}
        channel.dataReceived(raw_request(b"POST", b"/v1/chat/completions", chat))
        channel.dataReceived(raw_request(b"GET", b"/big?mb=0.001"))
        channel.dataReceived(raw_request(b"GET", b"/pid"))
        self.assertEqual(self.answers(transport), 3)
        self.assertTrue(transport.connected)
        self.assertEqual(fake.stats()["closed_after_stream"], 0)

    def test_streams_keep_alive_by_default(self) -> None:
        """Without the option a streamed answer leaves the connection open, as before."""
        _, site = self.site()
        channel, transport = self.connect(site)
        channel.dataReceived(raw_request(*STREAMED_ROUTES[0]))
        channel.dataReceived(raw_request(b"GET", b"/pid"))
        self.assertEqual(self.answers(transport), 2)
        self.assertTrue(transport.connected)

    def test_keep_alive_timeout(self) -> None:
        """
        An idle connection is closed, silently, --keep-alive-timeout seconds
        after its last answer (or its accept); a request in progress is never idle.
        """
        fake, site = self.site(keep_alive_timeout=5.0, tokens=3, token_delay=4.0)
        channel, transport = self.connect(site)
        self.clock.advance(4.9)
        channel.dataReceived(raw_request(b"GET", b"/pid"))
        self.clock.advance(4.9)
        self.assertTrue(transport.connected)
        # A 12 s stream outlives the timeout without being cut.
        channel.dataReceived(raw_request(*STREAMED_ROUTES[0]))
        for _ in range(3):
            self.clock.advance(4)
        self.assertTrue(transport.value().endswith(b"\r\n0\r\n\r\n"))
        self.assertTrue(transport.connected)
        sent = transport.value()
        self.clock.advance(4.9)
        self.assertTrue(transport.connected)
        self.clock.advance(0.2)
        self.assertFalse(transport.connected)
        self.assertEqual(transport.value(), sent)  # nothing said on the way out
        self.assertEqual(fake.stats()["closed_idle"], 1)

    def test_idle_connection_holds_its_worker(self) -> None:
        """
        As in llama-server, an idle keep-alive connection keeps its worker until
        the keep-alive timeout closes it; only then is the waiting one read.
        """
        _, site = self.site(http_threads=1, keep_alive_timeout=5.0)
        first, t1 = self.connect(site)
        first.dataReceived(raw_request(b"GET", b"/pid"))
        self.clock.advance(1)
        _, t2 = self.connect(site)
        self.clock.advance(3.9)
        self.assertEqual(t2.producerState, "paused")
        self.clock.advance(0.2)
        self.assertFalse(t1.connected)
        self.assertEqual(t2.producerState, "producing")
        # Its own idle time counts from when it got the worker, not from its accept.
        self.clock.advance(4.9)
        self.assertTrue(t2.connected)
        self.clock.advance(0.2)
        self.assertFalse(t2.connected)

    def test_accept_delay(self) -> None:
        """--accept-delay: nothing is read from a new connection for S seconds; then all is."""
        _, site = self.site(accept_delay=2.0)
        channel, transport = self.connect(site)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(1.9)
        self.assertEqual(transport.producerState, "paused")
        self.clock.advance(0.1)
        self.assertEqual(transport.producerState, "producing")
        channel.dataReceived(raw_request(b"GET", b"/pid"))
        channel.dataReceived(raw_request(b"GET", b"/pid"))
        self.assertEqual(self.answers(transport), 2)  # a reused connection is not delayed

    def test_accept_delay_and_worker_wait(self) -> None:
        """A connection is read once both its accept delay is over and it has a worker."""
        _, site = self.site(accept_delay=1.0, http_threads=1)
        _, t1 = self.connect(site)
        _, t2 = self.connect(site)
        self.clock.advance(5)
        self.assertEqual((t1.producerState, t2.producerState), ("producing", "paused"))
        t1.loseConnection()
        self.assertEqual(t2.producerState, "producing")

    def test_read_delay(self) -> None:
        """--read-delay: every request, reused connection included, is handled S later."""
        fake, site = self.site(read_delay=1.0)
        channel, transport = self.connect(site)
        self.assertEqual(transport.producerState, "producing")
        for answered in (1, 2):
            channel.dataReceived(raw_request(b"GET", b"/pid"))
            self.clock.advance(0.9)
            self.assertEqual(self.answers(transport), answered - 1)
            self.clock.advance(0.1)
            self.assertEqual(self.answers(transport), answered)
        self.assertEqual(fake.requests, 2)

    def test_read_delay_client_leaves(self) -> None:
        """A request whose client left during the read delay is never handled."""
        fake, site = self.site(read_delay=1.0)
        channel, transport = self.connect(site)
        channel.dataReceived(raw_request(b"GET", b"/pid"))
        transport.loseConnection()
        self.clock.advance(2)
        self.assertEqual((fake.requests, transport.value()), (0, b""))


class StreamPacingTests(SynchronousTestCase):
    """--token-delay paces every streamed route, one event per token."""

    def test_every_streamed_route_is_paced(self) -> None:
        """Each token event is written when the clock reaches it, not before, nor batched."""
        clock = Clock()
        fake = FakeServer(FakeOptions(name="unit", tokens=3, token_delay=1.0), clock)
        stub = StubTreq(build_root(fake))
        for method, path, payload in STREAMED_ROUTES:
            marker = b'"i":' if path.startswith(b"/sse") else b"(token "
            url = "http://fake" + path.decode()
            d = stub.request(method.decode(), url, json=payload)
            stub.flush()
            chunks: list[bytes] = []
            done = collect(self.successResultOf(d), chunks.append)
            for seen in (0, 1, 2):
                stub.flush()
                self.assertEqual(b"".join(chunks).count(marker), seen, path)
                clock.advance(0.9)
                stub.flush()
                self.assertEqual(b"".join(chunks).count(marker), seen, path)
                clock.advance(0.1)
            stub.flush()
            self.successResultOf(done)

    def test_sse_delay_query(self) -> None:
        """/sse?delay= overrides --token-delay; a bad one is a 400."""
        clock = Clock()
        stub = StubTreq(build_root(FakeServer(FakeOptions(name="unit", token_delay=5.0), clock)))
        d = stub.get("http://fake/sse?events=2&delay=0")
        stub.flush()
        self.assertEqual(len(sse_data(self.successResultOf(d.addCallback(content)))), 3)
        bad = self.successResultOf(stub.get("http://fake/sse?delay=soon"))
        self.assertEqual(bad.code, 400)


class ParseArgsTests(SynchronousTestCase):
    """The connection options and the --like-llama-server preset."""

    def test_defaults_off(self) -> None:
        """Without options the fake behaves as it always did."""
        o = parse_args(["--port", "0"])
        self.assertEqual(
            (o.http_threads, o.close_after_stream, o.keep_alive_timeout),
            (0, False, 0.0),
        )
        self.assertEqual((o.accept_delay, o.read_delay), (0.0, 0.0))

    def test_options(self) -> None:
        o = parse_args(
            [
                *("--port", "0", "--http-threads", "2", "--close-after-stream"),
                *("--keep-alive-timeout", "1.5", "--accept-delay", "0.2", "--read-delay", "0.3"),
            ]
        )
        self.assertEqual(
            (o.http_threads, o.close_after_stream, o.keep_alive_timeout), (2, True, 1.5)
        )
        self.assertEqual((o.accept_delay, o.read_delay), (0.2, 0.3))

    def test_like_llama_server(self) -> None:
        """The preset sets the three, each unless given explicitly."""
        o = parse_args(["--port", "0", "--like-llama-server"])
        self.assertEqual(
            (o.http_threads, o.close_after_stream, o.keep_alive_timeout), (5, True, 5.0)
        )
        o = parse_args(
            [
                *("--port", "0", "--like-llama-server", "--http-threads", "0"),
                *("--no-close-after-stream", "--keep-alive-timeout", "2"),
            ]
        )
        self.assertEqual(
            (o.http_threads, o.close_after_stream, o.keep_alive_timeout), (0, False, 2.0)
        )


class ConnectionIntegrationTests(TestCase):
    """
    The same options on a real server process and real sockets. Negative
    checks ("not answered yet") wait a little and can only pass wrongly under
    load, never fail wrongly; positive ones wait on the event itself.
    """

    def start(self, *flags: str) -> tuple[FakeServerProcess, int]:
        server, port = start_fakeserver("--name", "conn", "--quiet", *flags)
        self.addCleanup(server.stop)
        return server, port

    def test_http_threads(self) -> None:
        """--http-threads 1: a second connection is answered only once the first closes."""
        server, port = self.start("--http-threads", "1")
        first = connect(port)
        self.addCleanup(first.close)
        self.assertEqual(exchange(first, b"GET", b"/pid")[0].status, 200)
        second = connect(port)
        self.addCleanup(second.close)
        second.sendall(raw_request(b"GET", b"/pid"))
        second.settimeout(0.5)
        self.assertRaises(TimeoutError, second.recv, 1)  # still unread in its socket
        first.close()
        second.settimeout(10)
        self.assertEqual(read_response(second)[0].status, 200)
        second.close()
        stats = call_json(server, "GET", "/debug/stats")[1]
        self.assertEqual((stats["max_connections_served"], stats["http_threads"]), (1, 1))
        self.assertGreaterEqual(stats["max_connections_waiting"], 1)
        self.assertEqual(stats["connections_accepted"], 3)

    def test_close_after_stream(self) -> None:
        """
        --close-after-stream: the streamed answer is whole, then the socket is
        closed with no word; a client reusing it fails; JSON answers keep it.
        """
        server, port = self.start("--close-after-stream", "--tokens", "3")
        sock = connect(port)
        self.addCleanup(sock.close)
        chat = {"model": "m", "stream": True, "messages": []}
        response, body = exchange(sock, b"POST", b"/v1/chat/completions", chat)
        self.assertIsNone(response.getheader("connection"))
        self.assertEqual(response.getheader("transfer-encoding"), "chunked")
        self.assertEqual(sse_data(body)[-1], "[DONE]")
        self.assertEqual(closed_by_server(sock), b"")
        # http.client reuses the connection (no Connection: close) and fails.
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(conn.close)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat))
        self.assertEqual(sse_data(conn.getresponse().read())[-1], "[DONE]")

        def again() -> None:
            conn.request("POST", "/v1/chat/completions", json.dumps(chat))
            conn.getresponse()

        self.assertRaises(ConnectionError, again)
        # Answers with a Content-Length: one connection serves them all.
        keep = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        self.addCleanup(keep.close)
        sockets = []
        for _ in range(3):
            keep.request("POST", "/v1/chat/completions", json.dumps({"messages": []}))
            self.assertEqual(keep.getresponse().read().count(b"(token "), 3)
            sockets.append(keep.sock)
        self.assertEqual(len(set(map(id, sockets))), 1)
        stats = call_json(server, "GET", "/debug/stats")[1]
        self.assertEqual((stats["closed_after_stream"], stats["closed_idle"]), (2, 0))

    def test_keep_alive_timeout(self) -> None:
        """--keep-alive-timeout: idle connections are closed silently after S; long streams not."""
        # 1 s: the request must reach it within 1 s of the connect, even on a loaded machine.
        server, port = self.start("--keep-alive-timeout", "1")
        sock = connect(port)
        self.addCleanup(sock.close)
        slow = {"stream": True, "messages": [], "fake_tokens": 3, "fake_token_delay": 0.6}
        _, body = exchange(sock, b"POST", b"/v1/chat/completions", slow)
        self.assertEqual(sse_data(body)[-1], "[DONE]")
        idle_since = time.monotonic()
        self.assertEqual(closed_by_server(sock), b"")
        self.assertGreater(time.monotonic() - idle_since, 0.9)
        stats = wait_until(lambda: call_json(server, "GET", "/debug/stats")[1]["closed_idle"])
        self.assertEqual(stats, 1)

    def test_accept_delay(self) -> None:
        """--accept-delay: the first answer on a connection comes no sooner than S."""
        _, port = self.start("--accept-delay", "0.5")
        started = time.monotonic()
        sock = connect(port)
        self.addCleanup(sock.close)
        self.assertEqual(exchange(sock, b"GET", b"/pid")[0].status, 200)
        self.assertGreater(time.monotonic() - started, 0.45)
        self.assertEqual(exchange(sock, b"GET", b"/pid")[0].status, 200)

    def test_read_delay(self) -> None:
        """--read-delay: every request waits S, reused connection included."""
        _, port = self.start("--read-delay", "0.3")
        sock = connect(port)
        self.addCleanup(sock.close)
        for _ in range(2):
            started = time.monotonic()
            self.assertEqual(exchange(sock, b"GET", b"/pid")[0].status, 200)
            self.assertGreater(time.monotonic() - started, 0.25)

    def test_like_llama_server(self) -> None:
        """--like-llama-server turns on all three; a stream ends with the socket closed."""
        server, port = self.start("--like-llama-server")
        stats = call_json(server, "GET", "/debug/stats")[1]
        self.assertEqual(
            (stats["http_threads"], stats["close_after_stream"], stats["keep_alive_timeout"]),
            (5, True, 5.0),
        )
        sock = connect(port)
        self.addCleanup(sock.close)
        _, body = exchange(sock, b"GET", b"/sse?events=2")
        self.assertEqual(sse_data(body)[-1], "[DONE]")
        self.assertEqual(closed_by_server(sock), b"")
