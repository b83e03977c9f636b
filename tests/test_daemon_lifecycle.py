"""
The daemon's signals (docs/deployment.md), on a real daemonized C{twistd}:
SIGHUP reloads the config (a broken one changes nothing), SIGTERM lets a
stream in flight finish and then exits, a second SIGTERM stops at once.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

from tests.fakeserver_helper import free_port
from tests.proctools import alive, twistd_env, wait_until
from tests.test_daemon import (
    DaemonCase,
    _Daemon,
    _descendants,
    _run,
    _write_config,
    kill_on_cleanup,
)
from tests.test_shutdown import Stream


class SignalTests(DaemonCase):
    async def start(self, settings: str = "") -> tuple[_Daemon, Path, str]:
        config = _write_config(
            self.folder,
            start_port=free_port(),
            model_options="--token-delay 0.1",
            settings=settings,
        )
        daemon = _Daemon(self.folder)
        kill_on_cleanup(self, daemon)
        launcher = _run(
            daemon.argv(config, "tcp:0:interface=127.0.0.1"), twistd_env(), path=str(self.folder)
        )
        code, _ = await launcher.ended()
        self.assertEqual(code, 0, launcher.output.decode(errors="replace"))
        await wait_until(lambda: "listening on" in daemon.log(), 30, "the listening line")
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+) ", daemon.log())
        assert match is not None, daemon.log()
        return daemon, config, f"http://127.0.0.1:{match.group(1)}"

    async def models(self, base: str) -> list[str]:
        response = await self.http.get(f"{base}/v1/models")
        return [m["id"] for m in json.loads(await response.content())["data"]]

    async def stream(self, base: str, tokens: int) -> Stream:
        body = {
            "model": "X",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "fake_tokens": tokens,
        }
        response = await self.http.post(f"{base}/v1/chat/completions", json=body, unbuffered=True)
        self.assertEqual(response.code, 200)
        stream = Stream()
        response.original.deliverBody(stream)
        await stream.first
        return stream

    async def test_sighup_reloads_and_a_broken_config_changes_nothing(self) -> None:
        daemon, config, base = await self.start()
        pid = daemon.pid()
        text = config.read_text()
        config.write_text(text + "  Y:\n    cmd: ./run.sh --port ${PORT} --name Y\n")
        os.kill(pid, signal.SIGHUP)
        await wait_until(lambda: "config reloaded" in daemon.log(), 20, "the reload line")
        self.assertEqual(sorted(await self.models(base)), ["X", "Y"])
        config.write_text(text + "  Y:\n    cmd: ./run.sh --port ${PORT}\n    ttl: -5\n")
        os.kill(pid, signal.SIGHUP)
        await wait_until(lambda: "config reload (SIGHUP) failed" in daemon.log(), 20, "the error")
        self.assertIn("models.Y.ttl", daemon.log())
        self.assertEqual(sorted(await self.models(base)), ["X", "Y"])
        self.assertTrue(alive(pid))
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: not alive(pid), 30, "the daemon to exit")

    async def test_sigterm_lets_a_stream_finish(self) -> None:
        daemon, _, base = await self.start()
        pid = daemon.pid()
        stream = await self.stream(base, tokens=20)  # 2 s
        children = _descendants(pid)
        os.kill(pid, signal.SIGTERM)
        text = (await stream.done).decode()
        self.assertTrue(text.rstrip().endswith("data: [DONE]"), text[-300:])
        self.assertEqual(text.count("Hello from X"), 20)
        await wait_until(lambda: not alive(pid), 30, "the daemon to exit")
        self.assertEqual([c for c, start in children.items() if alive(c, start)], [])
        self.assertFalse(daemon.pidfile.exists())
        self.assertIn("may finish within 60s", daemon.log())

    async def test_second_sigterm_stops_at_once(self) -> None:
        daemon, _, base = await self.start()
        pid = daemon.pid()
        stream = await self.stream(base, tokens=300)  # 30 s
        os.kill(pid, signal.SIGTERM)
        await wait_until(lambda: "stopping gracefully" in daemon.log(), 10, "the first signal")
        os.kill(pid, signal.SIGTERM)
        text = (await stream.done).decode()
        self.assertIn("shutting down", text)
        self.assertNotIn("[DONE]", text)
        await wait_until(lambda: not alive(pid), 15, "the daemon to exit")
        self.assertIn("SIGTERM again: stopping now", daemon.log())
