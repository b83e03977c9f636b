"""
Reloading under load (docs/deployment.md, "Reloading the configuration"): the
whole service on a real port, its config file rewritten and reloaded 20 times
(models added, removed and changed; through the API and directly) while 16
clients stream from three models. No request fails, and the model whose
settings never change keeps its server.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from llamaswap.config import load_config
from llamaswap.http import make_http
from tests.chat_clients import ChatAnswer, ChatClients, gather
from tests.fakeserver_helper import port_block
from tests.live_proxy import RunningProxy
from tests.proctools import sleep

PY = sys.executable


def config_text(start_port: int, version: int) -> str:
    """
    a never changes; b changes every time (its description, and every third
    time its command); c stays; z<version> comes and goes.
    """
    models = {
        "a": "",
        "b": f"    description: version {version}\n",
        "c": "",
    }
    if version % 3 == 0:
        models["b"] += f"    env: ['VERSION={version}']\n"
    if version % 2 == 1:
        models[f"z{version}"] = ""
    lines = [f"startPort: {start_port}", "healthCheckTimeout: 30", "queue: {minResidency: 0.5}"]
    lines.append(f"groups: {{all: {{swap: false, members: [{', '.join(models)}]}}}}")
    lines.append("models:")
    for name, extra in models.items():
        lines += [
            f"  {name}:",
            f"    cmd: {PY} -m llamaswap.fakeserver --quiet --name {name} --port ${{PORT}}"
            " --tokens 10 --token-delay 0.03 --startup-delay 0.2",
            "    unloadTimeout: 5",
        ]
        if extra:
            lines.append(extra.rstrip("\n"))
    return "\n".join(lines) + "\n"


class ReloadUnderLoadTests(TestCase):
    timeout = 120

    async def test_twenty_reloads_under_load(self) -> None:
        start = port_block(40)
        path = Path(self.mktemp())
        path.write_text(config_text(start, 0))
        self.proxy = RunningProxy(self, load_config(path))
        # RunningProxy builds from a config; the reload reads this file.
        self.proxy.service.config_path = str(path)
        base = f"http://127.0.0.1:{self.proxy.port}"
        clients = ChatClients(self, base)
        http, pool = make_http(reactor)
        self.addCleanup(pool.closeCachedConnections)
        done: list[tuple[str, ChatAnswer]] = []
        stop = False

        async def client(seed: int) -> None:
            pick = random.Random(seed)
            while not stop:
                model = pick.choice("abc")
                done.append((model, await clients.chat(model, stream=pick.random() < 0.8)))

        running = [client(seed) for seed in range(16)]
        runner = Deferred.fromCoroutine(gather(running))
        await sleep(1.0)
        pid_a = self.proxy.pid("a")
        results = []
        for version in range(1, 21):
            path.write_text(config_text(start, version))
            if version % 2:
                response = await http.post(f"{base}/api/config/reload")
                body = json.loads(await response.content())
                self.assertEqual(response.code, 200, body)
                results.append(body["changes"])
            else:
                results.append(self.proxy.service.reload_config("test")["changes"])
            await sleep(0.25)
            self.assertEqual(self.proxy.service.supervisor.status("a").pid, pid_a)
        stop = True
        await runner
        failed = [(m, a) for m, a in done if a.code != 200 or not a.complete or a.served_by != m]
        self.assertEqual(failed, [])
        self.assertGreaterEqual(len(done), 16)  # every client was answered, during the reloads
        self.assertEqual(self.proxy.pid("a"), pid_a)
        self.assertEqual(results[2]["restarted"], ["b"])  # version 3 changed b's env
        self.assertEqual(results[0]["added"], ["z1"])
        self.assertEqual(results[1]["removed"], ["z1"])
        self.assertTrue(all("a" not in names for r in results for names in r.values()))
        await self.proxy.stop_and_check(self)

    async def test_invalid_config_changes_nothing(self) -> None:
        """The API answers 400 with the one-line error; the models and the file's old state stay."""
        start = port_block(4)
        path = Path(self.mktemp())
        path.write_text(config_text(start, 0))
        self.proxy = RunningProxy(self, load_config(path))
        self.proxy.service.config_path = str(path)
        seen: list[dict[str, object]] = []
        self.proxy.service.events.subscribe(
            lambda kind, data: seen.append(data) if kind == "config" else None
        )
        http, pool = make_http(reactor)
        self.addCleanup(pool.closeCachedConnections)
        base = f"http://127.0.0.1:{self.proxy.port}"
        path.write_text(config_text(start, 0).replace("unloadTimeout: 5", "unloadTimeout: -1", 1))
        response = await http.post(f"{base}/api/config/reload")
        error = json.loads(await response.content())["error"]
        self.assertEqual(response.code, 400)
        self.assertEqual(error["code"], "invalid_config")
        self.assertEqual(
            error["message"], "config not reloaded: models.a.unloadTimeout: must be >= 0"
        )
        self.assertEqual(
            seen,
            [
                {
                    "ok": False,
                    "source": "api",
                    "time": seen[0]["time"],
                    "error": "models.a.unloadTimeout: must be >= 0",
                }
            ],
        )
        response = await http.get(f"{base}/v1/models")
        ids = [m["id"] for m in json.loads(await response.content())["data"]]
        self.assertEqual(sorted(ids), ["a", "b", "c"])
        response = await http.get(f"{base}/api/config/reload")
        self.assertEqual(response.code, 405)
        await response.content()
        await self.proxy.stop_and_check(self)
