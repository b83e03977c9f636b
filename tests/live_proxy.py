# -*- test-case-name: tests.test_http_integration,tests.test_reliability,tests.test_metrics -*-
"""
The whole service (C{build_service}) running on C{tcp:0} in the test's reactor,
with real fake-upstream children: L{Proxy} talks to it through treq,
L{RunningProxy} records every child it spawns and checks that none survives.
"""

from __future__ import annotations

import json
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from llamaswap.config import Config
from llamaswap.http import make_http
from llamaswap.tap import LlamaSwapService, build_service
from tests.fakeserver_helper import upstream_port
from tests.proctools import command, our_children, proc_stat, record_spawns, sleep, survivors


class Proxy:
    """A running llamaswap (tests call L{start} and register its stop)."""

    def __init__(self, case: TestCase, config: Config) -> None:
        self.config = config
        self.service: LlamaSwapService = build_service(
            config, reactor=reactor, listen="tcp:0:interface=127.0.0.1"
        )
        self.service.startService()
        case.addCleanup(self.service.stopService)  # waits until every child is reaped
        assert self.service.http.port is not None
        self.port = self.service.http.port.getHost().port
        self.base = f"http://127.0.0.1:{self.port}"
        self.http, pool = make_http(reactor)
        case.addCleanup(pool.closeCachedConnections)

    def upstream_port(self, model: str) -> int:
        return upstream_port(self.config, model)

    async def call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request through treq; the whole answer."""
        response = await self.http.request(
            method,
            self.base + path,
            data=body,
            headers={k: [v] for k, v in (headers or {}).items()},
            unbuffered=True,
            allow_redirects=False,
        )
        content = await response.content()
        found = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return response.code, found, content

    async def post_json(self, path: str, obj: Any) -> tuple[int, dict[str, str], Any]:
        status, headers, body = await self.call(
            "POST", path, json.dumps(obj).encode(), {"Content-Type": "application/json"}
        )
        return status, headers, json.loads(body) if body else None


class RunningProxy:
    """
    The whole service on C{tcp:0}, plus the pid of every child it spawned
    (recorded at the reactor's C{spawnProcess}: a server that dies while
    starting never shows its pid anywhere else).

    The test's cleanup stops it (and waits for every child to be reaped);
    L{stop} does it earlier, so the test can look for survivors.
    """

    def __init__(self, case: TestCase, config: Config) -> None:
        self.config = config
        self.pids = record_spawns(case)
        self.children_before = our_children()
        self.service: LlamaSwapService = build_service(
            config, reactor=reactor, listen="tcp:0:interface=127.0.0.1"
        )
        self.service.startService()
        self._stopped: Deferred[None] | None = None
        case.addCleanup(self.stop)
        assert self.service.http.port is not None
        self.port: int = self.service.http.port.getHost().port  # type: ignore[attr-defined]

    def stop(self) -> Deferred[None]:
        if self._stopped is None:
            self._stopped = self.service.stopService()
        return self._stopped

    def pid(self, model: str) -> int:
        pid = self.service.supervisor.status(model).pid
        assert pid is not None, f"{model} has no process"
        return pid

    def states(self) -> dict[str, str]:
        return {s.model_id: s.state for s in self.service.supervisor.statuses()}

    def leaked(self) -> dict[int, str]:
        """Every child (and member of a child's group) still alive, with its command."""
        pids = survivors(self.pids) | (our_children() - self.children_before)
        return {pid: f"{proc_stat(pid)} {command(pid)}" for pid in pids}

    async def stop_and_check(self, case: TestCase) -> None:
        """
        Stop the service and assert that no process it started survives.

        The exec wrapper's orphan guard (see L{llamaswap._session}) is not our
        child: it notices its server is gone and exits on its own, a few
        milliseconds after the service stopped. It gets a short grace.
        """
        await self.stop()
        deadline = time.monotonic() + 3
        while (leaked := self.leaked()) and time.monotonic() < deadline:
            await sleep(0.02)
        case.assertEqual(leaked, {}, "processes survived the proxy's stop")
