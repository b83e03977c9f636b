"""
The security rules on a real port (docs/deployment.md, "Security"): slow
clients are cut (a request head sent a line at a time, a body that stalls),
a foreign Host (DNS rebinding) is refused, and a page on another origin, in a
real headless Chromium, can neither start nor unload a model.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.static import Data

from llamaswap.config import parse_config
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
