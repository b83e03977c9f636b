"""
The security rules on a real port (docs/deployment.md, "Security"): slow
clients are cut (a request head sent a line at a time, a body that stalls),
a foreign Host (DNS rebinding) is refused, and a page on another origin, in a
real headless Chromium, can neither start nor unload a model.
"""

from __future__ import annotations

import random
import socket
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from llamaswap.config import parse_config
from tests.chat_clients import ChatAnswer, ChatClients, gather
from tests.fakeserver_helper import port_block
from tests.live_proxy import RunningProxy
from tests.proctools import sleep

PY = sys.executable


def config_text(security: str = "") -> str:
    return (
        f"{security}"
        f"startPort: {port_block(1)}\n"
        "healthCheckTimeout: 30\n"
        "models:\n"
        "  a:\n"
        f"    cmd: {PY} -m llamaswap.fakeserver --quiet --name a --port ${{PORT}}\n"
    )


def read_all(sock: socket.socket, timeout: float) -> tuple[bytes, float]:
    """Everything until the server closes (or C{timeout}); and when that was."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data, time.monotonic()


class SlowClientTests(TestCase):
    timeout = 60

    def start(self) -> None:
        text = config_text("security: {headerTimeout: 1, bodyTimeout: 1}\n")
        self.proxy = RunningProxy(self, parse_config(text))

    async def test_head_sent_a_line_at_a_time_is_cut(self) -> None:
        """A header line every 0.3 s never idles the connection; the head must be whole in 1 s."""
        self.start()
        port = self.proxy.port

        def slowloris() -> tuple[bytes, float]:
            sock = socket.create_connection(("127.0.0.1", port))
            began = time.monotonic()
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")
            try:
                for i in range(20):
                    time.sleep(0.3)
                    sock.sendall(b"X-Slow-%d: yes\r\n" % i)
            except OSError:
                pass  # closed on us
            data, ended = read_all(sock, 5)
            sock.close()
            return data, ended - began

        data, took = await deferToThread(slowloris)
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data)
        self.assertIn(b"security.headerTimeout", data)
        self.assertLess(took, 5)
        await self.proxy.stop_and_check(self)

    async def test_stalled_body_is_cut_a_slow_one_is_not(self) -> None:
        self.start()
        port = self.proxy.port

        def upload(pause: float, pieces: int) -> bytes:
            sock = socket.create_connection(("127.0.0.1", port))
            body = b'{"model": "a", "messages": [{"role": "user", "content": "hi"}]}'
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n" % len(body)
            )
            step = len(body) // pieces + 1
            try:
                for i in range(0, len(body), step):
                    sock.sendall(body[i : i + step])
                    time.sleep(pause)
            except OSError:
                pass
            data, _ = read_all(sock, 10)
            sock.close()
            return data

        stalled = await deferToThread(upload, 3.0, 2)  # 3 s without a byte
        self.assertTrue(stalled.startswith(b"HTTP/1.1 408"), stalled)
        self.assertIn(b"security.bodyTimeout", stalled)
        slow = await deferToThread(upload, 0.5, 6)  # 3 s in all, but moving
        self.assertTrue(slow.startswith(b"HTTP/1.1 200"), slow[:300])
        await self.proxy.stop_and_check(self)


class RebindingTests(TestCase):
    timeout = 60

    async def test_foreign_host_is_refused_and_starts_nothing(self) -> None:
        proxy = RunningProxy(self, parse_config(config_text()))

        def rebound() -> bytes:
            sock = socket.create_connection(("127.0.0.1", proxy.port))
            body = b'{"model": "a", "messages": []}'
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: rebind.attacker.example:8080\r\n"
                b"Content-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            data, _ = read_all(sock, 10)
            sock.close()
            return data

        data = await deferToThread(rebound)
        self.assertTrue(data.startswith(b"HTTP/1.1 403"), data)
        self.assertIn(b"host not allowed", data)
        await sleep(0.5)
        self.assertEqual(proxy.states(), {"a": "stopped"})
        await proxy.stop_and_check(self)


PAGE = """<!doctype html><meta charset=utf-8><title>evil</title><script>
const proxy = "http://127.0.0.1:%d";
window.results = {};
async function attempt(name, request) {
  try { const r = await request(); window.results[name] = r.type + " " + r.status; }
  catch (e) { window.results[name] = "error"; }
}
(async () => {
  // A "simple" request: no preflight, so the browser sends it; the answer is opaque.
  await attempt("chat", () => fetch(proxy + "/v1/chat/completions", {method: "POST",
    mode: "no-cors", headers: {"Content-Type": "text/plain"},
    body: JSON.stringify({model: "a", messages: [{role: "user", content: "hi"}]})}));
  await attempt("load", () => fetch(proxy + "/api/models/load/a", {mode: "no-cors"}));
  await attempt("unload", () => fetch(proxy + "/unload", {method: "POST", mode: "no-cors"}));
  await attempt("list", () => fetch(proxy + "/v1/models"));
  const img = new Image(); img.src = proxy + "/api/models/load/a?img=1";
  await new Promise((done) => { img.onload = img.onerror = done; });
  window.results.img = "done";
  window.done = true;
})();
</script>"""


class CrossOriginBrowserTests(TestCase):
    timeout = 120

    def setUp(self) -> None:
        from tests import test_ui_browser

        if test_ui_browser.SKIP:
            raise __import__("twisted.trial.unittest").trial.unittest.SkipTest(test_ui_browser.SKIP)

    async def test_a_page_on_another_port_can_neither_start_nor_unload(self) -> None:
        from tests.test_ui_browser import chromium_page

        proxy = RunningProxy(self, parse_config(config_text()))
        unloads: list[str] = []
        proxy.service.events.subscribe(
            lambda kind, data: (
                unloads.append(data["model"])
                if kind == "modelStatus" and data["state"] == "stopping"
                else None
            )
        )
        root = Resource()
        root.putChild(b"", Data((PAGE % proxy.port).encode(), "text/html"))
        page_port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
        self.addCleanup(page_port.stopListening)
        url = f"http://127.0.0.1:{page_port.getHost().port}/"

        def visit() -> dict[str, Any]:
            with chromium_page() as (page, _errors):
                page.goto(url)
                page.wait_for_function("window.done === true")
                results: dict[str, Any] = page.evaluate("window.results")
                return results

        results = await deferToThread(visit)
        await sleep(0.5)
        self.assertEqual(proxy.states(), {"a": "stopped"})  # nothing was started
        self.assertEqual(unloads, [])
        self.assertEqual(results["list"], "error")  # no CORS for a foreign origin
        self.assertEqual(results["chat"], "opaque 0")  # sent, refused, unreadable
        await proxy.stop_and_check(self)


KEYS = """apiKeys:
  - sk-admin
  - {key: sk-team, name: team, models: [a], concurrencyLimit: 2, priority: 5}
groups: {both: {swap: false, members: [a, b]}}
"""


class ScopedKeysUnderLoadTests(TestCase):
    timeout = 120

    async def test_mixed_clients_with_scoped_keys(self) -> None:
        """
        12 clients, streaming and not, two keys: the admin's requests for a and
        b, the team key's for a (never more than 2 at once) and for b (403),
        and team streams whose client hangs up after the first token. Every
        allowed answer is complete and from its model; nothing is left in flight.
        """
        text = config_text(KEYS).replace("--name a", "--name a --tokens 6 --token-delay 0.05")
        text += f"  b:\n    cmd: {PY} -m llamaswap.fakeserver --quiet --name b --port ${{PORT}}\n"
        text = text.replace(
            f"startPort: {text.split('startPort: ')[1].split()[0]}", f"startPort: {port_block(2)}"
        )
        proxy = RunningProxy(self, parse_config(text))
        base = f"http://127.0.0.1:{proxy.port}"
        admin = ChatClients(self, base, headers={"Authorization": "Bearer sk-admin"})
        team = ChatClients(self, base, headers={"Authorization": "Bearer sk-team"})
        supervisor = proxy.service.supervisor
        peak = 0
        done: list[tuple[str, str, ChatAnswer]] = []
        stop = False

        team_key = next(k for k in proxy.config.api_keys if k.name == "team")

        def watch() -> None:
            nonlocal peak
            peak = max(peak, supervisor._key_in_flight[team_key])

        watcher = LoopingCall(watch)
        watcher.start(0.005)
        self.addCleanup(lambda: watcher.running and watcher.stop())

        async def client(who: str, clients: ChatClients, seed: int) -> None:
            pick = random.Random(seed)
            while not stop:
                model = pick.choice("ab")
                done.append((who, model, await clients.chat(model, pick.random() < 0.7)))

        def hang_up(port: int) -> None:
            body = b'{"model": "a", "stream": true, "messages": [{"role": "user", "content": "x"}]}'
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                b"Authorization: Bearer sk-team\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            while b"Hello from a" not in sock.recv(65536):
                pass
            sock.close()

        runners = [client("admin", admin, i) for i in range(4)]
        runners += [client("team", team, 10 + i) for i in range(8)]
        running = Deferred.fromCoroutine(gather(runners))
        for _ in range(3):
            await deferToThread(hang_up, proxy.port)
            await sleep(0.5)
        await sleep(2)
        stop = True
        await running
        watcher.stop()
        refused = [a for who, m, a in done if who == "team" and m == "b"]
        allowed = [(who, m, a) for who, m, a in done if not (who == "team" and m == "b")]
        self.assertTrue(refused)
        self.assertEqual({a.code for a in refused}, {403})
        wrong = [
            (who, m, a)
            for who, m, a in allowed
            if a.code != 200 or not a.complete or a.served_by != m
        ]
        self.assertEqual(wrong, [])
        self.assertLessEqual(peak, 2)
        self.assertEqual(peak, 2)  # the team's requests did overlap, up to the limit
        await sleep(0.3)
        self.assertEqual([s.in_flight for s in supervisor.statuses()], [0, 0])
        self.assertEqual(dict(supervisor._key_in_flight), {k: 0 for k in supervisor._key_in_flight})
        await proxy.stop_and_check(self)
