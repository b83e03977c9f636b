"""
Three llamaswap hosts behind the HAProxy front that C{llamaswap haproxy-config}
writes (docs/scale-out.md), all real processes on loopback ports: three
C{twistd llamaswap} with overlapping model sets (fake model servers), the
generator, and C{haproxy -db}.

What a user of the front sees: every answer comes from a host that has the
model; under a mixed load each model stays on one host (each host's model
starts say so); when a host is killed mid-run no request that had not reached
it is lost, its models move to the other hosts and the other models do not
move; a stream's first token comes through at once. The figures (the extra
hop's latency, the failover time, first-token times) go to the test log:
C{grep scale-out _trial_temp/test.log}.

Skipped where HAProxy is not installed (C{apt-get install haproxy}; .ci/run
does it where it can).
"""

from __future__ import annotations

import io
import json
import os
import random
import re
import signal
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import treq
from treq.client import HTTPClient
from twisted.internet import error, reactor
from twisted.logger import Logger
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.chat_clients import ChatAnswer, ChatClients, gather
from tests.fakeserver_helper import free_port, port_block
from tests.proctools import TWISTD, ChildOutput, send_signal, sleep, twistd_env, wait_until
from tests.test_scaleout import HAPROXY

PY = sys.executable
# Which host serves which model: each model on two or three hosts.
HOSTS = {"h1": ("a", "b", "c"), "h2": ("a", "b", "d"), "h3": ("a", "c", "d")}
MODELS = ("a", "b", "c", "d")
ALIASES = {"a-alias": "a"}  # asked for by either name, a stays on one host
NAMES = (*MODELS, *ALIASES)
LOAD = 0.2  # a model server's start-up
TOKENS, TOKEN_DELAY = 10, 0.05  # each answer streams for 0.5 s
CLIENTS = 8
MIXED_SECONDS = 6.0
KILL_AFTER = 1.5  # into the second run
AFTER_KILL_SECONDS = 5.0
_LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+) ")
_RETRIED = re.compile(rb" \d+/\d+/\d+/\d+/\+\d+ ")  # the log's retries field: +N = redispatched


class HostProcess:
    """One C{twistd -n llamaswap} serving fake models, in its own folder."""

    def __init__(self, case: TestCase, folder: Path, name: str, models: tuple[str, ...]) -> None:
        self.name = name
        self.models = models
        folder.mkdir(parents=True)
        lines = [f"startPort: {port_block(len(models))}", "healthCheckTimeout: 30", "models:"]
        for model in models:
            lines += [
                f"  {model}:",
                f"    cmd: {PY} -m llamaswap.fakeserver --quiet --name {name}/{model}"
                f" --port ${{PORT}} --startup-delay {LOAD} --tokens {TOKENS}"
                f" --token-delay {TOKEN_DELAY}",
                "    unloadTimeout: 5",
                f"    aliases: {[n for n, m in ALIASES.items() if m == model]}",
            ]
        config = folder / "config.yaml"
        config.write_text("\n".join(lines) + "\n")
        argv = [*TWISTD, "-n", "--pidfile=", "llamaswap", "--config", str(config)]
        argv += ["--listen", "tcp:0:interface=127.0.0.1"]
        self.child, self.pid = spawn(case, argv, folder, twistd_env())
        self.port = 0

    def kill(self) -> float:
        """SIGKILL, as a crash would; when."""
        send_signal(self.pid, signal.SIGKILL)
        return time.monotonic()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def started(self) -> None:
        await self.child.wait_for(b"llamaswap listening on")
        match = _LISTENING.search(bytes(self.child.output))
        assert match is not None, self.child.text()
        self.port = int(match.group(1))


def spawn(
    case: TestCase, argv: list[str], folder: Path, env: dict[str, str]
) -> tuple[ChildOutput, int]:
    """Start C{argv}; the test's cleanup stops it (TERM, then KILL after 10 s) and waits."""
    child = ChildOutput()
    transport = reactor.spawnProcess(child, argv[0], argv, env=env, path=str(folder))
    pid = transport.pid

    async def stop() -> None:
        if child.done:
            return
        send_signal(pid, signal.SIGTERM)
        kill = reactor.callLater(10, send_signal, pid, signal.SIGKILL)
        await child.ended()
        if kill.active():
            kill.cancel()

    case.addCleanup(stop)
    return child, pid


def serving(model: str) -> list[str]:
    """The hosts that serve C{model}, in order."""
    return [h for h, models in HOSTS.items() if model in models]


def host_of(answer: ChatAnswer) -> str:
    """The host a fake model server runs on: its name is <host>/<model>."""
    assert answer.served_by is not None
    return answer.served_by.split("/")[0]


class Sent:
    """One request of the load: the name it asked for, when it was sent, what came back."""

    def __init__(self, name: str, began: float, answer: ChatAnswer) -> None:
        self.name = name
        self.model = ALIASES.get(name, name)
        self.began = began
        self.answer = answer

    @property
    def ok(self) -> bool:
        a = self.answer
        return a.code == 200 and a.complete and a.model == self.name

    def __repr__(self) -> str:
        return f"<{self.name} at {self.began:.3f}: {self.answer!r}>"


def answered_by(sent: list[Sent]) -> dict[str, set[str]]:
    """The hosts that answered each model."""
    found: dict[str, set[str]] = {m: set() for m in MODELS}
    for s in sent:
        found[s.model].add(host_of(s.answer))
    return found


class ScaleOutTests(TestCase):
    timeout = 120
    log = Logger()

    def setUp(self) -> None:
        if HAPROXY is None:
            raise self.skipTest("haproxy is not installed (apt-get install haproxy)")
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
        self.addCleanup(pool.closeCachedConnections)
        self.http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]
        self.figures: dict[str, Any] = {}

    async def start_front(self) -> dict[str, HostProcess]:
        """The three hosts, the generator run on them, then HAProxy; the front's URL."""
        hosts = {
            name: HostProcess(self, self.folder / name, name, models)
            for name, models in HOSTS.items()
        }
        await gather(h.started() for h in hosts.values())
        front = self.folder / "front"
        port = free_port()
        self.front = f"http://127.0.0.1:{port}"
        argv = [PY, "-c", "from llamaswap.cli import main; main()", "haproxy-config"]
        argv += ["-o", str(front), "--bind", f"127.0.0.1:{port}"]
        argv += [f"{h.name}={h.address}" for h in hosts.values()]
        generator, _ = spawn(self, argv, self.folder, twistd_env())
        self.assertEqual(await generator.ended(), (0, None), generator.text())
        assert HAPROXY is not None
        self.haproxy, self.haproxy_pid = spawn(
            self, [HAPROXY, "-f", str(front / "haproxy.cfg"), "-db"], self.folder, dict(os.environ)
        )
        deadline = time.monotonic() + 10
        while not await self.healthy():
            self.assertLess(time.monotonic(), deadline, self.haproxy.text())
            await sleep(0.05)
        return hosts

    async def healthy(self) -> bool:
        try:
            code, _ = await self.get(f"{self.front}/health")
        except error.ConnectionRefusedError:
            return False
        return code == 200

    async def get(self, url: str) -> tuple[int, bytes]:
        response = await self.http.get(url)
        return response.code, await response.content()

    async def starts(self, host: HostProcess) -> dict[str, int]:
        """How many times C{host} started each of its models (its /metrics)."""
        _, text = await self.get(f"http://{host.address}/metrics")
        found = re.findall(rb'^llamaswap_model_starts_total\{model="(\w+)"\} (\d+)$', text, re.M)
        return {m.decode(): int(n) for m, n in found if int(n)}

    async def stream_times(self, base: str, model: str) -> list[float]:
        """
        A stream of 5 tokens 0.2 s apart: when its first event (the role, sent at
        once) and each token arrived, in seconds after the request was sent.
        """
        body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        body.update(fake_tokens=5, fake_token_delay=0.2)
        began = time.monotonic()
        response = await self.http.post(f"{base}/v1/chat/completions", json=body)
        self.assertEqual(response.code, 200)
        times: list[float] = []
        text = bytearray()

        def chunk(data: bytes) -> None:
            text.extend(data)
            events = text.count(b"\n\ndata: ") + text.startswith(b"data: ")
            times.extend([time.monotonic() - began] * (min(events, 6) - len(times)))

        await treq.collect(response, chunk)
        self.assertEqual(len(times), 6, text)
        return times

    async def run_load(self, clients: ChatClients, seconds: float, seed: int) -> list[Sent]:
        """C{CLIENTS} clients streaming random models (by id or alias) for C{seconds}."""
        done: list[Sent] = []
        deadline = time.monotonic() + seconds

        async def client(pick: random.Random) -> None:
            while time.monotonic() < deadline:
                name = pick.choice(NAMES)
                began = time.monotonic()
                done.append(Sent(name, began, await clients.chat(name, stream=True)))

        await gather(client(random.Random(seed * 100 + i)) for i in range(CLIENTS))
        return done

    def check_hosts(self, sent: list[Sent]) -> None:
        """Every answer is complete, for the model asked, from a host that has it."""
        wrong = [s for s in sent if not s.ok or s.model not in HOSTS[host_of(s.answer)]]
        self.assertEqual(wrong, [])

    async def test_front(self) -> None:
        """
        The union model list; sticky placement under a mixed load; streams that are
        not held back; failover when a host is killed mid-run; the front's own
        answers once no host serves a model.
        """
        hosts = await self.start_front()
        clients = ChatClients(self, self.front)
        code, body = await self.get(f"{self.front}/v1/models")
        self.assertEqual(code, 200)
        listed = {r["id"]: r["meta"]["llamaswap"]["hosts"] for r in json.loads(body)["data"]}
        self.assertEqual(listed, {m: serving(m) for m in MODELS}, body)

        home = await self.check_sticky(clients, hosts)
        await self.check_routes(home)
        model = "b"
        await self.check_streams(f"http://{hosts[home[model]].address}", model)
        victim = max(hosts, key=lambda n: list(home.values()).count(n))  # the busiest
        await self.check_failover(clients, hosts, home, victim)
        second = next(n for n in hosts if n != victim)
        await self.check_no_host_left(clients, hosts[second], {victim, second})
        self.log.info("scale-out figures: {figures}", figures=json.dumps(self.figures))
        await self.stop_all(hosts)

    async def check_sticky(
        self, clients: ChatClients, hosts: dict[str, HostProcess]
    ) -> dict[str, str]:
        """
        Under a mixed load every model is answered by one host, and no host
        started a model that another host answered: the model's host, by model.
        """
        sent = await self.run_load(clients, MIXED_SECONDS, seed=1)
        self.check_hosts(sent)
        placed = answered_by(sent)
        self.assertEqual({m: len(h) for m, h in placed.items()}, dict.fromkeys(MODELS, 1), placed)
        home = {m: next(iter(h)) for m, h in placed.items()}
        starts = {name: await self.starts(h) for name, h in hosts.items()}
        for name, started in starts.items():
            self.assertLessEqual(set(started), {m for m, h in home.items() if h == name}, starts)
        self.figures.update(requests=len(sent), placement=home, starts=starts)
        return home

    async def check_routes(self, home: dict[str, str]) -> None:
        """
        The model is found wherever llamaswap finds it (multipart field, C{?model=},
        C{/upstream/<model>/}, C{/v1/models/<id>}) and goes to its host; other paths
        and bodies too large to read are the front's own JSON errors.
        """
        front = self.front
        routed = {
            "c": await self.http.post(
                f"{front}/v1/audio/transcriptions",
                data={"model": "c"},
                files={"file": ("a.wav", "audio/wav", io.BytesIO(b"RIFF"))},
            ),
            "d": await self.http.get(f"{front}/props?model=d"),
            "b": await self.http.get(f"{front}/upstream/b/v1/models"),
            "a": await self.http.get(f"{front}/v1/models/a"),
        }
        for model, response in routed.items():
            body = await response.content()
            self.assertEqual(response.code, 200, body)
            where = response.headers.getRawHeaders(b"x-llamaswap-host")
            self.assertEqual(where, [home[model].encode()], (model, body))
        code, body = await self.get(f"{front}/running")
        self.assertEqual(code, 404)
        self.assertIn(
            "the llamaswap front serves the model API", json.loads(body)["error"]["message"]
        )
        big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}], "model": "a"}
        response = await self.http.post(f"{front}/v1/chat/completions", json=big)
        problem = json.loads(await response.content())["error"]
        self.assertEqual((response.code, problem["code"]), (413, "request_too_large"))

    async def check_streams(self, direct: str, model: str) -> None:
        """The extra hop's latency, and a stream's events, direct and through the front."""
        self.figures["hop_ms"] = await self.hop_ms(direct, model)
        streams = {"direct": await self.stream_times(direct, model)}
        streams["front"] = await self.stream_times(self.front, model)
        for where, times in streams.items():
            # Each event comes 0.2 s after the one before. Held back (to fill packets),
            # they would come two at a time; one stall of the test's reactor may join two.
            together = [b - a < 0.05 for a, b in pairwise(times)]
            self.assertLessEqual(sum(together), 1, f"{where}: the stream was held back: {times}")
        self.figures["stream_ms"] = {
            w: {"first_event": round(t[0] * 1000, 1), "first_token": round(t[1] * 1000, 1)}
            for w, t in streams.items()
        }

    async def check_failover(
        self,
        clients: ChatClients,
        hosts: dict[str, HostProcess],
        home: dict[str, str],
        victim: str,
    ) -> None:
        """
        C{victim} is killed (SIGKILL) in the middle of a mixed load. Only requests
        that had reached it fail; once the front has taken it out, its models are
        each on one other host that serves it; the other models stay where they were.
        """
        killed: list[float] = []
        marked: list[float] = []
        reactor.callLater(KILL_AFTER, lambda: killed.append(hosts[victim].kill()))
        down = self.haproxy.wait_for(f"/{victim} is DOWN".encode(), len(self.haproxy.output))
        down.addCallback(lambda _: marked.append(time.monotonic()))
        sent = await self.run_load(clients, KILL_AFTER + AFTER_KILL_SECONDS, seed=2)
        await down
        (t_kill,), (t_down,) = killed, marked
        lost = [s for s in sent if not s.ok]
        self.assertEqual([s for s in lost if s.began >= t_kill or home[s.model] != victim], [])
        after = [s for s in sent if s.began >= t_kill]
        self.check_hosts(after)
        # Its models moved, each to one other host, once the front had taken it out (a
        # request caught in the crash may be retried on another host of its model); the
        # other models stayed where they were.
        now = answered_by([s for s in after if s.began >= t_down])
        moved = {m for m, h in home.items() if h == victim}
        for m in MODELS:
            if m in moved:
                self.assertEqual(len(now[m]), 1, now)
                self.assertNotIn(victim, now[m])
            else:
                self.assertEqual(now[m], {home[m]}, now)
        strays = [
            s
            for s in sent
            if s.ok and s.model in moved and host_of(s.answer) not in {victim, *now[s.model]}
        ]
        first_moved = min(s.answer.ended for s in after if s.model in moved)
        self.figures["failover"] = {
            "killed": victim,
            "moved": {m: sorted(now[m]) for m in sorted(moved)},
            "requests": len(sent),
            "lost_in_flight": len(lost),
            "retried_elsewhere": len(strays),
            "marked_down_s": round(t_down - t_kill, 3),
            "first_moved_answer_s": round(first_moved - t_kill, 2),
            "longest_wait_after_kill_s": round(max(s.answer.ended - s.began for s in after), 2),
            "redispatched": len(_RETRIED.findall(bytes(self.haproxy.output))),
        }

    async def check_no_host_left(
        self, clients: ChatClients, second: HostProcess, gone: set[str]
    ) -> None:
        """With a second host killed, the model only those two served is a 503 in JSON."""
        (orphan,) = (m for m in MODELS if set(serving(m)) == gone)
        second.kill()
        await second.child.ended()
        answer = await clients.chat(orphan, stream=False)
        self.assertEqual(answer.code, 503, answer)
        problem = json.loads(answer.body)["error"]
        self.assertEqual(
            (problem["type"], problem["code"]), ("server_error", "service_unavailable")
        )
        self.assertIn(f"no llamaswap host that serves model {orphan} is up", problem["message"])
        answer = await clients.chat("nope", stream=False)
        self.assertEqual(answer.code, 404)
        self.assertEqual(json.loads(answer.body)["error"]["message"], "model not found: nope")
        code, _ = await self.get(f"{self.front}/health")
        self.assertEqual(code, 200)  # one host is left

    async def hop_ms(self, direct: str, model: str) -> dict[str, float]:
        """
        Median times of 40 small answers (the model loaded), direct and through the
        front, taken in turns so that the machine's other work weighs on both alike.
        """
        clients = {"direct": ChatClients(self, direct), "front": ChatClients(self, self.front)}
        times: dict[str, list[float]] = {"direct": [], "front": []}
        for _ in range(40):
            for where, client in clients.items():
                began = time.monotonic()
                answer = await client.chat(model, stream=False)
                self.assertEqual(answer.code, 200)
                times[where].append(answer.ended - began)
        return {w: round(statistics.median(t) * 1000, 2) for w, t in times.items()}

    async def stop_all(self, hosts: dict[str, HostProcess]) -> None:
        """Stop HAProxy and the hosts; nothing that ran in our folders survives."""
        children = [(self.haproxy, self.haproxy_pid), *((h.child, h.pid) for h in hosts.values())]
        for child, pid in children:
            if not child.done:
                send_signal(pid, signal.SIGTERM)
        for child, _ in children:
            await child.ended()

        # The killed host's model servers end on their own (the exec wrapper's guard).
        await wait_until(lambda: not _running_in(self.folder), 5, "the model servers to end")


def _running_in(folder: Path) -> set[int]:
    """Processes whose working directory is in C{folder}."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd == str(folder) or cwd.startswith(str(folder) + os.sep):
                found.add(int(entry))
    return found
