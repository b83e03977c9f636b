"""
Tests for the resource tree (L{llamaswap.web.tree} and the routes it mounts)
and the site (L{llamaswap.web.site}): routing, model extraction, errors, the model
list, management routes, CORS, API keys and the body limit. The upstream is a
recording resource behind StubTreq; the client writes raw HTTP/1.1.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from llamaswap.config.schema import SecurityConfig
from llamaswap.errors import HealthTimeout, QueueFull, QueueTimeout, StartFailed
from llamaswap.testing.web import (
    Response,
    events_of,
    post_json,
)
from llamaswap.web.base import JSONResource
from llamaswap.web.site import REFUSED_BODY_LINGER
from llamaswap.web.tree import mount
from tests.multipart import CT, multipart
from tests.resource_tree import PEER_CONFIG, ResourceTreeHarness

# A UI on another origin that the config allows (security.allowedOrigins).
UI_ORIGIN = SecurityConfig(allowed_origins=("http://ui.test",))


def assert_error(case: SynchronousTestCase, response: Response, status: int, code: str) -> str:
    """The response is a JSON error in OpenAI's envelope; return its message."""
    case.assertEqual(response.status, status, response.body)
    case.assertEqual(response.header("content-type"), "application/json")
    error = response.json()["error"]
    case.assertEqual(set(error), {"message", "type", "param", "code"})
    case.assertEqual(error["code"], code)
    case.assertIsInstance(error["message"], str)
    return str(error["message"])


class ModelRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ResourceTreeHarness()

    def test_chat_is_proxied_unchanged(self) -> None:
        """The body reaches the upstream byte for byte on the same path and query."""
        raw = b'{"model":"alpha",  "messages":[{"role":"user","content":"hi"}]}'
        response = self.h.client.request(
            "POST", "/v1/chat/completions?wait=1", raw, {"Content-Type": "application/json"}
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("x-upstream"), "yes")
        sent = self.h.sent()
        self.assertEqual(sent["uri"], "/v1/chat/completions?wait=1")
        self.assertEqual(sent["body"].encode(), raw)
        self.assertEqual(sent["headers"]["content-length"], [str(len(raw))])
        self.assertNotIn("transfer-encoding", sent["headers"])
        self.assertEqual(self.h.supervisor.released, ["alpha"])

    def test_every_json_route(self) -> None:
        """Every JSON model route forwards to the same path with the body's model."""
        from llamaswap.web.tree import JSON_ROUTES

        for path in JSON_ROUTES:
            response = post_json(self.h.client, path, {"model": "a1"})
            self.assertEqual(response.status, 200, path)
            self.assertEqual(self.h.sent()["uri"], path)
        self.assertEqual(set(self.h.supervisor.acquired), {"a1"})

    def test_json_whatever_the_content_type(self) -> None:
        """A JSON body sent as form data (plain C{curl -d}) is still understood."""
        response = self.h.client.request(
            "POST",
            "/v1/completions",
            b'{"model": "alpha", "prompt": "x"}',
            {"Content-Type": "application/x-www-form-urlencoded"},
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])

    def test_alias_is_forwarded_as_requested(self) -> None:
        """An alias reaches its model's server with the alias still in the body."""
        post_json(self.h.client, "/v1/chat/completions", {"model": "a2"})
        self.assertEqual(json.loads(self.h.sent()["body"])["model"], "a2")

    def test_use_model_name_rewrites_with_exact_length(self) -> None:
        """C{useModelName} replaces the model; Content-Length matches the new body."""
        post_json(self.h.client, "/v1/chat/completions", {"model": "beta", "n": 1})
        sent = self.h.sent()
        self.assertEqual(json.loads(sent["body"]), {"model": "beta-upstream", "n": 1})
        self.assertEqual(sent["headers"]["content-length"], [str(len(sent["body"].encode()))])

    def test_profile_prefix_is_stripped(self) -> None:
        """C{profile:model} reaches the upstream as C{model}."""
        post_json(self.h.client, "/v1/chat/completions", {"model": "duo:alpha"})
        self.assertEqual(json.loads(self.h.sent()["body"])["model"], "alpha")

    def test_multipart_model_field(self) -> None:
        """Transcriptions are routed by the form field; the file arrives intact."""
        audio = bytes(range(256)) * 64
        raw = multipart(("file", audio, "a.wav"), ("model", b"duo:beta", None))
        response = self.h.client.request(
            "POST", "/v1/audio/transcriptions", raw, {"Content-Type": CT.decode()}
        )
        self.assertEqual(response.status, 200)
        self.assertEqual(self.h.supervisor.acquired, ["duo:beta"])
        sent = self.h.upstream.requests[-1]
        expected = raw.replace(b"duo:beta", b"beta-upstream")
        self.assertEqual(sent["headers"]["content-length"], [str(len(expected))])
        self.assertEqual(sent["body"], expected.decode("utf-8", "replace"))

    def test_multipart_missing_model(self) -> None:
        """A form without C{model} is a 400 and nothing is started."""
        raw = multipart(("file", b"x", "a.wav"))
        response = self.h.client.request(
            "POST", "/v1/images/edits", raw, {"Content-Type": CT.decode()}
        )
        assert_error(self, response, 400, "bad_request")
        self.assertEqual(self.h.supervisor.acquired, [])

    def test_query_model(self) -> None:
        """C{GET /v1/audio/voices?model=} and C{/props?model=} route by the query."""
        for path in ("/v1/audio/voices?model=alpha", "/props?model=beta&x=1"):
            response = self.h.client.request("GET", path)
            self.assertEqual(response.status, 200)
            self.assertEqual(self.h.sent()["uri"], path)
            self.assertEqual(self.h.sent()["method"], "GET")
        self.assertEqual(self.h.supervisor.acquired, ["alpha", "beta"])
        assert_error(self, self.h.client.request("GET", "/props"), 400, "bad_request")

    def test_versionless(self) -> None:
        """Every C{/v/...} route reaches the upstream without C{/v} (query kept)."""
        paths = [
            "chat/completions",
            "completions",
            "embeddings",
            "rerank",
            "reranking",
            "responses",
            "messages",
            "messages/count_tokens",
        ]
        for path in paths:
            response = post_json(self.h.client, f"/v/{path}?x=1", {"model": "beta"})
            self.assertEqual(response.status, 200, path)
            sent = self.h.sent()
            self.assertEqual(sent["uri"], f"/{path}?x=1")
            self.assertEqual(json.loads(sent["body"])["model"], "beta-upstream")
        self.assertEqual(self.h.supervisor.acquired, ["beta"] * len(paths))

    def test_bad_json(self) -> None:
        """A body that is not JSON: 400, nothing acquired."""
        response = self.h.client.request("POST", "/v1/chat/completions", b"{nope")
        self.assertIn("invalid JSON", assert_error(self, response, 400, "bad_request"))
        self.assertEqual(self.h.supervisor.acquired, [])

    def test_missing_model(self) -> None:
        """JSON without C{model}: 400 "missing or invalid 'model' key"."""
        response = post_json(self.h.client, "/v1/embeddings", {"input": "x"})
        message = assert_error(self, response, 400, "bad_request")
        self.assertEqual(message, "missing or invalid 'model' key")

    def test_unknown_model(self) -> None:
        """An unknown model is a 404 naming only what was asked."""
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "gpt-9"})
        message = assert_error(self, response, 404, "not_found")
        self.assertEqual(message, "model not found: gpt-9")

    def test_supervisor_errors(self) -> None:
        """Start failures (502) and health timeouts (504) reach the client as JSON."""
        self.h.supervisor.error = StartFailed("model alpha exited: boom\nlast line")
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "alpha"})
        self.assertIn("last line", assert_error(self, response, 502, "bad_gateway"))
        self.h.supervisor.error = HealthTimeout("model alpha not healthy after 15 s")
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "alpha"})
        assert_error(self, response, 504, "gateway_timeout")

    def test_queue_full(self) -> None:
        """A full queue is a 429 with the queue's C{Retry-After}."""
        self.h.supervisor.error = QueueFull("the request queue is full", retry_after=7)
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "alpha"})
        assert_error(self, response, 429, "queue_full")
        self.assertEqual(response.header("retry-after"), "7")

    def test_queue_timeout(self) -> None:
        """A request that waited queue.timeout is a 503 with C{Retry-After}."""
        self.h.supervisor.error = QueueTimeout("could not be served within 600 s", retry_after=600)
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "alpha"})
        assert_error(self, response, 503, "queue_timeout")
        self.assertEqual(response.header("retry-after"), "600")

    def test_upstream_error_passed_through(self) -> None:
        """An upstream 4xx/5xx keeps its status, headers and body."""
        self.h.upstream.status = 400
        self.h.upstream.answer = b'{"error": "their words"}'
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "alpha"})
        self.assertEqual(response.status, 400)
        self.assertEqual(response.body, b'{"error": "their words"}')
        self.assertEqual(response.header("x-upstream"), "yes")

    def test_wrong_method(self) -> None:
        """C{GET} on a POST route is a JSON 405 with C{Allow}."""
        response = self.h.client.request("GET", "/v1/chat/completions")
        assert_error(self, response, 405, "method_not_allowed")
        self.assertEqual(response.header("allow"), "POST")

    def test_trailing_slash_is_not_the_route(self) -> None:
        """C{/v1/chat/completions/} is a 404, as in llama-swap."""
        response = post_json(self.h.client, "/v1/chat/completions/", {"model": "alpha"})
        assert_error(self, response, 404, "not_found")


FILTER_CONFIG = """
models:
  alpha:
    cmd: fake --name alpha
    proxy: http://127.0.0.1:9001
    aliases: [a1]
    filters:
      stripParams: "top_k, model, stream"
      setParams: {temperature: 0.5, stop: ["</s>"]}
      setParamsByID:
        alpha-hot: {temperature: 1.5}
  beta:
    cmd: fake --name beta
    proxy: http://127.0.0.1:9002
    useModelName: beta-upstream
    filters: {setParams: {n_predict: 8}}
"""


class FilterTests(SynchronousTestCase):
    """Per-model C{filters} edit the JSON body of model routes (never /upstream)."""

    def setUp(self) -> None:
        self.h = ResourceTreeHarness(FILTER_CONFIG)

    def test_strip_and_set(self) -> None:
        """stripParams and setParams apply; the model and other bytes stay; length exact."""
        raw = b'{"model": "alpha", "top_k": 40, "stream": true, "temperature": 0.9, "x": [1]}'
        response = self.h.client.request("POST", "/v1/chat/completions", raw)
        self.assertEqual(response.status, 200)
        sent = self.h.sent()
        self.assertEqual(
            sent["body"], '{"model": "alpha", "temperature": 0.5, "x": [1], "stop": ["</s>"]}'
        )
        self.assertEqual(sent["headers"]["content-length"], [str(len(sent["body"]))])

    def test_set_params_by_id_is_an_alias(self) -> None:
        """A setParamsByID name routes to its model, which sees the name and its values."""
        post_json(self.h.client, "/v1/completions", {"model": "alpha-hot", "prompt": "x"})
        self.assertEqual(self.h.supervisor.acquired, ["alpha-hot"])
        self.assertEqual(
            json.loads(self.h.sent()["body"]),
            {"model": "alpha-hot", "prompt": "x", "temperature": 1.5, "stop": ["</s>"]},
        )
        post_json(self.h.client, "/v1/completions", {"model": "a1", "prompt": "x"})
        self.assertEqual(json.loads(self.h.sent()["body"])["temperature"], 0.5)

    def test_with_use_model_name(self) -> None:
        """Filters combine with useModelName's rewrite."""
        post_json(self.h.client, "/v1/embeddings", {"model": "beta", "input": "x"})
        self.assertEqual(
            json.loads(self.h.sent()["body"]),
            {"model": "beta-upstream", "input": "x", "n_predict": 8},
        )

    def test_not_on_upstream_or_forms(self) -> None:
        """/upstream and multipart bodies are relayed untouched."""
        raw = b'{"model": "alpha", "top_k": 1}'
        self.h.client.request("POST", "/upstream/alpha/v1/chat/completions", raw)
        self.assertEqual(self.h.sent()["body"], raw.decode())
        form = multipart(("model", b"alpha", None), ("top_k", b"1", None))
        self.h.client.request(
            "POST", "/v1/audio/transcriptions", form, {"Content-Type": CT.decode()}
        )
        self.assertEqual(self.h.sent()["body"], form.decode())


class ErrorFormatTests(SynchronousTestCase):
    """Errors are JSON unless C{Accept} asks for plain text or HTML."""

    def setUp(self) -> None:
        self.h = ResourceTreeHarness()

    def unknown_model(self, accept: str) -> Response:
        return post_json(self.h.client, "/v1/chat/completions", {"model": "gpt-9"}, Accept=accept)

    def test_plain_text(self) -> None:
        """C{Accept: text/plain}: C{llamaswap: <message>}."""
        response = self.unknown_model("text/plain")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-type"), "text/plain; charset=utf-8")
        self.assertEqual(response.body, b"llamaswap: model not found: gpt-9\n")

    def test_html(self) -> None:
        """A browser's C{Accept} gets a small HTML page (message escaped)."""
        response = self.h.client.request(
            "GET",
            "/v1/models/<b>",
            headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"},
        )
        self.assertEqual(response.status, 404)
        self.assertEqual(response.header("content-type"), "text/html; charset=utf-8")
        self.assertIn(b"<h1>llamaswap</h1><p>model not found: &lt;b&gt;</p>", response.body)

    def test_json_wins(self) -> None:
        """JSON whenever the client accepts it, and by default."""
        for accept in (
            "application/json",
            "text/html, application/json",
            "text/plain, application/problem+json",
            "*/*",
            "text/event-stream",
            "text/plain;q=0, */*",
        ):
            response = self.unknown_model(accept)
            assert_error(self, response, 404, "not_found")
        assert_error(self, post_json(self.h.client, "/v1/embeddings", {}), 400, "bad_request")

    def test_every_error_source(self) -> None:
        """405, 401, the async path, and the early 413 follow C{Accept} too."""
        text = {"Accept": "text/plain"}
        response = self.h.client.request("GET", "/v1/chat/completions", headers=text)
        self.assertEqual(
            (response.status, response.body), (405, b"llamaswap: method GET not allowed\n")
        )
        self.assertEqual(response.header("allow"), "POST")
        keyed = ResourceTreeHarness(api_keys=("k",))
        response = keyed.client.request("GET", "/v1/models", headers=text)
        self.assertEqual(response.status, 401)
        self.assertEqual(response.body, b"llamaswap: unauthorized: invalid or missing API key\n")
        self.h.supervisor.error = StartFailed("model alpha exited: boom")
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "alpha"}, **text)
        self.assertEqual(
            (response.status, response.body), (502, b"llamaswap: model alpha exited: boom\n")
        )
        small = ResourceTreeHarness(max_body_size=1024)
        exchange = small.client.open()
        exchange.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nAccept: text/plain\r\n"
            b"Content-Length: 5000\r\n\r\n"
        )
        response = exchange.response()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header("content-type"), "text/plain; charset=utf-8")
        self.assertTrue(response.body.startswith(b"llamaswap: request body exceeds"))


class UpstreamRouteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ResourceTreeHarness()

    def test_longest_prefix_wins(self) -> None:
        """With models C{author} and C{author/model}, the longer id wins."""
        response = self.h.client.request("GET", "/upstream/author/model/v1/x?y=1")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.h.supervisor.acquired, ["author/model"])
        self.assertEqual(self.h.sent()["uri"], "/v1/x?y=1")
        self.h.client.request("GET", "/upstream/author/other")
        self.assertEqual(self.h.supervisor.acquired[-1], "author")
        self.assertEqual(self.h.sent()["uri"], "/other")

    def test_escaping_preserved(self) -> None:
        """Percent-encoding after the model prefix reaches the upstream as sent."""
        self.h.client.request("GET", "/upstream/alpha/files/a%2Fb%20c")
        self.assertEqual(self.h.sent()["uri"], "/files/a%2Fb%20c")

    def test_any_method_with_body(self) -> None:
        """Any method is relayed with its body, without model rewriting."""
        response = self.h.client.request("PUT", "/upstream/beta/thing", b'{"model": "beta"}')
        self.assertEqual(response.status, 200)
        self.assertEqual(self.h.sent()["method"], "PUT")
        self.assertEqual(self.h.sent()["body"], '{"model": "beta"}')

    def test_alias_and_profile_in_path(self) -> None:
        """Aliases and C{profile:model} work in the path."""
        self.h.client.request("GET", "/upstream/a1/health")
        self.h.client.request("GET", "/upstream/duo:beta/health")
        self.assertEqual(self.h.supervisor.acquired, ["a1", "duo:beta"])

    def test_bare_id_redirects(self) -> None:
        """C{/upstream/<id>}: 301 for GET/HEAD, 308 otherwise, query kept."""
        response = self.h.client.request("GET", "/upstream/author/model?x=1")
        self.assertEqual(response.status, 301)
        self.assertEqual(response.header("location"), "/upstream/author/model/?x=1")
        response = self.h.client.request("HEAD", "/upstream/alpha")
        self.assertEqual(response.status, 301)
        response = self.h.client.request("POST", "/upstream/alpha", b"{}")
        self.assertEqual(response.status, 308)
        self.assertEqual(response.header("location"), "/upstream/alpha/")
        self.assertEqual(self.h.supervisor.acquired, [])

    def test_head_is_relayed_as_head(self) -> None:
        """HEAD through /upstream reaches the server as HEAD; no body comes back."""
        response = self.h.client.request("HEAD", "/upstream/alpha/health")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.h.sent()["method"], "HEAD")
        self.assertEqual(response.body, b"")

    def test_trailing_slash_reaches_root(self) -> None:
        """C{/upstream/<id>/} is the server's C{/}."""
        self.h.client.request("GET", "/upstream/alpha/")
        self.assertEqual(self.h.sent()["uri"], "/")

    def test_unknown_model(self) -> None:
        """No prefix names a model: 404."""
        response = self.h.client.request("GET", "/upstream/nope/v1/models")
        assert_error(self, response, 404, "not_found")

    def test_ignore_paths_refuse_to_load(self) -> None:
        """A static-file path for a model that is not ready: 409, nothing started."""
        for path in (
            "/upstream/alpha/app.js",
            "/upstream/a1/x/style.CSS.css",
            "/upstream/alpha/f%2Ejson",
        ):
            response = self.h.client.request("GET", path)
            message = assert_error(self, response, 409, "conflict")
            self.assertEqual(
                message, "model alpha is not loaded; path matches upstream.ignorePaths"
            )
        self.assertEqual(self.h.supervisor.acquired, [])
        self.h.client.request("GET", "/upstream/alpha/v1/models?x=.js")  # the query is not the path
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])
        self.h.supervisor.states["alpha"] = "ready"
        response = self.h.client.request("GET", "/upstream/alpha/app.js?v=1")
        self.assertEqual(response.status, 200)
        self.assertEqual(self.h.sent()["uri"], "/app.js?v=1")
        self.h.supervisor.states["alpha"] = "starting"
        assert_error(self, self.h.client.request("GET", "/upstream/alpha/app.js"), 409, "conflict")

    def test_ignore_paths_configured(self) -> None:
        """C{upstream.ignorePaths} replaces the default; C{[]} turns the check off."""
        import re

        h = ResourceTreeHarness(upstream_ignore_paths=(re.compile("^/slots"),))
        assert_error(self, h.client.request("GET", "/upstream/beta/slots/0"), 409, "conflict")
        self.assertEqual(h.client.request("GET", "/upstream/beta/app.js").status, 200)
        h = ResourceTreeHarness(upstream_ignore_paths=())
        self.assertEqual(h.client.request("GET", "/upstream/beta/app.js").status, 200)

    def test_index(self) -> None:
        """C{/upstream} lists listed models as JSON, or as HTML links for browsers."""
        response = self.h.client.request("GET", "/upstream")
        ids = [m["id"] for m in response.json()["data"]]
        self.assertEqual(ids, ["alpha", "author", "author/model", "beta"])
        response = self.h.client.request("GET", "/upstream/", headers={"Accept": "text/html"})
        self.assertEqual(response.header("content-type"), "text/html; charset=utf-8")
        self.assertIn(b'<a href="/upstream/author/model/">', response.body)
        self.assertNotIn(b"hidden", response.body)


class ModelListTests(SynchronousTestCase):
    def test_sorted_unlisted_hidden(self) -> None:
        """C{/v1/models}: OpenAI list, sorted by id, unlisted models absent."""
        h = ResourceTreeHarness()
        body = h.client.request("GET", "/v1/models").json()
        self.assertEqual(body["object"], "list")
        self.assertEqual(
            [m["id"] for m in body["data"]], ["alpha", "author", "author/model", "beta"]
        )
        first = body["data"][0]
        self.assertEqual(first["object"], "model")
        self.assertEqual(first["owned_by"], "llama-swap")
        self.assertEqual(first["created"], 1_700_000_000)
        self.assertEqual(first["name"], "Alpha")
        self.assertEqual(first["description"], "the first")
        self.assertEqual(first["meta"]["llamaswap"]["family"], "test")
        self.assertNotIn("name", body["data"][1])
        self.assertEqual(h.client.request("GET", "/models").json()["data"], body["data"])
        # ... but still routable.
        self.assertEqual(post_json(h.client, "/v1/completions", {"model": "hidden"}).status, 200)

    def test_aliases_included_on_request(self) -> None:
        """C{includeAliasesInList} adds a record per alias, pointing at its model."""
        h = ResourceTreeHarness(include_aliases_in_list=True)
        data = h.client.request("GET", "/v1/models").json()["data"]
        ids = [m["id"] for m in data]
        self.assertEqual(ids, ["a1", "a2", "alpha", "author", "author/model", "beta"])
        self.assertEqual(data[0]["meta"]["llamaswap"]["modelID"], "alpha")
        self.assertEqual(data[0]["meta"]["llamaswap"]["type"], "alias")

    def test_status_and_origin(self) -> None:
        """C{status.value} follows the process state; an allowed C{Origin} is echoed."""
        h = ResourceTreeHarness(security=UI_ORIGIN)
        h.supervisor.states["beta"] = "ready"
        h.supervisor.states["alpha"] = "failed"
        response = h.client.request("GET", "/v1/models", headers={"Origin": "http://ui.test"})
        self.assertEqual(response.header("access-control-allow-origin"), "http://ui.test")
        status = {m["id"]: m["status"]["value"] for m in response.json()["data"]}
        self.assertEqual(status["beta"], "loaded")
        self.assertEqual(status["alpha"], "unloaded")
        self.assertEqual(h.supervisor.acquired, [])  # listing starts nothing

    def test_one_model(self) -> None:
        """C{/v1/models/<id>} answers one record (ids with slashes too) or 404."""
        h = ResourceTreeHarness()
        self.assertEqual(
            h.client.request("GET", "/v1/models/author/model").json()["id"], "author/model"
        )
        assert_error(self, h.client.request("GET", "/v1/models/hidden"), 404, "not_found")


class ManagementTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ResourceTreeHarness()

    def test_health(self) -> None:
        """C{/health} is a plain C{OK}."""
        response = self.h.client.request("GET", "/health")
        self.assertEqual((response.status, response.body), (200, b"OK"))

    def test_head_on_get_routes(self) -> None:
        """HEAD on a GET route answers its headers (and length) without a body."""
        response = self.h.client.request("HEAD", "/health")
        self.assertEqual((response.status, response.header("content-length")), (200, "2"))
        raw = self.h.client.start("HEAD", "/health").transport.value()
        self.assertTrue(raw.endswith(b"\r\n\r\n"), raw)  # headers only

    def test_running(self) -> None:
        """
        C{/running} lists models whose process exists, sorted; with their
        command for a local client (no keys: a remote one does not see it).
        """
        self.assertEqual(self.h.client.request("GET", "/running").json(), {"running": []})
        self.h.supervisor.states.update(beta="starting", alpha="ready", author="failed")
        running = self.h.client.request("GET", "/running").json()["running"]
        self.assertEqual(
            [(r["model"], r["state"]) for r in running], [("alpha", "ready"), ("beta", "starting")]
        )
        self.assertNotIn("cmd", running[0])
        self.assertEqual(running[0]["proxy"], "http://127.0.0.1:9001")
        self.h.client.peer = "127.0.0.1"
        running = self.h.client.request("GET", "/running").json()["running"]
        self.assertEqual(running[0]["cmd"], "fake --name alpha")

    def test_running_shows_the_queue(self) -> None:
        """
        Each model in C{/running} has C{queued} and C{oldestWait} (seconds, to
        a tenth; null when nothing waits); a model that is not running yet but
        has requests waiting is listed too, so no queued request is invisible.
        """
        supervisor = self.h.supervisor
        supervisor.states.update(alpha="ready", beta="stopped")
        supervisor.queued.update(beta=3)
        supervisor.oldest_wait.update(beta=12.345)
        self.h.client.peer = "127.0.0.1"  # a local client sees the commands
        running = self.h.client.request("GET", "/running").json()["running"]
        self.assertEqual(
            [(r["model"], r["state"], r["queued"], r["oldestWait"]) for r in running],
            [("alpha", "ready", 0, None), ("beta", "stopped", 3, 12.3)],
        )
        # The keys before the queue are all still there.
        self.assertEqual(
            list(running[0]),
            [
                "model",
                "state",
                "cmd",
                "proxy",
                "ttl",
                "name",
                "description",
                "pid",
                "inFlight",
                "ttlRemaining",
                "queued",
                "oldestWait",
            ],
        )
        supervisor.queued.clear()
        supervisor.oldest_wait.clear()
        running = self.h.client.request("GET", "/running").json()["running"]
        self.assertEqual([r["model"] for r in running], ["alpha"])

    def test_unload(self) -> None:
        """Unload all (legacy GET and API POST) and unload one (id or alias)."""
        self.assertEqual(self.h.client.request("GET", "/unload").body, b"OK")
        self.assertEqual(
            self.h.client.request("POST", "/api/models/unload", b"").json(), {"msg": "ok"}
        )
        self.assertEqual(self.h.client.request("POST", "/api/models/unload/a1", b"").body, b"OK")
        self.assertEqual(
            self.h.client.request("POST", "/api/models/unload/author/model", b"").body, b"OK"
        )
        self.assertEqual(self.h.supervisor.unloaded, [None, None, "alpha", "author/model"])
        response = self.h.client.request("POST", "/api/models/unload/nope", b"")
        assert_error(self, response, 404, "not_found")

    def test_load(self) -> None:
        """C{/api/models/load/<id>} answers when the model is ready, then releases it."""
        self.h.supervisor.hold = True
        exchange = self.h.client.start("GET", "/api/models/load/a1")
        self.assertEqual(exchange.transport.value(), b"")
        self.h.supervisor.grant()
        response = exchange.response()
        self.assertEqual(response.json(), {"msg": "ok", "model": "alpha"})
        self.assertEqual(self.h.supervisor.released, ["alpha"])

    def test_load_cancelled_when_client_leaves(self) -> None:
        """A client that leaves while the model loads withdraws the request."""
        self.h.supervisor.hold = True
        exchange = self.h.client.start("POST", "/api/models/load/beta", b"")
        exchange.disconnect()
        self.assertEqual(self.h.supervisor.cancelled, ["beta"])

    def test_root_redirects_to_ui(self) -> None:
        """C{/} redirects to C{/ui/}."""
        response = self.h.client.request("GET", "/")
        self.assertEqual((response.status, response.header("location")), (302, "/ui/"))


class CORSAndAuthTests(SynchronousTestCase):
    def test_preflight_anywhere(self) -> None:
        """
        C{OPTIONS} on any path from an allowed origin: 204 and CORS headers naming
        it, requested names sanitized; no key needed.
        """
        h = ResourceTreeHarness(api_keys=("sekrit",), security=UI_ORIGIN)
        response = h.client.request(
            "OPTIONS",
            "/v1/chat/completions",
            headers={
                "Access-Control-Request-Headers": "content-type, x-custom, bad(name), ",
                "Origin": "http://ui.test",
            },
        )
        self.assertEqual(response.status, 204)
        self.assertEqual(response.header("access-control-allow-origin"), "http://ui.test")
        self.assertEqual(
            response.header("access-control-allow-methods"),
            "GET, POST, PUT, PATCH, DELETE, OPTIONS",
        )
        self.assertEqual(response.header("access-control-allow-headers"), "content-type, x-custom")
        self.assertEqual(response.header("access-control-max-age"), "86400")
        response = h.client.request(
            "OPTIONS", "/no/such/path", headers={"Origin": "http://ui.test"}
        )
        self.assertEqual(response.status, 204)
        self.assertEqual(
            response.header("access-control-allow-headers"),
            "Content-Type, Authorization, Accept, X-Requested-With",
        )

    def test_api_keys(self) -> None:
        """With C{apiKeys}: 401 + C{WWW-Authenticate}; Bearer, Basic and x-api-key accepted."""
        h = ResourceTreeHarness(api_keys=("k1", "sekrit"))
        response = post_json(h.client, "/v1/chat/completions", {"model": "alpha"})
        assert_error(self, response, 401, "unauthorized")
        self.assertEqual(response.header("www-authenticate"), 'Basic realm="llama-swap"')
        assert_error(
            self,
            h.client.request("GET", "/v1/models", headers={"Authorization": "Bearer nope"}),
            401,
            "unauthorized",
        )
        basic = base64.b64encode(b"anyone:sekrit").decode()
        for headers in (
            {"Authorization": "Bearer sekrit"},
            {"Authorization": "bearer k1"},
            {"Authorization": f"Basic {basic}"},
            {"x-api-key": "sekrit"},
        ):
            self.assertEqual(
                h.client.request("GET", "/v1/models", headers=headers).status, 200, headers
            )
        self.assertEqual(h.client.request("GET", "/health").status, 200)
        self.assertEqual(h.supervisor.acquired, [])


class BodyLimitTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ResourceTreeHarness(max_body_size=1024)

    def test_content_length_refused_before_the_body(self) -> None:
        """A too-large Content-Length is answered 413 at once, before any body byte."""
        exchange = self.h.client.open()
        exchange.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n"
        )
        response = exchange.response()
        assert_error(self, response, 413, "request_too_large")
        self.assertEqual(response.header("connection"), "close")
        self.assertNotIn(b"100 Continue", exchange.transport.value())
        exchange.send(b"x" * 65536)  # the client keeps sending: discarded
        self.assertEqual(self.h.supervisor.acquired, [])
        self.assertFalse(exchange.transport.disconnecting)
        self.h.clock.advance(REFUSED_BODY_LINGER)
        self.assertTrue(exchange.transport.disconnecting)  # aborted after the linger

    def test_chunked_body_refused_while_reading(self) -> None:
        """A chunked body is refused as soon as it passes the limit."""
        exchange = self.h.client.open()
        exchange.send(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        exchange.send(b"200\r\n" + b"a" * 512 + b"\r\n")
        self.assertEqual(exchange.transport.value(), b"")
        exchange.send(b"400\r\n" + b"a" * 1024 + b"\r\n")
        assert_error(self, exchange.response(), 413, "request_too_large")
        exchange.send(b"0\r\n\r\n")  # it ends during the linger: close now
        self.assertTrue(exchange.transport.disconnecting)
        self.assertEqual(self.h.supervisor.acquired, [])

    def test_within_limit(self) -> None:
        """A body at the limit is accepted (chunked bodies reach upstream de-chunked)."""
        body = json.dumps({"model": "alpha", "p": "x" * 990}).encode()[:1024]
        body = body[: body.rindex(b'"')] + b'"}'
        exchange = self.h.client.open()
        exchange.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
        )
        self.assertEqual(exchange.response().status, 200)
        sent = self.h.sent()
        self.assertEqual(sent["headers"]["content-length"], [str(len(body))])
        self.assertNotIn("transfer-encoding", sent["headers"])


class Exploding(JSONResource):
    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        raise RuntimeError("kaboom")


class PlainTwisted(Resource):
    """A stock twisted.web resource: no render_POST, default getChild."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        return b"plain"


class NoHTMLTests(SynchronousTestCase):
    def test_exception_is_json_500(self) -> None:
        """An exception in render is a JSON 500 (and logged), never a traceback page."""
        h = ResourceTreeHarness()
        mount(h.root, "/boom", Exploding())  # type: ignore[arg-type]
        response = h.client.request("GET", "/boom")
        assert_error(self, response, 500, "internal_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stock_resource_405_is_json(self) -> None:
        """Even a stock resource's "method not allowed" is answered as JSON."""
        h = ResourceTreeHarness()
        mount(h.root, "/plain", PlainTwisted())  # type: ignore[arg-type]
        self.assertEqual(h.client.request("GET", "/plain").body, b"plain")
        response = h.client.request("POST", "/plain", b"")
        assert_error(self, response, 405, "method_not_allowed")

    def test_unknown_and_lowercase_methods_are_501(self) -> None:
        """
        HTTP methods are case-sensitive: C{get /v1/models} is not a GET. It,
        and methods nobody implements, are JSON 501s on every route, with a
        hint for a lower-case spelling; nothing is relayed or started.
        """
        h = ResourceTreeHarness()
        for method, path in (
            ("get", "/v1/models"),
            ("get", "/health"),
            ("post", "/v1/chat/completions"),
            ("options", "/v1/models"),
            ("get", "/upstream/alpha/health"),
            ("BREW", "/v1/models"),
            ("TRACE", "/upstream/alpha/"),
        ):
            response = h.client.request(method, path, b'{"model": "alpha"}')
            message = assert_error(self, response, 501, "not_implemented")
            self.assertTrue(message.startswith(f"method {method} not implemented"), message)
            if method.islower():
                self.assertIn(f"case-sensitive: {method.upper()}", message)
        self.assertEqual(h.supervisor.acquired, [])
        self.assertEqual(h.client.request("GET", "/v1/models").status, 200)

    def test_unknown_paths(self) -> None:
        """Unknown paths at every level are JSON 404s."""
        h = ResourceTreeHarness()
        for path in ("/nope", "/v1", "/v1/nope", "/v1/chat", "/api/models", "/api/x/y"):
            assert_error(self, h.client.request("GET", path), 404, "not_found")


class RequestLogTests(SynchronousTestCase):
    def test_request_events_and_log_line(self) -> None:
        """Each proxied request publishes one event and (logRequests) logs one line."""
        h = ResourceTreeHarness()
        h.client.site.log_requests = True
        seen = events_of(h.events, "request")
        lines: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "llamaswap.http":
                lines.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        post_json(h.client, "/v1/chat/completions", {"model": "a1"})
        post_json(h.client, "/v1/chat/completions", {"model": "nope"})
        h.client.request("GET", "/health")
        self.assertEqual(
            [(e["id"], e["method"], e["path"], e["model"], e["status"]) for e in seen],
            [
                (1, "POST", "/v1/chat/completions", "alpha", 200),
                (2, "POST", "/v1/chat/completions", "nope", 404),
            ],
        )
        self.assertGreater(seen[0]["bytes"], 0)
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[0]["log_level"], LogLevel.info)
        self.assertEqual((lines[0]["model"], lines[0]["status"]), ("alpha", 200))
        self.assertEqual(lines[2]["path"], "/health")

    def watch(self) -> tuple[ResourceTreeHarness, list[dict[str, Any]]]:
        """A harness that logs requests, and the access lines it logs."""
        h = ResourceTreeHarness()
        h.client.site.log_requests = True
        lines: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_namespace") == "llamaswap.http" and "duration" in event:
                lines.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        return h, lines

    def test_ui_files_are_not_proxy_traffic(self) -> None:
        """
        With logRequests, the UI's own files (the page, its scripts, the favicon)
        are logged at debug, not info: a page load does not bury the requests
        logRequests is for. What the UI asks of the API stays at info.
        """
        h, lines = self.watch()
        for method, path in (
            ("GET", "/ui/"),
            ("GET", "/ui/app.js"),
            ("HEAD", "/ui/style.css"),
            ("GET", "/favicon.ico"),
            ("GET", "/v1/models"),
            ("POST", "/api/models/unload"),
        ):
            h.client.request(method, path)
        levels = [(e["method"], e["path"], e["log_level"]) for e in lines]
        self.assertEqual(
            levels,
            [
                ("GET", "/ui/", LogLevel.debug),
                ("GET", "/ui/app.js", LogLevel.debug),
                ("HEAD", "/ui/style.css", LogLevel.debug),
                ("GET", "/favicon.ico", LogLevel.debug),
                ("GET", "/v1/models", LogLevel.info),
                ("POST", "/api/models/unload", LogLevel.info),
            ],
        )
        # Below logLevel debug, no line at all for them.
        h.client.site.log_debug = False
        del lines[:]
        h.client.request("GET", "/ui/app.js")
        h.client.request("GET", "/health")
        self.assertEqual([e["path"] for e in lines], ["/health"])

    def test_endless_stream_left_by_its_client_is_200(self) -> None:
        """
        A non-proxied stream (C{/logs/stream}) ends only when its client
        leaves: that is its normal end, logged 200 (not 499), with no event.
        """
        h, lines = self.watch()
        seen = events_of(h.events, "request")
        exchange = h.client.start("GET", "/logs/stream")
        self.assertEqual(exchange.response().status, 200)
        exchange.disconnect()
        self.assertEqual([(e["path"], e["status"]) for e in lines], [("/logs/stream", 200)])
        self.assertEqual(seen, [])

    def test_response_cut_by_us_is_500(self) -> None:
        """
        A resource failing after its status line went out: the connection is
        cut (never a clean-looking end) and the line says 500, not 200 or 499.
        """
        h, lines = self.watch()
        mount(h.root, "/half", HalfThenBoom())  # type: ignore[arg-type]
        exchange = h.client.start("GET", "/half")
        self.assertTrue(exchange.closed)
        self.assertEqual(exchange.response().status, 200)
        self.assertFalse(exchange.response().complete)
        exchange.disconnect()
        self.assertEqual([(e["path"], e["status"], e["bytes"]) for e in lines], [("/half", 500, 4)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)


class HalfThenBoom(JSONResource):
    """Starts a streamed answer, then fails."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.write(b"half")
        raise RuntimeError("kaboom")


class PeerTests(SynchronousTestCase):
    """Peers' models: relayed to the peer's URL without a lease, listed in /v1/models."""

    def setUp(self) -> None:
        self.h = ResourceTreeHarness(PEER_CONFIG)

    def test_qualified_name_is_relayed(self) -> None:
        """The peer gets the same path and query under its URL, its own name and its key."""
        response = post_json(
            self.h.client,
            "/v1/chat/completions?x=1",
            {"model": "remote/llama", "stream": False},
            Authorization="Bearer client-key",
            **{"x-api-key": "client-key"},
        )
        self.assertEqual(response.status, 200, response.body)
        sent = self.h.sent()
        self.assertEqual(sent["uri"], "/base/v1/chat/completions?x=1")
        self.assertEqual(sent["headers"]["host"], ["peer.test:8080"])
        body = json.loads(sent["body"])
        self.assertEqual(body, {"model": "llama", "stream": False, "temperature": 0.25})
        self.assertEqual(sent["headers"]["content-length"], [str(len(sent["body"]))])
        self.assertEqual(sent["headers"]["authorization"], ["Bearer sk-peer"])
        self.assertEqual(sent["headers"]["x-api-key"], ["sk-peer"])
        # No local process is involved.
        self.assertEqual((self.h.supervisor.acquired, self.h.supervisor.released), ([], []))

    def test_bare_name_and_no_key(self) -> None:
        """A bare name one peer lists goes there; without apiKey no credential is sent."""
        response = post_json(
            self.h.client, "/v1/completions", {"model": "small"}, Authorization="Bearer mine"
        )
        self.assertEqual(response.status, 200, response.body)
        sent = self.h.sent()
        self.assertEqual(sent["headers"]["host"], ["open.test"])
        self.assertEqual(sent["uri"], "/v1/completions")
        self.assertEqual(json.loads(sent["body"]), {"model": "small"})
        self.assertNotIn("authorization", sent["headers"])
        self.assertNotIn("x-api-key", sent["headers"])

    def test_local_names_win(self) -> None:
        """A local model id shadows the bare name a peer lists; ambiguity is a 404."""
        post_json(self.h.client, "/v1/completions", {"model": "alpha"})
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])
        self.assertEqual(self.h.sent()["headers"]["host"], ["127.0.0.1:9001"])
        post_json(self.h.client, "/v1/completions", {"model": "remote/alpha"})
        self.assertEqual(self.h.sent()["headers"]["host"], ["peer.test:8080"])
        self.assertEqual(self.h.supervisor.acquired, ["alpha"])
        message = assert_error(
            self,
            post_json(self.h.client, "/v1/completions", {"model": "llama"}),
            404,
            "not_found",
        )
        self.assertEqual(
            message, "model llama is served by several peers; ask for remote/llama, open/llama"
        )
        self.assertEqual(len(self.h.upstream.requests), 2)

    def test_model_names_with_slashes_and_query_routes(self) -> None:
        """C{remote/org/big} is the peer's C{org/big}; C{?model=} routes reach peers too."""
        post_json(self.h.client, "/v1/embeddings", {"model": "remote/org/big"})
        self.assertEqual(json.loads(self.h.sent()["body"])["model"], "org/big")
        response = self.h.client.request("GET", "/v1/audio/voices?model=open/small")
        self.assertEqual(response.status, 200, response.body)
        self.assertEqual(self.h.sent()["uri"], "/v1/audio/voices?model=open/small")
        self.assertEqual(self.h.sent()["headers"]["host"], ["open.test"])

    def test_listed(self) -> None:
        """/v1/models lists C{<peer>/<model>} owned by the peer, typed C{peer}."""
        data = self.h.client.request("GET", "/v1/models").json()["data"]
        self.assertEqual(
            [m["id"] for m in data],
            [
                "alpha",
                "author",
                "author/model",
                "beta",
                "open/llama",
                "open/small",
                "remote/alpha",
                "remote/llama",
                "remote/org/big",
            ],
        )
        record = next(m for m in data if m["id"] == "remote/org/big")
        self.assertEqual(
            record,
            {
                "id": "remote/org/big",
                "object": "model",
                "created": 1_700_000_000,
                "owned_by": "remote",
                "meta": {"llamaswap": {"type": "peer", "peerID": "remote", "model": "org/big"}},
            },
        )
        one = self.h.client.request("GET", "/v1/models/open/small").json()
        self.assertEqual(one["owned_by"], "open")

    def test_errors_and_events(self) -> None:
        """Peer answers pass through as they are; each request is one event named by FQN."""
        seen = events_of(self.h.events, "request")
        self.h.upstream.status = 503
        self.h.upstream.answer = b'{"error": "busy"}'
        response = post_json(self.h.client, "/v1/chat/completions", {"model": "remote/llama"})
        self.assertEqual((response.status, response.body), (503, b'{"error": "busy"}'))
        self.assertEqual([(e["model"], e["status"]) for e in seen], [("remote/llama", 503)])

    def test_event_target(self) -> None:
        """
        The request event names what the name resolved to (C{target}): the
        model's id, the peer's qualified name, or "" when it matched nothing.
        """
        seen = events_of(self.h.events, "request")
        for name in ("a1", "small", "nope"):
            post_json(self.h.client, "/v1/chat/completions", {"model": name})
        self.h.client.request("GET", "/upstream/a2/health")
        self.assertEqual(
            [(e["model"], e["target"]) for e in seen],
            [("alpha", "alpha"), ("open/small", "open/small"), ("nope", ""), ("alpha", "alpha")],
        )

    def test_not_on_upstream_routes(self) -> None:
        """C{/upstream} reaches local models only: a peer's model there is a 404."""
        response = self.h.client.request("GET", "/upstream/remote/llama/health")
        assert_error(self, response, 404, "not_found")
