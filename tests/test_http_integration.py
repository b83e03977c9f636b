"""
End-to-end tests of the HTTP surface: the real service (C{build_service}) on
a real port, real fake-upstream children, and real clients (the official
C{openai} and C{anthropic} SDKs, raw sockets, treq).

Blocking clients run in threads (C{deferToThread}) so the proxy, which runs in
the test's reactor, keeps serving them.
"""

from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from llamaswap.config.schema import SecurityConfig
from tests.fakeserver_helper import (
    fake_model,
    free_port,
    make_config,
    start_fakeserver,
)
from tests.live_proxy import Proxy
from tests.proctools import rss_kib

T = TypeVar("T")
MULTIPART_BOUNDARY = "llamaswapTestBoundary"


def in_thread(f: Callable[[], T]) -> Deferred[T]:
    return deferToThread(f)


def fake_get(port: int, path: str) -> Any:
    """Ask a fake upstream directly (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
        return json.loads(answer.read())


def response_tokens(response: http.client.HTTPResponse) -> int:
    """Read a streamed chat answer to the end; count its tokens."""
    return sum(1 for line in iter(response.readline, b"") if b"(token " in line)


def hang_up(conn: http.client.HTTPConnection) -> float:
    """Drop a client's connection at once (both directions); return when (monotonic)."""
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    return time.monotonic()


def wait_for_disconnect(port: int) -> list[dict[str, Any]]:
    """Poll a fake upstream (blocking) until it has seen a client leave (3 s at most)."""
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        seen: list[dict[str, Any]] = fake_get(port, "/debug/disconnects")
        if seen:
            return seen
        time.sleep(0.01)
    return []


class IntegrationCase(TestCase):
    timeout = 60

    def assert_error(self, status: int, body: Any, expected: int, code: str) -> str:
        """The answer is an OpenAI-style JSON error; return its message."""
        self.assertEqual(status, expected, body)
        self.assertEqual(set(body), {"error"})
        self.assertEqual(set(body["error"]), {"message", "type", "param", "code"})
        self.assertEqual(body["error"]["code"], code)
        return str(body["error"]["message"])

    async def serving_alpha(self) -> tuple[Proxy, int]:
        """A proxy whose one model, alpha, has served a request; and alpha's port."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))
        await self.assert_served(proxy)
        return proxy, proxy.upstream_port("alpha")

    async def assert_served(self, proxy: Proxy, model: str = "alpha") -> None:
        """Another client is served normally."""
        status, _, body = await proxy.post_json(
            "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "x"}]}
        )
        self.assertEqual(status, 200, body)
        self.assertEqual(body["served_by"], model)


class SDKTests(IntegrationCase):
    async def test_openai_sdk(self) -> None:
        """The openai SDK works unmodified: chat, streamed chat, completions, embeddings."""
        import openai

        proxy = Proxy(self, make_config({"alpha": fake_model("alpha", "--tokens", "5")}))
        client = openai.OpenAI(base_url=proxy.base + "/v1", api_key="unused", max_retries=0)

        def use_sdk() -> dict[str, Any]:
            messages: Any = [{"role": "user", "content": "hello"}]
            chat = client.chat.completions.create(model="alpha", messages=messages)
            stream = client.chat.completions.create(model="alpha", messages=messages, stream=True)
            streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            completion = client.completions.create(model="alpha", prompt="once upon")
            embedding = client.embeddings.create(model="alpha", input="hello")
            models = client.models.list()
            client.close()  # no keep-alive connection left behind in the reactor
            return {
                "chat": chat.choices[0].message.content,
                "streamed": streamed,
                "completion": completion.choices[0].text,
                "embedding": embedding.data[0].embedding,
                "models": [m.id for m in models],
            }

        got = await in_thread(use_sdk)
        self.assertIn("Hello from alpha", got["chat"])
        self.assertEqual(got["streamed"], got["chat"])
        self.assertIn("Hello from alpha", got["completion"])
        self.assertGreater(len(got["embedding"]), 0)
        self.assertEqual(got["models"], ["alpha"])

    async def test_anthropic_sdk(self) -> None:
        """The anthropic SDK works for /v1/messages, streamed and not."""
        import anthropic

        proxy = Proxy(self, make_config({"claude-ish": fake_model("claude-ish", "--tokens", "4")}))
        client = anthropic.Anthropic(base_url=proxy.base, api_key="unused", max_retries=0)

        def use_sdk() -> tuple[str, str, int]:
            messages: Any = [{"role": "user", "content": "hello"}]
            message = client.messages.create(model="claude-ish", max_tokens=64, messages=messages)
            with client.messages.stream(
                model="claude-ish", max_tokens=64, messages=messages
            ) as stream:
                streamed = stream.get_final_text()
            count = client.messages.count_tokens(model="claude-ish", messages=messages)
            client.close()
            text = "".join(b.text for b in message.content if b.type == "text")
            return text, streamed, count.input_tokens

        text, streamed, tokens = await in_thread(use_sdk)
        self.assertIn("Hello from claude-ish", text)
        self.assertEqual(streamed, text)
        self.assertGreater(tokens, 0)


class StreamingTests(IntegrationCase):
    async def test_no_buffering(self) -> None:
        """
        50 tokens paced 20 ms apart: the client has the first token before the
        upstream has written the second.
        """
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))
        await self.assert_served(proxy)  # started and warm
        upstream = proxy.upstream_port("alpha")

        def stream() -> tuple[int, int, float, float, int]:
            before = fake_get(upstream, "/debug/stats")["frames"]
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = {"model": "alpha", "stream": True, "fake_tokens": 50, "fake_token_delay": 0.02}
            started = time.monotonic()
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            response = conn.getresponse()
            first_at = frames_then = None
            tokens = 0
            while line := response.readline():
                if b"(token " in line:
                    tokens += 1
                    if first_at is None:
                        first_at = time.monotonic()
                        frames_then = fake_get(upstream, "/debug/stats")["frames"] - before
            done = time.monotonic()
            conn.close()
            assert first_at is not None and frames_then is not None
            return tokens, frames_then, first_at - started, done - started, response.status

        tokens, frames_then, first, total, status = await in_thread(stream)
        self.assertEqual((status, tokens), (200, 50))
        # Frames written upstream when token 0 arrived: the role frame and token 0.
        self.assertLessEqual(frames_then, 2)
        self.assertGreater(total, 0.9)  # 50 x 20 ms
        self.assertLess(first, total / 4)

    async def test_slow_client_pauses_upstream(self) -> None:
        """
        A client that stops reading a 200 MiB answer pauses the upstream: only
        a few MiB are in flight (socket buffers), the proxy's memory does not
        grow by the answer, and everything arrives once the client reads again.
        """
        proxy, upstream = await self.serving_alpha()
        size = 200 * 1024 * 1024

        def stall_then_read() -> tuple[int, int, int]:
            before = fake_get(upstream, "/debug/stats")["frames"]
            rss_before = rss_kib() * 1024
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 256 * 1024)
                s.sendall(b"GET /upstream/alpha/big?mb=200 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                received = len(s.recv(65536))
                time.sleep(1.0)  # not reading: the proxy must pause the upstream
                in_flight = (fake_get(upstream, "/debug/stats")["frames"] - before) * 65536
                grown = rss_kib() * 1024 - rss_before
                while chunk := s.recv(1 << 20):
                    received += len(chunk)
                    if received >= size:
                        break
            return in_flight, grown, received

        in_flight, grown, received = await in_thread(stall_then_read)
        self.assertLess(in_flight, 32 * 1024 * 1024)
        self.assertLess(grown, 64 * 1024 * 1024)
        self.assertGreaterEqual(received, size)

    async def test_disconnect_cancels_upstream(self) -> None:
        """A client leaving mid-stream: the upstream sees its connection close within 100 ms."""
        proxy, upstream = await self.serving_alpha()

        def leave_early() -> float:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = {"model": "alpha", "stream": True, "fake_tokens": 500, "fake_token_delay": 0.02}
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            response = conn.getresponse()
            while b"(token 2)" not in response.readline():
                pass
            return hang_up(conn)

        left_at = await in_thread(leave_early)
        seen = await in_thread(lambda: wait_for_disconnect(upstream))
        self.assertEqual(len(seen), 1, seen)
        self.assertEqual(seen[0]["path"], "/v1/chat/completions")
        self.assertLess(seen[0]["at"] - left_at, 0.1)
        self.assertLess(seen[0]["frames_written"], 100)  # generation stopped early
        _, _, running = await proxy.call("GET", "/running")
        self.assertEqual(json.loads(running)["running"][0]["inFlight"], 0)  # lease released
        await self.assert_served(proxy)

    async def test_disconnect_before_headers(self) -> None:
        """A client leaving before the upstream answered: the upstream sees the close."""
        proxy, upstream = await self.serving_alpha()

        def leave_while_waiting() -> float:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = {"model": "alpha", "fake_delay": 5}
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            deadline = time.monotonic() + 3
            while fake_get(upstream, "/debug/stats")["active"] == 0:
                assert time.monotonic() < deadline, "the request never reached the upstream"
                time.sleep(0.01)
            return hang_up(conn)

        left_at = await in_thread(leave_while_waiting)
        seen = await in_thread(lambda: wait_for_disconnect(upstream))
        self.assertEqual(len(seen), 1, seen)
        self.assertLess(seen[0]["at"] - left_at, 0.1)
        await self.assert_served(proxy)

    async def test_upstream_dies_mid_stream(self) -> None:
        """The server dying mid-answer: the client sees a truncated stream, not a clean end."""
        proxy, upstream = await self.serving_alpha()

        def read_until_cut() -> tuple[int, str]:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = {"model": "alpha", "stream": True, "fake_tokens": 500, "fake_token_delay": 0.02}
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            response = conn.getresponse()
            while b"(token 1)" not in response.readline():
                pass
            try:
                fake_get(upstream, "/exit")  # the server exits without answering
            except OSError:
                pass
            try:
                rest = response.read()
            except http.client.IncompleteRead as e:
                return response.status, f"incomplete after {len(e.partial)} more bytes"
            finally:
                conn.close()
            return response.status, f"clean end after {len(rest)} more bytes"

        status, outcome = await in_thread(read_until_cut)
        self.assertEqual(status, 200)
        self.assertTrue(outcome.startswith("incomplete"), outcome)
        # Once the supervisor has seen the exit, the next request restarts the model.
        for _ in range(300):
            running = json.loads((await proxy.call("GET", "/running"))[2])["running"]
            if not running:
                break
            await deferLater(reactor, 0.01)
        await self.assert_served(proxy)

    async def test_queued_client_leaving_starts_nothing(self) -> None:
        """A request queued behind a busy model, abandoned by its client, loads nothing."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha"), "beta": fake_model("beta")}))
        await self.assert_served(proxy)
        upstream = proxy.upstream_port("alpha")

        def long_alpha() -> int:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = {"model": "alpha", "stream": True, "fake_tokens": 40, "fake_token_delay": 0.02}
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            tokens = response_tokens(conn.getresponse())
            conn.close()
            return tokens

        def abandoned_beta() -> None:
            while fake_get(upstream, "/debug/stats")["active"] == 0:
                time.sleep(0.005)  # alpha is now serving: beta must queue
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("POST", "/v1/chat/completions", json.dumps({"model": "beta"}))
            time.sleep(0.1)
            hang_up(conn)

        tokens, _ = await gatherResults([in_thread(long_alpha), in_thread(abandoned_beta)])
        self.assertEqual(tokens, 40)
        await deferLater(reactor, 0.5)
        running = json.loads((await proxy.call("GET", "/running"))[2])["running"]
        self.assertEqual([(r["model"], r["state"]) for r in running], [("alpha", "ready")])

    async def test_gzip_is_decoded(self) -> None:
        """A gzip answer reaches the client decoded, without a stale Content-Length."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))

        def fetch() -> tuple[int, dict[str, str], bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", "/upstream/alpha/gzip", headers={"Accept-Encoding": "gzip"})
            response = conn.getresponse()
            answer = response.status, {k.lower(): v for k, v in response.getheaders()}
            body = response.read()
            conn.close()
            return *answer, body

        status, headers, body = await in_thread(fetch)
        self.assertEqual(status, 200)
        self.assertNotIn("content-encoding", headers)
        self.assertNotIn("content-length", headers)
        self.assertEqual(json.loads(body)["served_by"], "alpha")


class ErrorTests(IntegrationCase):
    async def test_request_errors(self) -> None:
        """Bad JSON 400, missing model 400, unknown model 404; others still served."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))
        status, _, body = await proxy.call("POST", "/v1/chat/completions", b"{not json")
        self.assertIn(
            "invalid JSON", self.assert_error(status, json.loads(body), 400, "bad_request")
        )
        status, _, body = await proxy.post_json("/v1/chat/completions", {"messages": []})
        self.assert_error(status, body, 400, "bad_request")
        status, _, body = await proxy.post_json("/v1/chat/completions", {"model": "nope"})
        self.assertEqual(self.assert_error(status, body, 404, "not_found"), "model not found: nope")
        await self.assert_served(proxy)

    async def test_start_failure(self) -> None:
        """A model that exits during start-up: 502 with its output tail; others still served."""
        proxy = Proxy(
            self,
            make_config(
                {
                    "alpha": fake_model("alpha"),
                    "broken": fake_model("broken", "--exit-during-startup"),
                }
            ),
        )
        status, _, body = await proxy.post_json("/v1/chat/completions", {"model": "broken"})
        message = self.assert_error(status, body, 502, "bad_gateway")
        self.assertIn("failed to load model", message)
        await self.assert_served(proxy)

    async def test_health_timeout(self) -> None:
        """A model never healthy within healthCheckTimeout: 504; others still served."""
        config = make_config(
            {"alpha": fake_model("alpha"), "stuck": fake_model("stuck", "--never-healthy")}
        )
        # 3 s, not 15: evolve() skips the loader's minimum (alpha still starts in time).
        proxy = Proxy(self, attrs.evolve(config, health_check_timeout=3))
        started = time.monotonic()
        status, _, body = await proxy.post_json("/v1/chat/completions", {"model": "stuck"})
        self.assert_error(status, body, 504, "gateway_timeout")
        self.assertLess(time.monotonic() - started, 10)
        await self.assert_served(proxy)

    async def test_custom_check_endpoint(self) -> None:
        """checkEndpoint is what is polled: /v1/models (200) serves, /status/503 times out."""
        config = make_config(
            {
                "alpha": fake_model("alpha", checkEndpoint="/v1/models"),
                "stuck": fake_model("stuck", checkEndpoint="/status/503"),  # /health would be 200
            }
        )
        proxy = Proxy(self, attrs.evolve(config, health_check_timeout=3))
        await self.assert_served(proxy)
        status, _, body = await proxy.post_json("/v1/chat/completions", {"model": "stuck"})
        self.assert_error(status, body, 504, "gateway_timeout")

    async def test_upstream_unreachable(self) -> None:
        """A ready model whose server refuses connections: 502; others still served."""
        dead_port = free_port()
        proxy = Proxy(
            self,
            make_config(
                {
                    "alpha": fake_model("alpha"),
                    "deaf": {
                        "cmd": "sleep 60",
                        "proxy": f"http://127.0.0.1:{dead_port}",
                        "checkEndpoint": "none",
                    },
                }
            ),
        )
        status, _, body = await proxy.post_json("/v1/chat/completions", {"model": "deaf"})
        self.assertIn("unreachable", self.assert_error(status, body, 502, "bad_gateway"))
        await self.assert_served(proxy)

    async def test_body_too_large(self) -> None:
        """Over maxBodySize: 413, even before a huge body is sent; others still served."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}, maxBodySize=4096))
        big = json.dumps({"model": "alpha", "prompt": "x" * 5000}).encode()
        status, _, body = await proxy.call("POST", "/v1/completions", big)
        self.assert_error(status, json.loads(body), 413, "request_too_large")

        def huge_upload() -> tuple[bytes, float]:
            # Announce 10 GB, send nothing: the answer must come without the body.
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
                s.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 10000000000\r\n\r\n"
                )
                started = time.monotonic()
                answer = b""
                while b"}}" not in answer:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    answer += chunk
                return answer, time.monotonic() - started

        answer, took = await in_thread(huge_upload)
        self.assertTrue(answer.startswith(b"HTTP/1.1 413 "), answer)
        self.assertLess(took, 1.0)
        error = json.loads(answer.partition(b"\r\n\r\n")[2])
        self.assertEqual(error["error"]["code"], "request_too_large")
        await self.assert_served(proxy)


class RoutingTests(IntegrationCase):
    async def test_multipart_and_query_models(self) -> None:
        """Transcriptions route by the form field (file intact); voices by ?model=."""
        proxy = Proxy(self, make_config({"whisper": fake_model("whisper", "--echo")}))
        audio = bytes(range(256)) * 40
        body = (
            (
                f"--{MULTIPART_BOUNDARY}\r\n"
                'Content-Disposition: form-data; name="file"; filename="a.wav"\r\n'
                "Content-Type: audio/wav\r\n\r\n"
            ).encode()
            + audio
            + (
                f"\r\n--{MULTIPART_BOUNDARY}\r\n"
                'Content-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
                f"--{MULTIPART_BOUNDARY}--\r\n"
            ).encode()
        )
        status, _, answer = await proxy.call(
            "POST",
            "/v1/audio/transcriptions",
            body,
            {"Content-Type": f"multipart/form-data; boundary={MULTIPART_BOUNDARY}"},
        )
        self.assertEqual(status, 200, answer)
        result = json.loads(answer)
        self.assertEqual(result["served_by"], "whisper")
        self.assertEqual(int(result["h_content_length"]), len(body))
        self.assertIn(str(len(audio)), json.dumps(result))
        status, _, answer = await proxy.call("GET", "/v1/audio/voices?model=whisper")
        self.assertEqual((status, json.loads(answer)["served_by"]), (200, "whisper"))
        status, _, answer = await proxy.call("GET", "/props?model=whisper")
        self.assertEqual((status, json.loads(answer)["served_by"]), (200, "whisper"))

    async def test_upstream_paths(self) -> None:
        """/upstream: slash ids (longest prefix), redirects, query and escaping kept."""
        proxy = Proxy(
            self, make_config({"org/alpha": fake_model("org-alpha"), "org": fake_model("org")})
        )
        status, headers, _ = await proxy.call("GET", "/upstream/org/alpha?x=1")
        self.assertEqual((status, headers["location"]), (301, "/upstream/org/alpha/?x=1"))
        status, headers, _ = await proxy.call("POST", "/upstream/org/alpha", b"{}")
        self.assertEqual((status, headers["location"]), (308, "/upstream/org/alpha/"))
        status, headers, body = await proxy.call("GET", "/upstream/org/alpha/echo/a%2Fb?x=1")
        self.assertEqual(status, 200)
        self.assertEqual(headers["x-served-by"], "org-alpha")
        echoed = json.loads(body)
        self.assertEqual((echoed["path"], echoed["query"]), ("/echo/a%2Fb", "x=1"))
        status, _, body = await proxy.call("GET", "/upstream/org/alpha/")
        self.assertEqual(body, b"GET /")
        status, headers, _ = await proxy.call("GET", "/upstream/org/health")
        self.assertEqual((status, headers["x-served-by"]), (200, "org"))
        status, _, body = await proxy.call("GET", "/upstream")
        self.assertEqual([m["id"] for m in json.loads(body)["data"]], ["org", "org/alpha"])

    async def test_model_list_and_cors(self) -> None:
        """
        /v1/models is sorted with unlisted models hidden; CORS answered for an
        allowed origin (security.allowedOrigins), a 403 for another.
        """
        config = make_config(
            {
                "zeta": fake_model("zeta"),
                "alpha": fake_model("alpha", name="Alpha"),
                "secret": fake_model("secret", unlisted=True),
                "Beta": fake_model("Beta"),
            }
        )
        allowed = SecurityConfig(allowed_origins=("http://webui.test",))
        proxy = Proxy(self, attrs.evolve(config, security=allowed))
        status, headers, body = await proxy.call(
            "GET", "/v1/models", headers={"Origin": "http://webui.test"}
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers["access-control-allow-origin"], "http://webui.test")
        listed = json.loads(body)
        self.assertEqual(listed["object"], "list")
        self.assertEqual([m["id"] for m in listed["data"]], ["Beta", "alpha", "zeta"])
        status, headers, body = await proxy.call(
            "OPTIONS",
            "/v1/chat/completions",
            headers={
                "Origin": "http://webui.test",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type",
            },
        )
        self.assertEqual(status, 204)
        self.assertEqual(headers["access-control-allow-origin"], "http://webui.test")
        self.assertEqual(headers["access-control-allow-headers"], "authorization, content-type")
        self.assertIn("POST", headers["access-control-allow-methods"])
        status, headers, body = await proxy.call(
            "GET", "/v1/models", headers={"Origin": "http://evil.test"}
        )
        self.assertEqual(status, 403)
        self.assertNotIn("access-control-allow-origin", headers)
        self.assertIn(b"origin not allowed: http://evil.test", body)
        status, _, body = await proxy.call("GET", "/running")
        self.assertEqual(json.loads(body), {"running": []})  # nothing was started

    async def test_load_and_unload(self) -> None:
        """Preload answers once ready; unload stops it."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))
        status, _, body = await proxy.call("POST", "/api/models/load/alpha")
        self.assertEqual((status, json.loads(body)), (200, {"msg": "ok", "model": "alpha"}))
        running = json.loads((await proxy.call("GET", "/running"))[2])["running"]
        self.assertEqual([(r["model"], r["state"]) for r in running], [("alpha", "ready")])
        status, _, body = await proxy.call("POST", "/api/models/unload/alpha")
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual(json.loads((await proxy.call("GET", "/running"))[2]), {"running": []})

    async def test_concurrent_clients(self) -> None:
        """Several streamed requests at once are each answered in full."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))

        async def one(i: int) -> None:
            status, _, body = await proxy.call(
                "POST",
                "/v1/chat/completions",
                json.dumps(
                    {"model": "alpha", "stream": True, "fake_tokens": 20, "fake_token_delay": 0.005}
                ).encode(),
            )
            self.assertEqual(status, 200)
            self.assertEqual(body.count(b"(token "), 20, i)
            self.assertTrue(body.endswith(b"data: [DONE]\n\n"))

        await gatherResults([Deferred.fromCoroutine(one(i)) for i in range(8)])

    async def test_request_event_after_release(self) -> None:
        """The "request" event of a finished request sees the model idle (lease released)."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))
        seen: list[tuple[int, int]] = []

        def on_event(kind: str, data: dict[str, Any]) -> None:
            if kind == "request":
                status = proxy.service.supervisor.status("alpha")
                seen.append((data["status"], status.in_flight))

        self.addCleanup(proxy.service.events.subscribe(on_event))
        await self.assert_served(proxy)
        self.assertEqual(seen, [(200, 0)])


class RequestShapingTests(IntegrationCase):
    """sendLoadingState, filters, upstream.ignorePaths and error formats, end to end."""

    async def test_loading_state_with_the_openai_sdk(self) -> None:
        """A streamed chat to a cold model: loading reasoning at once, then the answer."""
        import openai

        proxy = Proxy(
            self,
            make_config(
                {
                    "slow": fake_model("slow", "--startup-delay", "1.6", sendLoadingState=True),
                    "broken": fake_model("broken", "--exit-during-startup", sendLoadingState=True),
                }
            ),
        )
        client = openai.OpenAI(base_url=proxy.base + "/v1", api_key="unused", max_retries=0)

        def use_sdk() -> tuple[float, str, str, str]:
            messages: Any = [{"role": "user", "content": "hello"}]
            started = time.monotonic()
            stream = client.chat.completions.create(model="slow", messages=messages, stream=True)
            first_at = 0.0
            reasoning = content = ""
            for chunk in stream:
                first_at = first_at or time.monotonic() - started
                delta = chunk.choices[0].delta if chunk.choices else None
                if delta is not None:
                    reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
                    content += delta.content or ""
            try:
                list(client.chat.completions.create(model="broken", messages=messages, stream=True))
                error = ""
            except openai.APIError as e:
                error = e.message
            client.close()
            return first_at, reasoning, content, error

        first_at, reasoning, content, error = await in_thread(use_sdk)
        self.assertLess(first_at, 1.0)  # long before the model is ready
        self.assertTrue(reasoning.startswith("llamaswap loading model: slow\n."), reasoning)
        self.assertRegex(reasoning, r"\nDone! \(\d+\.\ds\)\n\n$")
        self.assertIn("Hello from slow", content)
        self.assertIn("failed to load model", error)

    async def test_filters_reach_the_server(self) -> None:
        """The server sees the filtered body with an exact Content-Length; /upstream does not."""
        filters = {
            "stripParams": "top_k, stream",
            "setParams": {"temperature": 0.25},
            "setParamsByID": {"alpha-hot": {"temperature": 1.5}},
        }
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha", "--echo", filters=filters)}))
        status, _, body = await proxy.post_json(
            "/v1/chat/completions",
            {"model": "alpha-hot", "top_k": 3, "messages": [{"role": "user", "content": "x"}]},
        )
        self.assertEqual(status, 200, body)
        seen = json.loads(body["request_body"])
        self.assertEqual(
            seen,
            {
                "model": "alpha-hot",
                "messages": [{"role": "user", "content": "x"}],
                "temperature": 1.5,
            },
        )
        self.assertEqual(body["h_content_length"], str(len(body["request_body"].encode())))
        raw = b'{"model": "alpha", "top_k": 3}'
        status, _, answer = await proxy.call("POST", "/upstream/alpha/v1/chat/completions", raw)
        self.assertEqual(json.loads(answer)["request_body"], raw.decode())

    async def test_ignore_paths_and_error_formats(self) -> None:
        """A static path never loads a model (409); errors follow Accept."""
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}))
        status, _, body = await proxy.call("GET", "/upstream/alpha/favicon.ico")
        self.assertEqual(status, 409)
        self.assertEqual(json.loads(body)["error"]["code"], "conflict")
        self.assertEqual(json.loads((await proxy.call("GET", "/running"))[2]), {"running": []})
        await self.assert_served(proxy)
        status, _, body = await proxy.call("GET", "/upstream/alpha/echo/app.js")
        self.assertEqual(status, 200)
        self.assertEqual(json.loads(body)["path"], "/echo/app.js")
        status, headers, body = await proxy.call(
            "POST", "/v1/chat/completions", b'{"model": "nope"}', {"Accept": "text/plain"}
        )
        self.assertEqual((status, body), (404, b"llamaswap: model not found: nope\n"))
        self.assertEqual(headers["content-type"], "text/plain; charset=utf-8")


class PeerTests(IntegrationCase):
    async def test_peer_is_a_real_server(self) -> None:
        """
        A fake server plays the peer: it sees its own model name and the peer's
        key (not the client's), streams arrive unbuffered, no local process
        starts, and a peer that is down is a 502 while others are served.
        """
        server, port = start_fakeserver(
            "--name", "remote", "--echo", "--expect-model", "llama", "--tokens", "3"
        )
        self.addCleanup(server.stop)
        peers = {
            "remote": {"proxy": f"http://127.0.0.1:{port}", "models": ["llama"], "apiKey": "sk-p"},
            "gone": {"proxy": f"http://127.0.0.1:{free_port()}", "models": ["x"]},
        }
        proxy = Proxy(self, make_config({"alpha": fake_model("alpha")}, peers=peers))
        chat = {"model": "remote/llama", "messages": [{"role": "user", "content": "hi"}]}
        status, _, raw = await proxy.call(
            "POST",
            "/v1/chat/completions",
            json.dumps(chat).encode(),
            {"Content-Type": "application/json", "Authorization": "Bearer mine"},
        )
        self.assertEqual(status, 200, raw)
        answer = json.loads(raw)
        self.assertEqual((answer["served_by"], answer["model"]), ("remote", "llama"))
        self.assertEqual(json.loads(answer["request_body"])["model"], "llama")
        self.assertEqual(answer["request_headers"]["authorization"], "Bearer sk-p")
        self.assertEqual(answer["request_headers"]["x-api-key"], "sk-p")
        self.assertEqual(proxy.service.supervisor.status("alpha").state, "stopped")

        def stream() -> tuple[int, list[str], int, float, float]:
            before = fake_get(port, "/debug/stats")["frames"]
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            body = {**chat, "stream": True, "fake_tokens": 30, "fake_token_delay": 0.02}
            started = time.monotonic()
            conn.request("POST", "/v1/chat/completions", json.dumps(body))
            response = conn.getresponse()
            models, frames_then, first_at = [], -1, 0.0
            while line := response.readline():
                if line.startswith(b"data: {"):
                    event = json.loads(line[6:])
                    models.append(event["model"])
                    if b"(token " in line and not first_at:
                        first_at = time.monotonic()
                        frames_then = fake_get(port, "/debug/stats")["frames"] - before
            done = time.monotonic()
            conn.close()
            return response.status, models, frames_then, first_at - started, done - started

        status, models, frames_then, first, total = await in_thread(stream)
        self.assertEqual(status, 200)
        self.assertEqual(set(models), {"llama"})
        self.assertGreaterEqual(len(models), 31)  # role, 30 tokens, finish
        self.assertLessEqual(frames_then, 2)  # the role frame and token 0: nothing buffered
        self.assertLess(first, total / 4)

        status, _, body = await proxy.post_json("/v1/completions", {"model": "x", "prompt": "p"})
        self.assertIn(
            "gone/x: upstream server unreachable",
            self.assert_error(status, body, 502, "bad_gateway"),
        )
        await self.assert_served(proxy)
        status, _, listing = await proxy.call("GET", "/v1/models")
        ids = [m["id"] for m in json.loads(listing)["data"]]
        self.assertEqual(ids, ["alpha", "gone/x", "remote/llama"])
