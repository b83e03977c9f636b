"""
Safe by default on a workstation (docs/deployment.md, "Security"): the Host and
browser-origin checks, scoped API keys, no commands shown to whom should not
see them; on the resource tree over a fake supervisor. A refused request
starts nothing and unloads nothing.
"""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config
from llamaswap.config.schema import ApiKey, SecurityConfig
from llamaswap.testing.web import CONFIG, Response, post_json
from tests.resource_tree import ResourceTreeHarness

CHAT = {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]}


def assert_refused(case: SynchronousTestCase, response: Response, status: int, text: str) -> None:
    case.assertEqual(response.status, status, response.body)
    error = response.json()["error"]
    case.assertIn(text, error["message"])
    case.assertEqual(error["code"], {401: "unauthorized", 403: "forbidden"}[status])


class HostTests(SynchronousTestCase):
    def host(self, host: str, security: SecurityConfig | None = None) -> Response:
        h = ResourceTreeHarness(security=security or SecurityConfig())
        self.h = h
        return h.client.request("GET", "/v1/models", headers={"Host": host})

    def test_local_names_and_addresses(self) -> None:
        for host in (
            "localhost:8080",
            "127.0.0.1:8080",
            "[::1]:8080",
            "192.168.1.20",
            "a.localhost",
        ):
            self.assertEqual(self.host(host).status, 200, host)

    def test_rebinding_name_is_refused(self) -> None:
        """A page whose DNS name now points at 127.0.0.1 sends its own Host: 403, nothing runs."""
        h = ResourceTreeHarness()
        response = h.client.request(
            "POST", "/v1/chat/completions", b"{}", headers={"Host": "attacker.example:8080"}
        )
        assert_refused(self, response, 403, "host not allowed: attacker.example:8080")
        self.assertEqual(h.supervisor.acquired, [])

    def test_allowed_hosts(self) -> None:
        allowed = SecurityConfig(allowed_hosts=("llm.lan", "*.corp.example"))
        self.assertEqual(self.host("llm.lan:8080", allowed).status, 200)
        self.assertEqual(self.host("gpu.corp.example", allowed).status, 200)
        self.assertEqual(self.host("other.example", allowed).status, 403)
        self.assertEqual(self.host("anything", SecurityConfig(allowed_hosts=("*",))).status, 200)

    def test_the_name_we_listen_on(self) -> None:
        """--listen tcp:8080:interface=llm.lan: llm.lan is answered to."""
        from twisted.web.test.requesthelper import DummyRequest

        from llamaswap.testing.web import make_config
        from llamaswap.web.guard import Guard

        request = DummyRequest([b""])
        request.requestHeaders.setRawHeaders(b"host", [b"llm.lan:8080"])
        self.assertTrue(Guard(make_config(), hosts=("llm.lan",)).host_allowed(request))
        self.assertFalse(Guard(make_config()).host_allowed(request))


class OriginTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ResourceTreeHarness()

    def test_no_origin_is_not_a_browser(self) -> None:
        response = post_json(self.h.client, "/v1/chat/completions", CHAT)
        self.assertEqual(response.status, 200)

    def test_own_ui_is_allowed(self) -> None:
        response = self.h.client.request(
            "POST", "/api/models/unload", headers={"Origin": "http://localhost:8080"}
        )
        self.assertEqual(response.status, 200)
        self.assertIsNone(response.header("access-control-allow-origin"))  # same origin

    def test_simple_cross_origin_post_starts_nothing(self) -> None:
        """A page's text/plain POST (no preflight needed): 403 before any model starts."""
        response = self.h.client.request(
            "POST",
            "/v1/chat/completions",
            b'{"model": "alpha", "messages": []}',
            headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
        )
        assert_refused(self, response, 403, "origin not allowed: http://evil.example")
        self.assertIsNone(response.header("access-control-allow-origin"))
        self.assertEqual(self.h.supervisor.acquired, [])

    def test_other_ports_and_null_are_other_origins(self) -> None:
        for origin in ("http://localhost:3000", "null", "http://127.0.0.1:8080"):
            response = self.h.client.request("GET", "/v1/models", headers={"Origin": origin})
            self.assertEqual(response.status, 403, origin)

    def test_cross_site_get_without_origin(self) -> None:
        """<img src=http://localhost:8080/unload> sends no Origin, but Fetch Metadata tells."""
        for path in ("/unload", "/api/models/load/alpha"):
            response = self.h.client.request(
                "GET", path, headers={"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
            )
            assert_refused(self, response, 403, "origin not allowed")
        response = self.h.client.request("GET", "/ui/", headers={"Sec-Fetch-Site": "same-site"})
        self.assertEqual(response.status, 403)
        self.assertEqual((self.h.supervisor.unloaded, self.h.supervisor.acquired), ([], []))
        # Typed in the address bar or a bookmark: the user's own doing.
        response = self.h.client.request("GET", "/running", headers={"Sec-Fetch-Site": "none"})
        self.assertEqual(response.status, 200)

    def test_allowed_origins_get_cors(self) -> None:
        h = ResourceTreeHarness(security=SecurityConfig(allowed_origins=("http://chat.lan:3000",)))
        response = post_json(h.client, "/v1/chat/completions", CHAT, Origin="http://chat.lan:3000")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header("access-control-allow-origin"), "http://chat.lan:3000")
        preflight = h.client.request(
            "OPTIONS", "/v1/chat/completions", headers={"Origin": "http://other.lan"}
        )
        self.assertEqual(preflight.status, 403)
        anyone = ResourceTreeHarness(security=SecurityConfig(allowed_origins=("*",)))
        response = anyone.client.request("GET", "/v1/models", headers={"Origin": "http://x.test"})
        self.assertEqual(response.header("access-control-allow-origin"), "http://x.test")

    def test_unload_accepts_post(self) -> None:
        self.assertEqual(self.h.client.request("POST", "/unload").status, 200)
        self.assertEqual(self.h.supervisor.unloaded, [None])


KEYS = (
    ApiKey(key="sk-admin"),
    ApiKey(key="sk-team", name="team", models=("alpha", "author/*"), access="inference"),
    ApiKey(key="sk-ro", name="reader", access="read"),
    ApiKey(key="sk-noload", name="batch", load=False, access="inference"),
)


class KeyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = ResourceTreeHarness(api_keys=KEYS)

    def get(self, path: str, key: str | None) -> Response:
        headers = {} if key is None else {"Authorization": f"Bearer {key}"}
        return self.h.client.request("GET", path, headers=headers)

    def chat(self, model: str, key: str) -> Response:
        body = {**CHAT, "model": model}
        return post_json(self.h.client, "/v1/chat/completions", body, Authorization=f"Bearer {key}")

    def test_no_key_and_wrong_key(self) -> None:
        for key in (None, "sk-nope"):
            response = self.get("/v1/models", key)
            assert_refused(self, response, 401, "invalid or missing API key")
            self.assertEqual(response.header("www-authenticate"), 'Basic realm="llama-swap"')

    def test_models_outside_the_key(self) -> None:
        self.assertEqual(self.chat("alpha", "sk-team").status, 200)
        self.assertEqual(self.chat("a1", "sk-team").status, 200)  # an alias of alpha
        response = self.chat("beta", "sk-team")
        assert_refused(self, response, 403, "this API key may not use model beta")
        self.assertEqual(self.h.supervisor.acquired, ["alpha", "a1"])
        listed = [m["id"] for m in self.get("/v1/models", "sk-team").json()["data"]]
        self.assertEqual(listed, ["alpha", "author/model"])

    def test_key_that_may_not_load(self) -> None:
        response = self.chat("alpha", "sk-noload")
        assert_refused(self, response, 403, "model alpha is not loaded, and this API key may not")
        self.h.supervisor.states["alpha"] = "ready"
        self.assertEqual(self.chat("alpha", "sk-noload").status, 200)

    def test_access_levels(self) -> None:
        """Each route's level (docs/api.md): inference < read (+ /running) < admin."""
        table = {
            "/v1/models": (200, 200, 200),
            "/running": (403, 200, 200),
            "/ui/": (403, 403, 200),
            "/logs": (403, 403, 200),
            "/metrics": (403, 403, 200),
            "/api/events": (403, 403, None),  # a stream: not read here
            "/health": (200, 200, 200),
        }
        for path, expected in table.items():
            for key, status in zip(("sk-team", "sk-ro", "sk-admin"), expected, strict=True):
                if status is not None:
                    self.assertEqual(self.get(path, key).status, status, (path, key))
        for path in ("/unload", "/api/models/unload", "/api/config/reload"):
            response = self.h.client.request(
                "POST", path, headers={"Authorization": "Bearer sk-ro"}
            )
            assert_refused(self, response, 403, "(it needs access: admin)")
        self.assertEqual(self.h.supervisor.unloaded, [])

    def test_commands_only_for_admin(self) -> None:
        self.h.supervisor.states["alpha"] = "ready"
        reader = self.get("/running", "sk-ro").json()["running"][0]
        admin = self.get("/running", "sk-admin").json()["running"][0]
        self.assertNotIn("cmd", reader)
        self.assertEqual(admin["cmd"], "fake --name alpha")


class KeyConfigTests(SynchronousTestCase):
    def test_scoped_keys_from_env_and_file(self) -> None:
        folder = self.mktemp()
        os.makedirs(folder)
        with open(os.path.join(folder, "ci.key"), "w") as f:
            f.write("sk-from-file\n")
        config = parse_config(
            "apiKeys:\n"
            "  - plain\n"
            "  - {key: '${env.TEAM}', name: team, models: [qwen*], load: false, access: read,"
            " concurrencyLimit: 2, priority: 5}\n"
            "  - {keyFile: ci.key, name: ci}\n" + CONFIG,
            base_dir=folder,
            environ={"TEAM": "sk-team"},
        )
        plain, team, ci = config.api_keys
        self.assertEqual((plain.key, plain.access, plain.models), ("plain", "admin", ("*",)))
        self.assertEqual(
            (team.key, team.models, team.load, team.access, team.concurrency_limit, team.priority),
            ("sk-team", ("qwen*",), False, "read", 2, 5),
        )
        self.assertEqual((ci.key, ci.access), ("sk-from-file", "inference"))
        self.assertNotIn("sk-team", repr(config))  # never in a repr, so never in a log

    def test_errors(self) -> None:
        cases = {
            "apiKeys: [{name: x}]": "apiKeys[0]: give either key or keyFile",
            "apiKeys: [{key: a, access: root}]": "apiKeys[0].access: must be one of",
            "apiKeys: [a, a]": "apiKeys[1]: the same key is listed twice",
            "apiKeys: [{keyFile: /nonexistent.key}]": "apiKeys[0].keyFile: cannot read",
            "security: {allowedOrigins: [evil.example]}": "security.allowedOrigins[0]: an origin",
        }
        for text, message in cases.items():
            with self.assertRaises(ConfigError, msg=text) as e:
                parse_config(text + "\n" + CONFIG)
            self.assertTrue(str(e.exception).startswith(message), str(e.exception))


class SlowHeadTests(SynchronousTestCase):
    def test_bounds_set_by_a_reload_apply(self) -> None:
        """Started without bounds, a reload's headerTimeout cuts a slow head within a second."""
        import attrs

        h = ResourceTreeHarness(security=SecurityConfig(header_timeout=0, body_timeout=0))
        site = h.client.site
        h.client.clock.advance(1_700_000_000)
        site.startFactory()
        self.addCleanup(site.stopFactory)
        exchange = h.client.open()
        exchange.send(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(5):
            h.client.clock.advance(1)
        self.assertEqual(exchange.transport.value(), b"")  # no bound yet
        site.configure(attrs.evolve(h.config, security=SecurityConfig(header_timeout=2)))
        h.client.clock.advance(1)
        self.assertTrue(exchange.transport.value().startswith(b"HTTP/1.1 408"))
