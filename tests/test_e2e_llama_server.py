# -*- test-case-name: tests.test_e2e_llama_server -*-
"""
End to end with the real llama.cpp C{llama-server}.

Each test runs the real C{twistd -n llamaswap} as a subprocess, with a config of
four llama-server models (two chat models, an embedding model and a reranker
with a short TTL; tiny random-weight GGUF files from L{tests.gguf_models}), and
talks to it the way users do: through the C{openai} SDK (run in threads, the
reactor being Twisted's) and plain HTTP for the management routes. Processes
are checked through C{/proc}: which llama-server runs, and that none survives.

Skipped only when no llama-server binary is found (C{make llama-server}, see
docs/llama-server.md). The models are generated on first use (a few seconds).
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import openai
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from tests.chat_clients import ChatAnswer, ChatClients, gather
from tests.fakeserver_helper import port_block
from tests.gguf_models import ensure_models, find_llama_server, llama_servers
from tests.proctools import TWISTD, ChildOutput, alive, send_signal, sleep, twistd_env

LLAMA_SERVER = find_llama_server()
SKIP_REASON = (
    None
    if LLAMA_SERVER is not None
    else "no llama-server binary: run `make llama-server models` (or set $LLAMA_SERVER_BIN); "
    "see docs/llama-server.md"
)

# The folder holding `llamaswap` and `twisted/plugins/llamaswap_plugin.py`.
LISTENING = re.compile(r"llamaswap listening on http://[^ ]*:(\d+) ")
# Config ids, in the sorted order in which ${PORT} hands out startPort, startPort + 1, ...
MODEL_IDS = ("tiny-a", "tiny-b", "tiny-embed", "tiny-rerank")
MESSAGES: list[Any] = [{"role": "user", "content": "Tell me a story."}]
# Random weights may sample EOS early; ignore_eos makes token counts exact.
EXACT = {"ignore_eos": True}


def _config(models: dict[str, Path], start_port: int) -> str:
    assert LLAMA_SERVER is not None
    server = shlex.quote(str(LLAMA_SERVER))

    def cmd(name: str, options: str) -> str:
        model = shlex.quote(str(models[name]))
        return f"{server} -m {model} --host 127.0.0.1 --port ${{PORT}} -np 1 -t 1 {options}"

    # tiny-b runs with --context-shift so that a request can generate forever
    # (the disconnect test); every other request here passes max_tokens.
    entries = {
        "tiny-a": (cmd("tiny-a", "-c 256 --alias tiny-a"), ""),
        "tiny-b": (cmd("tiny-b", "-c 256 --alias tiny-b --context-shift"), ""),
        "tiny-embed": (cmd("tiny-embed", "-c 512 --embeddings --alias tiny-embed"), ""),
        "tiny-rerank": (cmd("tiny-rerank", "-c 512 --reranking"), "    ttl: 2\n"),
    }
    lines = [
        f"startPort: {start_port}",
        "healthCheckTimeout: 30",
        # llama-server needs a moment to exit (it finishes its slots); under load, more than 5 s.
        "unloadTimeout: 15",
        # A stop waits this long for answers in flight (the endless stream of the
        # SIGTERM test), then cuts them with an error event.
        "shutdownTimeout: 2",
        # twistd's stdout gets llama-server's output too: readable when a test fails.
        "logToStdout: both",
        "models:",
    ]
    for name in MODEL_IDS:
        command, extra = entries[name]
        lines.append(f"  {name}:\n    cmd: {json.dumps(command)}\n{extra}".rstrip("\n"))
    return "\n".join(lines) + "\n"


def _llama_servers(ports: Iterable[int]) -> set[int]:
    """Live llama-servers of this test: its binary, listening on one of C{ports}."""
    assert LLAMA_SERVER is not None
    return llama_servers(LLAMA_SERVER, ports)


async def _until(
    what: str, check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.05
) -> float:
    """Poll C{check} until it is true; return the seconds it took."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await sleep(interval)
    return time.monotonic() - start


class _StreamReader(Protocol):
    """
    Reads an endless body (C{/logs/stream/...}) until every needle was seen
    or the time is up, then hangs up; C{done} fires with the text read.
    """

    def __init__(self, needles: list[str], timeout: float) -> None:
        self.done: Deferred[str] = Deferred()
        self._needles = needles
        self._data = bytearray()
        self._timer = reactor.callLater(timeout, self._finish)

    def text(self) -> str:
        return self._data.decode("utf-8", "replace")

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if all(needle in self.text() for needle in self._needles):
            self._finish()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._finish()

    def _finish(self) -> None:
        if self.done.called:
            return
        if self._timer.active():
            self._timer.cancel()
        self.transport.stopProducing()  # type: ignore[union-attr]
        self.done.callback(self.text())


class _Proxy:
    """A running llamaswap, its clients, and the ports its models may use."""

    def __init__(
        self, process: ChildOutput, port: int, model_ports: range, http: HTTPClient
    ) -> None:
        self.process = process
        self.base = f"http://127.0.0.1:{port}"
        self.model_ports = model_ports
        self.http = http
        self.openai = openai.OpenAI(
            base_url=f"{self.base}/v1", api_key="unused", max_retries=0, timeout=30
        )

    async def get_json(self, path: str) -> Any:
        response = await self.http.get(self.base + path)
        body = await response.content()
        assert response.code == 200, (path, response.code, body)
        return json.loads(body)

    async def read_stream(self, path: str, needles: list[str], timeout: float) -> str:
        """What C{path} streamed until it had shown every needle (or C{timeout})."""
        response = await self.http.get(self.base + path)
        assert response.code == 200, (path, response.code)
        reader = _StreamReader(needles, timeout)
        response.deliverBody(reader)
        return await reader.done

    def endless_stream(self, model: str, first: int) -> tuple[Any, list[Any]]:
        """
        Start a chat stream that will not end by itself (blocking: call it in a
        thread); return it and its C{first} chunks, read already.
        """
        stream = self.openai.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=1_000_000,
            stream=True,
            extra_body=EXACT,
        )
        chunks = iter(stream)
        return stream, [next(chunks) for _ in range(first)]

    async def running(self) -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = (await self.get_json("/running"))["running"]
        return answer

    def servers(self) -> set[int]:
        """pids of the llama-servers started for this proxy that are alive."""
        return _llama_servers(self.model_ports)


class _MostServers:
    """Samples how many of a proxy's llama-servers are alive, every 20 ms."""

    def __init__(self, proxy: _Proxy) -> None:
        self.most = 0
        self._proxy = proxy
        self._loop = LoopingCall(self._sample)

    def _sample(self) -> None:
        self.most = max(self.most, len(self._proxy.servers()))

    def start(self) -> None:
        self._loop.start(0.02)

    def stop(self) -> None:
        self._loop.stop()


class _LlamaServerCase(TestCase):
    """Runs C{twistd -n llamaswap} driving real llama-servers; fails on any server left."""

    skip = SKIP_REASON
    timeout = 60

    async def _start(self) -> _Proxy:
        """Run llamaswap with the four-model config; fire once it listens."""
        models = ensure_models()
        folder = Path(self.mktemp()).resolve()
        folder.mkdir(parents=True)
        first = port_block(len(MODEL_IDS))
        config = folder / "config.yaml"
        config.write_text(_config(models, first))

        env = twistd_env()
        argv = [*TWISTD, "-n", "--pidfile=", "llamaswap", "--config", str(config)]
        argv += ["--listen", "tcp:0:interface=127.0.0.1"]
        process = ChildOutput()
        reactor.spawnProcess(process, argv[0], argv, env=env, path=str(folder))
        model_ports = range(first, first + len(MODEL_IDS))
        self.addCleanup(self._stop, process, model_ports, folder)

        async def listening() -> bool:
            if process.status is not None:
                raise AssertionError(f"twistd exited {process.status}:\n{process.text()}")
            return LISTENING.search(process.text()) is not None

        await _until("llamaswap to listen", listening, 30)
        match = LISTENING.search(process.text())
        assert match is not None

        pool = HTTPConnectionPool(reactor, persistent=False)  # type: ignore[no-untyped-call]
        self.addCleanup(pool.closeCachedConnections)
        http = HTTPClient(Agent(reactor, pool=pool))  # type: ignore[no-untyped-call]
        proxy = _Proxy(process, int(match.group(1)), model_ports, http)
        self.addCleanup(proxy.openai.close)
        return proxy

    async def _stop(self, process: ChildOutput, model_ports: range, folder: Path) -> None:
        """
        Stop llamaswap (SIGTERM, SIGKILL after 30 s) and fail the test if a
        llama-server outlived it. Its output is kept in the test's folder.
        """
        if process.status is None:
            send_signal(process.pid, signal.SIGTERM)
            timeout = reactor.callLater(30, send_signal, process.pid, signal.SIGKILL)
            await process.ended()
            if timeout.active():
                timeout.cancel()
        (folder / "twistd.out").write_bytes(bytes(process.output))
        survivors = _llama_servers(model_ports)
        for pid in survivors:
            send_signal(pid, signal.SIGKILL)
        self.assertEqual(survivors, set(), "llama-server outlived llamaswap")

    async def _chat(self, proxy: _Proxy, model: str, max_tokens: int = 4) -> Any:
        return await deferToThread(
            proxy.openai.chat.completions.create,
            model=model,
            messages=MESSAGES,
            max_tokens=max_tokens,
            extra_body=EXACT,
        )

    async def _running_pid(self, proxy: _Proxy, model: str) -> int:
        """The pid llamaswap reports for C{model}, the only model running."""
        running = await proxy.running()
        self.assertEqual([(r["model"], r["state"]) for r in running], [(model, "ready")])
        pid = running[0]["pid"]
        assert isinstance(pid, int)
        return pid


class LlamaServerEndToEndTests(_LlamaServerCase):
    """C{twistd -n llamaswap} driving real llama-servers, used through the SDK."""

    async def test_chat(self) -> None:
        """
        Chat completions, whole and streamed: the model's own answer comes
        back with exact token counts, and the stream arrives as several chunks
        that end with a finish reason and usage.
        """
        proxy = await self._start()
        answer = await self._chat(proxy, "tiny-a", max_tokens=8)
        self.assertEqual(answer.model, "tiny-a")  # llama-server's --alias: the real server
        self.assertEqual(answer.object, "chat.completion")
        self.assertEqual(answer.choices[0].finish_reason, "length")
        self.assertIsInstance(answer.choices[0].message.content, str)
        self.assertEqual(answer.usage.completion_tokens, 8)
        self.assertGreater(answer.usage.prompt_tokens, 0)

        def stream() -> list[Any]:
            chunks = proxy.openai.chat.completions.create(
                model="tiny-a",
                messages=MESSAGES,
                max_tokens=12,
                stream=True,
                stream_options={"include_usage": True},
                extra_body=EXACT,
            )
            with chunks:
                return list(chunks)

        chunks = await deferToThread(stream)
        choices = [c.choices[0] for c in chunks if c.choices]
        pieces = [c.delta.content for c in choices if c.delta.content]
        self.assertGreaterEqual(len(pieces), 2, chunks)
        self.assertEqual([c.finish_reason for c in choices if c.finish_reason], ["length"])
        usage = [c.usage for c in chunks if c.usage]
        self.assertEqual([u.completion_tokens for u in usage], [12])
        self.assertEqual({c.model for c in chunks}, {"tiny-a"})

    async def test_completions(self) -> None:
        """Legacy completions (C{/v1/completions}) on the second chat model."""
        proxy = await self._start()
        answer = await deferToThread(
            proxy.openai.completions.create,
            model="tiny-b",
            prompt="Once upon a time",
            max_tokens=6,
            extra_body=EXACT,
        )
        self.assertEqual(answer.model, "tiny-b")
        self.assertEqual(answer.choices[0].finish_reason, "length")
        self.assertIsInstance(answer.choices[0].text, str)
        assert answer.usage is not None
        self.assertEqual(answer.usage.completion_tokens, 6)

    async def test_embeddings(self) -> None:
        """
        Embeddings from the BERT model (the SDK's default request, base64
        encoded): one 64-float vector per input, different inputs differ.
        """
        proxy = await self._start()
        answer = await deferToThread(
            proxy.openai.embeddings.create,
            model="tiny-embed",
            input=["the cat sat on the mat", "stock markets fell sharply"],
        )
        vectors = [item.embedding for item in answer.data]
        self.assertEqual([item.index for item in answer.data], [0, 1])
        self.assertEqual([len(v) for v in vectors], [64, 64])
        self.assertNotEqual(vectors[0], vectors[1])
        self.assertTrue(all(isinstance(x, float) and abs(x) < 1e6 for v in vectors for x in v))
        self.assertGreater(answer.usage.prompt_tokens, 0)

    async def test_swap_back_and_forth(self) -> None:
        """
        Requests alternating between models swap them: each answer comes from
        the right server, C{/running} shows only that model with a fresh pid,
        the previous server is gone, and /proc, sampled every 20 ms throughout,
        never saw two llama-servers at once.
        """
        proxy = await self._start()
        most = _MostServers(proxy)
        most.start()
        pids: list[int] = []
        try:
            for model in ("tiny-a", "tiny-b", "tiny-a", "tiny-b", "tiny-embed", "tiny-a"):
                if model == "tiny-embed":
                    answer = await deferToThread(
                        proxy.openai.embeddings.create, model=model, input="x"
                    )
                    self.assertEqual(len(answer.data[0].embedding), 64)
                else:
                    answer = await self._chat(proxy, model)
                    self.assertEqual(answer.model, model)
                pid = await self._running_pid(proxy, model)
                self.assertEqual(proxy.servers(), {pid})
                self.assertEqual([p for p in pids if alive(p)], [])
                pids.append(pid)
        finally:
            most.stop()
        self.assertEqual(len(set(pids)), len(pids), pids)
        self.assertEqual(most.most, 1)

    async def test_upstream_health(self) -> None:
        """
        C{/upstream/<id>/health} starts the model and answers with
        llama-server's own health check; asking another model's swaps.
        """
        proxy = await self._start()
        self.assertEqual(await proxy.running(), [])
        self.assertEqual(await proxy.get_json("/upstream/tiny-b/health"), {"status": "ok"})
        first = await self._running_pid(proxy, "tiny-b")
        self.assertEqual(await proxy.get_json("/upstream/tiny-a/health"), {"status": "ok"})
        second = await self._running_pid(proxy, "tiny-a")
        self.assertFalse(alive(first))
        self.assertEqual(proxy.servers(), {second})
        # Anything else under /upstream reaches the server too, e.g. its /props.
        props = await proxy.get_json("/upstream/tiny-a/props")
        self.assertIn("tiny-a.gguf", props["model_path"])

    async def test_ttl_unload(self) -> None:
        """
        The reranker (C{ttl: 2}) answers C{/v1/rerank}, is idle-unloaded
        about 2 s after its answer, and its process is gone.
        """
        proxy = await self._start()
        response = await proxy.http.post(
            f"{proxy.base}/v1/rerank",
            json={
                "model": "tiny-rerank",
                "query": "what do cats eat?",
                "documents": ["cats eat fish", "Paris is in France", "hello"],
            },
        )
        body = json.loads(await response.content())
        answered = time.monotonic()
        self.assertEqual(response.code, 200, body)
        self.assertEqual(sorted(r["index"] for r in body["results"]), [0, 1, 2])
        self.assertTrue(all(isinstance(r["relevance_score"], float) for r in body["results"]))

        (status,) = await proxy.running()
        self.assertEqual((status["model"], status["ttl"]), ("tiny-rerank", 2))
        self.assertLessEqual(status["ttlRemaining"], 2)
        pid = status["pid"]

        async def unloaded() -> bool:
            return await proxy.running() == []

        await _until("the TTL unload", unloaded, 10, interval=0.1)
        elapsed = time.monotonic() - answered
        self.assertGreater(elapsed, 1.5)
        self.assertLess(elapsed, 4.5)
        self.assertFalse(alive(pid))
        self.assertEqual(proxy.servers(), set())

    async def test_log_stream(self) -> None:
        """
        C{/logs/stream/<id>} carries llama-server's own output (it logs to
        stderr): its model loading, its listening line on the port llamaswap
        gave it, and its request timings, and nothing from the other model.
        """
        proxy = await self._start()
        await self._chat(proxy, "tiny-a")
        (status,) = await proxy.running()
        listening = f"llama_server: listening on {status['proxy']}"
        text = await proxy.read_stream("/logs/stream/tiny-a", [listening, "stop processing"], 10)
        self.assertIn(listening, text)
        self.assertIn("load_model: loading model", text)
        self.assertIn("tiny-a.gguf", text)
        self.assertIn("print_timing", text)
        self.assertNotIn("tiny-b.gguf", text)

    async def test_disconnect_stops_generation(self) -> None:
        """
        A client that leaves in the middle of an endless stream stops the
        generation: llama-server's slot, busy while the client is connected,
        is idle again within a second, llama-server logs the cancelled task,
        and llamaswap counts no request in flight.
        """
        proxy = await self._start()

        stream, chunks = await deferToThread(proxy.endless_stream, "tiny-b", 20)
        self.assertEqual(len(chunks), 20)
        slots = await proxy.get_json("/upstream/tiny-b/slots")
        self.assertTrue(slots[0]["is_processing"], slots)
        (status,) = await proxy.running()
        self.assertEqual(status["inFlight"], 1)

        await deferToThread(stream.close)

        async def idle() -> bool:
            slots = await proxy.get_json("/upstream/tiny-b/slots")
            return not slots[0]["is_processing"]

        took = await _until("the slot to stop processing", idle, 5, interval=0.02)
        self.assertLess(took, 1.0)
        text = await proxy.read_stream("/logs/stream/tiny-b", ["cancel task"], 5)
        self.assertIn("cancel task", text)
        (status,) = await proxy.running()
        self.assertEqual((status["model"], status["inFlight"]), ("tiny-b", 0))

    async def test_sigterm_leaves_no_server(self) -> None:
        """
        SIGTERM to twistd while a llama-server is streaming without end: after
        C{shutdownTimeout} the stream is cut with an error event (the OpenAI SDK
        raises it), the server is stopped (its last words are relayed before
        twistd's own), twistd exits as a SIGTERM'd process does, and no
        llama-server is left.
        """
        proxy = await self._start()

        stream, _ = await deferToThread(proxy.endless_stream, "tiny-b", 1)
        self.addCleanup(stream.close)
        pid = await self._running_pid(proxy, "tiny-b")
        self.assertEqual(proxy.servers(), {pid})

        def rest_of_stream() -> str:
            try:
                for _ in stream:
                    pass
            except Exception as e:
                return f"{type(e).__name__}: {e}"
            return "the stream ended without an error"

        reading = deferToThread(rest_of_stream)
        send_signal(proxy.process.pid, signal.SIGTERM)
        status = await proxy.process.ended()
        # twistd re-raises the signal after a clean shutdown (as systemd expects).
        self.assertEqual(status, (None, signal.SIGTERM), proxy.process.text())
        self.assertFalse(alive(pid))
        self.assertEqual(proxy.servers(), set())
        ending = await reading  # the client's stream ended: it did not hang
        self.assertIn("APIError", ending)
        self.assertIn("llamaswap is shutting down: the answer was cut", ending)
        output = proxy.process.text()
        stopping = output.split("Received SIGTERM, shutting down.", 1)[1]
        # llama-server's last words come before twistd's own, unless it was too slow
        # to exit (a loaded machine) and got SIGKILL, which llamaswap says.
        if "did not stop in time; sending SIGKILL" not in stopping:
            self.assertIn("cleaning up before exit", stopping)
            self.assertLess(
                stopping.index("cleaning up before exit"), stopping.index("Server Shut Down.")
            )
        else:
            self.assertLess(stopping.index("sending SIGKILL"), stopping.index("Server Shut Down."))


class LlamaServerConcurrencyTests(_LlamaServerCase):
    """
    Many ordinary clients at once on the real llama-server (issue 10): no
    request fails because of how connections are reused, and a burst of
    requests waiting for a swap is answered as soon as the model is ready.
    """

    timeout = 240

    async def test_concurrent_clients_one_model(self) -> None:
        """
        8 clients on kept-alive connections, 1,000 requests on one model, half
        of them streamed: every answer is a 200 from that model, every stream
        complete (one finish reason, then C{[DONE]}).
        """
        proxy = await self._start()
        clients = ChatClients(self, proxy.base, max_tokens=4, **EXACT)
        answers: list[ChatAnswer] = []
        total = 1000

        async def client(index: int) -> None:
            for n in range(index, total, 8):
                answers.append(await clients.chat("tiny-a", stream=n % 2 == 0))

        await gather(client(i) for i in range(8))
        bad = [a for a in answers if not (a.code == 200 and a.complete and a.model == "tiny-a")]
        self.assertEqual(len(answers), total)
        self.assertEqual(bad, [], f"{len(bad)} of {total} failed")
        self.assertEqual(sum(a.stream for a in answers), total // 2)
        (status,) = await proxy.running()
        self.assertEqual((status["model"], status["inFlight"]), ("tiny-a", 0))

    async def test_swap_bursts(self) -> None:
        """
        Ten times, 8 requests (none, half or all streamed) for the model that is
        not loaded: each is answered by that model, complete, and the slowest
        within 0.5 s of the new server's own readiness (its "listening on" line,
        printed once its model is loaded, as llamaswap relays it).
        """
        proxy = await self._start()
        clients = ChatClients(self, proxy.base, max_tokens=4, **EXACT)
        ports = dict(zip(MODEL_IDS, proxy.model_ports, strict=True))
        lags = []
        for round_ in range(10):
            model = ("tiny-a", "tiny-b")[round_ % 2]
            line = f"llama_server: listening on http://127.0.0.1:{ports[model]}".encode()
            ready_at = proxy.process.wait_for(line, after=len(proxy.process.output))
            ready_at.addCallback(lambda _: time.monotonic())
            # Whole answers keep a kept-alive connection (and so a server thread)
            # busy; streams end with the server closing: all three mixes.
            streamed = [(i < round_ % 3 * 4) for i in range(8)]
            answers = await gather(clients.chat(model, stream=s) for s in streamed)
            ready = await ready_at
            bad = [a for a in answers if not (a.code == 200 and a.complete and a.model == model)]
            self.assertEqual(bad, [], f"round {round_}")
            lags.append(max(a.ended for a in answers) - ready)
        self.assertLess(max(lags), 0.5, [round(lag, 3) for lag in lags])
