"""
The web UI in a real headless Chromium, against the real service.

The proxy runs on the trial reactor (two demo models running the package's
fake server); Playwright's synchronous API drives Debian's C{/usr/bin/chromium}
from a worker thread (it must not run on the reactor thread). Skipped only
when Chromium or the Playwright package is missing.
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.trial.unittest import TestCase

from llamaswap.config import Config, parse_config
from llamaswap.events import EventBus
from llamaswap.logs import LogHub
from llamaswap.supervisor import ModelStatus
from llamaswap.tap import build_service
from llamaswap.testing.web import FakeSupervisor, RecordingUpstream, make_config
from llamaswap.web.site import LlamaSwapSite
from llamaswap.web.tree import build_root
from tests.fakeserver_helper import REPO_ROOT, free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 30_000

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    sync_playwright = None

SKIP: str | None = None
if not os.path.exists(CHROMIUM):
    SKIP = f"{CHROMIUM} is not installed (apt-get install chromium)"
elif sync_playwright is None:
    SKIP = "the playwright Python package is not installed (pip install playwright)"


def demo_config(alpha_port: int, beta_port: int) -> str:
    fake = "${PYTHON} -m llamaswap.fakeserver --tokens 3"
    return f"""
logToStdout: proxy
models:
  alpha:
    cmd: {fake} --port {alpha_port} --name alpha
    proxy: http://127.0.0.1:{alpha_port}
    aliases: [first]
    ttl: 120
    description: The first demo model.
  team/beta:
    cmd: {fake} --port {beta_port} --name beta
    proxy: http://127.0.0.1:{beta_port}
    name: Beta
"""


@contextmanager
def chromium_page() -> Iterator[tuple[Page, list[str]]]:
    """A page in headless Chromium, and the JavaScript errors it raises; closed after."""
    assert sync_playwright is not None
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.set_default_timeout(WAIT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page, errors
        finally:
            browser.close()


def row(page: Page, model: str) -> Any:
    return page.locator(f'#models-body tr[data-model="{model}"]')


def drive_browser(base: str, shots: Path) -> dict[str, Any]:
    """
    The user's session, run in a worker thread. Returns what it saw; raises
    (a Playwright TimeoutError) if the page never reaches an expected state.
    """
    seen: dict[str, Any] = {}
    with chromium_page() as (page, errors):
        outside: list[str] = []
        page.on(
            "request",
            lambda r: None if r.url.startswith(base) else outside.append(r.url),
        )

        page.goto(base + "/ui/")
        page.wait_for_selector("#conn.live")
        alpha, beta = row(page, "alpha"), row(page, "team/beta")
        alpha.wait_for()
        beta.wait_for()
        seen["initial"] = [
            alpha.locator(".state").inner_text(),
            beta.locator(".state").inner_text(),
        ]
        seen["aliases"] = alpha.locator(".alias").all_inner_texts()
        seen["ttl_before"] = alpha.locator(".ttl").inner_text()
        seen["memory_column"] = page.locator("th.memory").is_visible()
        page.screenshot(path=str(shots / "1-models.png"))

        # Load: the state goes to ready, live, without reloading the page.
        alpha.locator("button.load").click()
        alpha.locator(".state.state-ready").wait_for()
        seen["ready_unload_enabled"] = alpha.locator("button.unload").is_enabled()
        seen["beta_after_load"] = beta.locator(".state").inner_text()
        page.screenshot(path=str(shots / "2-ready.png"))

        # A request through the proxy shows up on the requests page, tokens included.
        body = json.dumps(
            {"model": "first", "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        request = urllib.request.Request(
            base + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            seen["chat_status"] = response.status
        page.click('nav a[data-page="requests"]')
        first_request = page.locator("#requests-body tr").first
        first_request.wait_for()
        seen["request_row"] = first_request.locator("td").all_inner_texts()
        page.screenshot(path=str(shots / "3-requests.png"))

        # Logs: the model's own output appears on the upstream stream.
        page.click('nav a[data-page="logs"]')
        page.locator(".segmented label", has_text="Upstream").click()
        page.wait_for_function(
            "document.getElementById('log-view').textContent.includes('[alpha] fakeserver alpha')"
        )
        page.select_option("#log-model", "alpha")
        page.fill("#log-filter", "listening on")
        page.wait_for_function("document.getElementById('log-count').textContent === '1 line'")
        seen["filtered_logs"] = page.locator("#log-view").inner_text()
        page.locator(".segmented label", has_text="Proxy").click()
        page.fill("#log-filter", "alpha")
        page.wait_for_function("document.getElementById('log-view').textContent.includes('[INFO]')")
        seen["proxy_logs"] = page.locator("#log-view").inner_text()
        page.screenshot(path=str(shots / "4-logs.png"))

        page.click('nav a[data-page="models"]')
        # The request's lease is released: the TTL countdown runs again and
        # nothing is in flight (read now that nothing else is happening).
        page.wait_for_function(
            "(() => { const r = document.querySelector("
            "'#models-body tr[data-model=\"alpha\"]');"
            " return r.querySelector('.ttl').textContent.endsWith('s left')"
            " && r.querySelector('td.num').textContent === '0'; })()"
        )
        seen["ttl_after"] = alpha.locator(".ttl").inner_text()

        # Unload: back to stopped.
        alpha.locator("button.unload").click()
        alpha.locator(".state.state-stopped").wait_for()
        seen["load_enabled_again"] = alpha.locator("button.load").is_enabled()
        page.screenshot(path=str(shots / "5-stopped.png"))
        seen["page_errors"] = errors
        seen["outside_requests"] = outside
    return seen


def drive_queue_view(
    base: str, shots: Path, empty_queue: Callable[[], None], reload: Callable[[bool], None]
) -> dict[str, Any]:
    """
    The Models page while requests wait (run in a worker thread): what the
    queue column shows, that its wait counts up, and that it empties live
    when L{empty_queue} (called on the reactor thread) drains the queue.
    """
    seen: dict[str, Any] = {}
    with chromium_page() as (page, errors):
        page.goto(base + "/ui/")
        page.wait_for_selector("#conn.live")
        alpha, beta = row(page, "alpha"), row(page, "beta")
        alpha.wait_for()
        seen["queue"] = alpha.locator(".queue").inner_text()
        seen["beta_queue"] = beta.locator(".queue").inner_text()
        seen["summary"] = page.locator("#models-summary").inner_text()
        seen["beta_state"] = beta.locator(".state").inner_text()
        seen["beta_reason"] = beta.locator(".state-reason").inner_text()
        seen["memory_column"] = page.locator("th.memory").is_visible()
        seen["memory"] = [
            alpha.locator(".memory").inner_text(),
            beta.locator(".memory").inner_text(),
        ]
        # The oldest wait counts up between snapshots.
        page.wait_for_function(
            "(() => { const m = document.querySelector("
            "'#models-body tr[data-model=\"alpha\"] .queue').textContent"
            ".match(/oldest (\\d+) s$/);"
            f" return m && Number(m[1]) > {waited_seconds(seen['queue'])}; }})()"
        )
        seen["queue_later"] = alpha.locator(".queue").inner_text()
        page.screenshot(path=str(shots / "6-queue.png"))
        blockingCallFromThread(reactor, empty_queue)
        page.wait_for_function(
            "document.querySelector('#models-body tr[data-model=\"alpha\"] .queue')"
            ".textContent === '—'"
        )
        seen["summary_after"] = page.locator("#models-summary").inner_text()
        # A failed config reload shows a banner until a reload succeeds.
        seen["banner_before"] = page.locator("#config-banner").is_visible()
        blockingCallFromThread(reactor, reload, False)
        page.locator("#config-banner").wait_for(state="visible")
        seen["banner"] = page.locator("#config-banner").inner_text()
        page.screenshot(path=str(shots / "7-config-error.png"))
        blockingCallFromThread(reactor, reload, True)
        page.locator("#config-banner").wait_for(state="hidden")
        seen["page_errors"] = errors
    return seen


def waited_seconds(queue_text: str) -> int:
    """The oldest wait in a queue cell's text (C{3 queued, oldest 12 s}), or -1."""
    found = re.fullmatch(r"\d+ queued, oldest (\d+) s", queue_text)
    return -1 if found is None else int(found[1])


class QueueingSupervisor(FakeSupervisor):
    """
    The fake supervisor, with requests waiting since given times of the real
    clock, and memory admission's figures for the models given some.
    """

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self.since: dict[str, float] = {}
        self.memory: dict[str, dict[str, Any]] = {}

    def status(self, model_id: str) -> ModelStatus:
        status = super().status(model_id)
        if self.memory:
            status = attrs.evolve(status, memory=self.memory.get(model_id, MEMORY_UNKNOWN))
        since = self.since.get(model_id)
        if since is None:
            return status
        return attrs.evolve(status, oldest_wait=reactor.seconds() - since)


MEMORY_UNKNOWN = {"declared": None, "measured": None, "holds": None}


class BrowserUITests(TestCase):
    timeout = 180
    skip = SKIP

    async def test_load_watch_logs_unload(self) -> None:
        """
        In Chromium: /ui/ lists both demo models; Load makes one ready, its
        output appears on the logs page, a proxied request appears on the
        requests page with its tokens, and Unload stops it again.
        """
        config = parse_config(
            demo_config(free_port(), free_port()), base_dir=REPO_ROOT, source="browser-test"
        )
        service = build_service(config, reactor=reactor, listen="tcp:0:interface=127.0.0.1")
        transitions: list[tuple[str, str]] = []
        service.events.subscribe(
            lambda kind, data: (
                transitions.append((data["model"], data["state"]))
                if kind == "modelStatus"
                else None
            )
        )
        service.startService()
        self.addCleanup(service.stopService)
        assert service.http.port is not None
        base = f"http://127.0.0.1:{service.http.port.getHost().port}"
        # Screenshots for a human look: LLAMASWAP_UI_SHOTS=<dir> keeps them.
        shots = Path(os.environ.get("LLAMASWAP_UI_SHOTS") or self.mktemp())
        shots.mkdir(parents=True, exist_ok=True)

        started = time.monotonic()
        seen = await deferToThread(drive_browser, base, shots)
        elapsed = time.monotonic() - started

        self.assertEqual(seen["initial"], ["stopped", "stopped"])
        self.assertEqual(seen["aliases"], ["first"])
        self.assertEqual(seen["ttl_before"], "120s")
        self.assertFalse(seen["memory_column"])  # memory admission is off
        self.assertTrue(seen["ready_unload_enabled"])
        self.assertEqual(seen["beta_after_load"], "stopped")
        self.assertEqual(seen["chat_status"], 200)
        self.assertRegex(seen["ttl_after"], r"^1[01][0-9]s left$|^120s left$")
        # id, time, model, request, status, duration, tokens, bytes
        self.assertEqual(seen["request_row"][2], "alpha")
        self.assertEqual(seen["request_row"][3], "POST /v1/chat/completions")
        self.assertEqual(seen["request_row"][4], "200")
        self.assertRegex(seen["request_row"][6], r"^\d+ / 3$")
        self.assertEqual(
            seen["filtered_logs"].strip().splitlines(),
            [line for line in seen["filtered_logs"].strip().splitlines() if "listening on" in line],
        )
        self.assertIn("[alpha] fakeserver alpha", seen["filtered_logs"])
        self.assertIn("[INFO]", seen["proxy_logs"])
        self.assertTrue(seen["load_enabled_again"])
        self.assertEqual(seen["page_errors"], [])
        self.assertEqual(seen["outside_requests"], [])
        self.assertEqual(
            [state for model, state in transitions if model == "alpha"],
            ["starting", "ready", "stopping", "stopped"],
        )
        self.assertLess(elapsed, 120)

    async def test_models_page_shows_the_queue(self) -> None:
        """
        In Chromium, over the fake supervisor: a model with requests waiting
        shows how many and the oldest wait (which counts up), the summary
        adds them up, a stopping model says why, and the queue column empties
        when a C{queue} event reports the queue drained. With memory
        admission on, the memory column shows what each model holds, was
        measured at and declares.
        """
        config = make_config()
        supervisor = QueueingSupervisor(config)
        events = EventBus()
        root = build_root(
            config,
            supervisor=supervisor,
            logs=LogHub(config, events=events),
            events=events,
            http=StubTreq(RecordingUpstream()),
            reactor=reactor,
        )
        supervisor.states.update(alpha="starting", beta="stopping")
        supervisor.reasons["beta"] = "evict"
        supervisor.queued["alpha"] = 3
        supervisor.since["alpha"] = reactor.seconds() - 12
        gib = 2**30
        supervisor.memory["alpha"] = {
            "declared": {"*": 20 * gib},
            "measured": {"0": 19 * gib + gib // 2},
            "holds": {"0": 19 * gib + gib // 2},
        }
        events.publish("modelStatus", {"model": "beta", "state": "stopping", "reason": "evict"})
        site = LlamaSwapSite(
            root, max_body_size=config.max_body_size, events=events, reactor=reactor
        )
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)

        def empty_queue() -> None:
            supervisor.queued.clear()
            supervisor.since.clear()
            events.publish("queue", {"model": "alpha", "queued": 0})

        shots = Path(os.environ.get("LLAMASWAP_UI_SHOTS") or self.mktemp())
        shots.mkdir(parents=True, exist_ok=True)
        base = f"http://127.0.0.1:{port.getHost().port}"

        def reload(ok: bool) -> None:
            outcome = {"ok": ok, "source": "SIGHUP", "time": 0}
            if not ok:
                outcome["error"] = "models.qwen.ttl: must be >= 0 (or -1 to use globalTTL)"
            events.publish("config", outcome)

        seen = await deferToThread(drive_queue_view, base, shots, empty_queue, reload)

        self.assertRegex(seen["queue"], r"^3 queued, oldest \d+ s$")
        self.assertGreaterEqual(waited_seconds(seen["queue"]), 12)
        self.assertRegex(seen["queue_later"], r"^3 queued, oldest \d+ s$")
        self.assertGreater(waited_seconds(seen["queue_later"]), waited_seconds(seen["queue"]))
        self.assertEqual(seen["beta_queue"], "—")
        self.assertEqual(seen["summary"], "5 models, 0 ready, 3 queued")
        self.assertEqual((seen["beta_state"], seen["beta_reason"]), ("stopping", "making room"))
        self.assertEqual(seen["summary_after"], "5 models, 0 ready")
        self.assertFalse(seen["banner_before"])
        self.assertEqual(
            seen["banner"],
            "Config reload (SIGHUP) failed; the running config is kept: "
            "models.qwen.ttl: must be >= 0 (or -1 to use globalTTL)",
        )
        self.assertTrue(seen["memory_column"])
        self.assertEqual(
            seen["memory"],
            [
                "holds 19.5 GiB on 0 · measured 19.5 GiB on 0 · declared 20.0 GiB",
                "unknown until loaded",
            ],
        )
        self.assertEqual(seen["page_errors"], [])
