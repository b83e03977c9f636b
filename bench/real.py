#!/usr/bin/env python3
"""
llamaswap in front of the real llama-server: streaming cost and swap bursts.

Run with ``make bench-real`` (or ``.venv/bin/python bench/real.py --help``);
needs ``make llama-server models`` (docs/llama-server.md). Not part of
``make test``. See docs/performance.md, "Real llama-server".

Two parts:

* **Streams**, DIRECT against PROXY. DIRECT is a llama-server this script
  starts itself on a free port; PROXY is ``twistd -n llamaswap`` with a
  config whose model is the same llama-server command (the proxy starts it
  itself). For each concurrency (1, 8, 32 by default) N clients each send
  streamed chat completions (``ignore_eos``, fixed ``max_tokens``) one after
  the other for ``--duration`` seconds (or ``--requests`` each), DIRECT and
  PROXY alternating within every round, so that both see the same machine.
  Per side: TTFB (request written -> first content token event), the gap
  between consecutive SSE events of a stream as the client receives them,
  tokens/s (aggregate, and per stream from its first to its last token) and
  errors (a non-200, a stream not ending in ``data: [DONE]``, any exception).
* **Swap bursts**, PROXY only: two models (tiny-a, tiny-b) in the config;
  N times, 8 concurrent requests (4 streamed) for the model that is not
  loaded. Per burst: the spread (slowest answer's end - the moment the new
  llama-server first answered ``/health`` 200, polled directly on its port
  every 10 ms), errors, and how bursty the streams were right after the swap
  (most tokens in a 10 ms window; tokens/s from first to last token against
  llama-server's own generation rate) against the same burst sent again to
  the loaded model. ``--swap-flags "-np 1 -c 256 -t 1" --burst-tokens 4
  --burst-streams 0`` is the end-to-end test's shape (5 HTTP threads).

The clients are ordinary: one HTTP/1.1 connection per client, kept alive and
reused across its requests as curl and httpx do (a connection the server has
closed in the meantime is noticed before reuse and replaced, as httpcore
does; never a retry of a request), events timed as they are read off the
socket (asyncio streams, an incremental chunked + SSE parser, no buffering).

This is a script, not library code: it prints, and uses only the stdlib.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: log, percentiles, processes, CPU time, git
from run import HOST, PY, RESULTS, ROOT, Proc, log, median, pct

CHAT_PATH = "/v1/chat/completions"
LISTENING = re.compile(r"llamaswap listening on http://[^ ]*:(\d+) ")
# The streams' model ("chat": tiny-a.gguf with --server-flags) and the two that
# the swap bursts alternate (tiny-a.gguf, tiny-b.gguf with --swap-flags).
CELL_MODEL = "chat"
MODELS = ("tiny-a", "tiny-b")
FILES = {CELL_MODEL: "tiny-a", "tiny-a": "tiny-a", "tiny-b": "tiny-b"}
BURST = 8  # requests per swap burst (--burst-streams of them streamed)
HEALTH_POLL = 0.010
WINDOW = 0.010  # burstiness: most events of one stream in any window this long
STALL = 0.100  # a gap at least this long counts as a stall
BUNCHED = 2.0  # a stream seen this many times faster than llama-server generated it

TARGETS = {
    "TTFB p50 added at c=1": "<= 2 ms",
    "gap p99 added": "<= 1 ms",
    "errors": "0",
    "swap spread": "<= 0.5 s",
}


def now() -> float:
    return time.perf_counter()


# --- the client ------------------------------------------------------------------


@dataclass
class Answer:
    """What one client saw of one request."""

    stream: bool
    start: float = 0.0  # the request written
    end: float = 0.0  # its last byte read (or the failure)
    status: int = 0
    error: str | None = None
    events: list[float] = field(default_factory=list)  # every SSE event's arrival
    tokens: list[float] = field(default_factory=list)  # events with delta.content
    first_token: int = -1  # index in events of the first token event
    done: bool = False  # the stream ended with data: [DONE]
    finish: str | None = None
    model: str | None = None
    completion_tokens: int = 0
    server_tps: float | None = None  # llama-server's own timings.predicted_per_second
    close_header: bool = False  # the answer said Connection: close

    @property
    def ok(self) -> bool:
        if self.error is not None or self.status != 200 or self.finish is None:
            return False
        return self.done or not self.stream

    @property
    def ttfb(self) -> float:
        return (self.tokens[0] if self.tokens else self.end) - self.start

    def gaps(self) -> list[float]:
        """Between consecutive events from the first token on (the TTFB is apart)."""
        if self.first_token < 0:
            return []
        return [b - a for a, b in itertools.pairwise(self.events[self.first_token :])]

    def client_tps(self) -> float | None:
        """Tokens/s as the client sees them arrive, from its first to its last token."""
        if len(self.tokens) < 2 or self.tokens[-1] <= self.tokens[0]:
            return None if len(self.tokens) < 2 else float("inf")
        return (len(self.tokens) - 1) / (self.tokens[-1] - self.tokens[0])

    def rate_ratio(self) -> float | None:
        """Client-seen tokens/s over llama-server's own generation rate (1: no bunching)."""
        rate = self.client_tps()
        if rate is None or not self.server_tps:
            return None
        return rate / self.server_tps

    def most_in_window(self, window: float = WINDOW) -> int:
        """The most token events that arrived within any `window` seconds."""
        best, lo = 0, 0
        for hi, t in enumerate(self.tokens):
            while t - self.tokens[lo] > window:
                lo += 1
            best = max(best, hi - lo + 1)
        return best

    def describe(self) -> str:
        what = self.error or f"status {self.status}"
        if self.error is None and self.status == 200:
            what = f"incomplete: done={self.done} finish={self.finish}"
        return f"{'stream' if self.stream else 'whole'}: {what}"


def chat_body(model: str, max_tokens: int, *, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "max_tokens": max_tokens,
        "ignore_eos": True,  # random weights: exact token counts
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


class Client:
    """
    One ordinary HTTP/1.1 client: a single connection, kept alive and reused
    for its requests one after the other. Before reusing it, the client lets
    the event loop run once so that a close from the server that has already
    arrived is seen (httpcore's "is readable" check, curl's "dead connection"
    check) and opens a new connection instead. A request that fails is an
    error: nothing is retried.
    """

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.opened = 0  # connections opened
        self.closed_by_server = 0  # found closed by the server before reuse

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.reader is not None and self.writer is not None:
            # Two loop turns: one to select the socket, one for its read callback.
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if self.reader.at_eof() or self.writer.is_closing():
                self.closed_by_server += 1
                self.close()
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(HOST, self.port)
            self.writer.get_extra_info("socket").setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
            )
            self.opened += 1
        return self.reader, self.writer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def chat(self, body: bytes, *, stream: bool) -> Answer:
        answer = Answer(stream=stream)
        try:
            await self._request(body, answer)
        except Exception as e:  # any failure is an answer that counts as an error
            answer.error = f"{type(e).__name__}: {e}"[:200]
            self.close()
        answer.end = now()
        return answer

    async def _request(self, body: bytes, answer: Answer) -> None:
        reader, writer = await self._connect()
        head = (
            f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Accept: text/event-stream\r\n" if answer.stream else "")
            + "\r\n"
        )
        answer.start = now()
        writer.write(head.encode() + body)
        raw = await reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        answer.status = int(lines[0].split()[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        answer.close_header = "close" in headers.get("connection", "")
        sse = answer.stream and headers.get("content-type", "").startswith("text/event-stream")
        parser = SseParser(answer) if sse else None
        whole = bytearray()

        def feed(data: bytes) -> None:
            if parser is not None:
                parser.feed(data, now())
            else:
                whole.extend(data)

        async def pass_on(left: int, where: str) -> None:
            """Feed the next C{left} bytes, whatever part is there now, as it comes."""
            while left:
                data = await reader.read(left)
                if not data:
                    raise ConnectionError(f"connection closed inside {where}")
                left -= len(data)
                feed(data)

        reusable = not answer.close_header
        if "chunked" in headers.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers expected
                    break
                await pass_on(size, "a chunk")
                await reader.readexactly(2)
        elif "content-length" in headers:
            await pass_on(int(headers["content-length"]), "the body")
        else:
            reusable = False
            while data := await reader.read(1 << 16):
                feed(data)
        if not reusable:
            self.close()
        if parser is None and answer.status == 200:
            decoded = json.loads(whole)
            choice = (decoded.get("choices") or [{}])[0]
            answer.finish = choice.get("finish_reason")
            answer.model = decoded.get("model")
            answer.completion_tokens = (decoded.get("usage") or {}).get("completion_tokens", 0)


class SseParser:
    """Splits an SSE body into events as bytes arrive; records each event's time."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.pending = b""

    def feed(self, data: bytes, at: float) -> None:
        self.pending += data
        while True:
            cut = self.pending.find(b"\n\n")
            if cut < 0:
                return
            event, self.pending = self.pending[:cut], self.pending[cut + 2 :]
            self.event(event, at)

    def event(self, event: bytes, at: float) -> None:
        answer = self.answer
        payload = b"".join(
            line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")
        )
        if not payload:
            return
        answer.events.append(at)
        if payload == b"[DONE]":
            answer.done = True
            return
        chunk = json.loads(payload)
        answer.model = chunk.get("model", answer.model)
        for choice in chunk.get("choices") or ():
            if isinstance(choice.get("delta", {}).get("content"), str):
                if not answer.tokens:
                    answer.first_token = len(answer.events) - 1
                answer.tokens.append(at)
            if choice.get("finish_reason"):
                answer.finish = choice["finish_reason"]
        if chunk.get("usage"):
            answer.completion_tokens = chunk["usage"].get("completion_tokens", 0)
        if chunk.get("timings"):
            answer.server_tps = chunk["timings"].get("predicted_per_second")


async def first_health(port: int, timeout: float = 60.0) -> float:
    """
    perf_counter() when the server on `port` first answered GET /health with
    200, polled every 10 ms on a fresh connection each time.
    """
    deadline = now() + timeout
    while now() < deadline:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            line = await asyncio.wait_for(reader.readline(), 2)
            if line.split(b" ")[1:2] == [b"200"]:
                return now()
        except (TimeoutError, OSError, IndexError):
            pass  # not listening yet
        finally:
            if writer is not None:
                writer.close()
        await asyncio.sleep(HEALTH_POLL)
    raise RuntimeError(f"no llama-server became healthy on port {port} in {timeout:g} s")


# --- one measured cell -----------------------------------------------------------------


async def cell(
    port: int, model: str, conc: int, seconds: float, requests: int, max_tokens: int
) -> dict[str, Any]:
    """`conc` clients streaming back to back; all answers and the wall time."""
    clients = [Client(port) for _ in range(conc)]
    answers: list[Answer] = []
    body = chat_body(model, max_tokens, stream=True)
    start = now()
    deadline = start + seconds

    async def loop(client: Client) -> None:
        n = 0
        while (n < requests) if requests else (now() < deadline):
            answers.append(await client.chat(body, stream=True))
            n += 1

    cpu = time.process_time()
    await asyncio.gather(*(loop(c) for c in clients))
    wall = now() - start
    for c in clients:
        c.close()
    return {
        "answers": answers,
        "wall": wall,
        "client_cpu": time.process_time() - cpu,
        "opened": sum(c.opened for c in clients),
        "closed_by_server": sum(c.closed_by_server for c in clients),
    }


def summarise_cell(runs: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """Pooled over rounds (TTFB, gaps, per stream) or the median of rounds (rates)."""
    answers: list[Answer] = [a for r in runs for a in r["answers"]]
    good = [a for a in answers if a.ok]
    bad = [a for a in answers if not a.ok]
    short = [a for a in good if a.completion_tokens != max_tokens]
    gaps = [g for a in good for g in a.gaps()]
    ttfb = [a.ttfb for a in good]
    rates = [t for a in good if (t := a.client_tps()) is not None]
    server = [a.server_tps for a in good if a.server_tps]

    def agg(r: dict[str, Any]) -> float:
        return sum(a.completion_tokens for a in r["answers"] if a.ok) / r["wall"]

    return {
        "streams": len(answers),
        "errors": len(bad) + len(short),
        "error_samples": sorted({a.describe() for a in bad})[:5]
        + [f"{len(short)} streams without {max_tokens} tokens"] * bool(short),
        "ttfb_p50_ms": pct(ttfb, 50) * 1000,
        "ttfb_p99_ms": pct(ttfb, 99) * 1000,
        "ttfb_max_ms": max(ttfb, default=float("nan")) * 1000,
        "gap_p50_ms": pct(gaps, 50) * 1000,
        "gap_p99_ms": pct(gaps, 99) * 1000,
        "gap_max_ms": max(gaps, default=float("nan")) * 1000,
        "stalls": sum(g >= STALL for g in gaps),
        "tps_aggregate": median([agg(r) for r in runs]),
        "tps_per_stream_p50": median(rates),
        "server_tps_p50": median(server),
        "most_in_10ms_max": max((a.most_in_window() for a in good), default=0),
        "rate_ratio_max": max((q for a in good if (q := a.rate_ratio()) is not None), default=0),
        "bunched_pct": 100 * sum((a.rate_ratio() or 0) > BUNCHED for a in good) / max(1, len(good)),
        "events_per_stream": median([len(a.events) for a in good]),
        "token_events_per_stream": median([len(a.tokens) for a in good]),
        "connections_opened": sum(r["opened"] for r in runs),
        "closed_by_server": sum(r["closed_by_server"] for r in runs),
        "close_headers": sum(a.close_header for a in answers),
        "client_cpu_us_per_event": sum(r["client_cpu"] for r in runs)
        / max(1, sum(len(a.events) for a in answers))
        * 1e6,
        "rounds": [
            {
                "streams": len(r["answers"]),
                "ttfb_p50_ms": round(pct([a.ttfb for a in r["answers"] if a.ok], 50) * 1000, 2),
                "gap_p99_ms": round(
                    pct([g for a in r["answers"] if a.ok for g in a.gaps()], 99) * 1000, 2
                ),
                "tps_aggregate": round(agg(r)),
            }
            for r in runs
        ],
    }


# --- processes -------------------------------------------------------------------


def server_cmd(binary: Path, model: Path, alias: str, port: int, flags: str) -> list[str]:
    return [
        str(binary),
        *("-m", str(model), "--host", HOST, "--port", str(port)),
        *shlex.split(flags),
        *("--alias", alias),
    ]


def proxy_config(
    binary: Path, models: dict[str, Path], ports: dict[str, int], flags: dict[str, str]
) -> str:
    """The llama-server models, on fixed ports (so that their /health can be polled)."""
    lines = [
        "# generated by bench/real.py",
        "healthCheckTimeout: 30",
        "unloadTimeout: 15",
        "models:",
    ]
    for name, port in ports.items():
        cmd = shlex.join(server_cmd(binary, models[FILES[name]], name, port, flags[name]))
        lines += [
            f"  {name}:",
            f"    cmd: {json.dumps(cmd)}",
            f"    proxy: http://{HOST}:{ports[name]}",
        ]
    return "\n".join(lines) + "\n"


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path, binary: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.binary = binary
        self.tree: Path = (args.tree or ROOT).resolve()
        self.procs: list[Proc] = []
        self.results: dict[str, Any] = {}
        from tests.fakeserver_helper import port_block

        first = port_block(4, HOST)
        ports = list(range(first, first + 4))
        self.model_ports = dict(zip((CELL_MODEL, *MODELS), ports[:3], strict=True))
        self.direct_port = ports[3]
        self.proxy_port = 0
        self.proxy: Proc | None = None

    def spawn(self, name: str, cmd: list[str], **kw: Any) -> Proc:
        logf = open(self.tmp / f"{name}.log", "wb")  # closed when we exit
        popen = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, **kw)
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def log_tail(self, name: str, n: int = 30) -> str:
        path = self.tmp / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-n:])

    def start(self) -> None:
        from tests.gguf_models import ensure_models

        models = ensure_models()
        flags = {CELL_MODEL: self.args.server_flags}
        flags.update(dict.fromkeys(MODELS, self.args.swap_flags))
        model = models[FILES[CELL_MODEL]]
        cmd = server_cmd(self.binary, model, CELL_MODEL, self.direct_port, flags[CELL_MODEL])
        self.spawn("direct", cmd)
        config = self.tmp / "config.yaml"
        config.write_text(proxy_config(self.binary, models, self.model_ports, flags))
        # twistd run the way its console script runs it; the tree's llamaswap
        # comes first on sys.path (cwd and PYTHONPATH).
        env = {**os.environ, "PYTHONPATH": str(self.tree)}
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(name, None)
        twistd = [PY, "-c", "import sys; sys.argv[0] = 'twistd'; from twisted.scripts import"]
        twistd[-1] += " twistd; twistd.run()"
        twistd += ["-n", "--pidfile=", "llamaswap", "--config", str(config)]
        twistd += ["--listen", f"tcp:0:interface={HOST}"]
        self.proxy = self.spawn("proxy", twistd, cwd=self.tree, env=env)
        deadline = time.monotonic() + 60
        while not (match := LISTENING.search(self.log_tail("proxy", 200))):
            if not self.proxy.alive() or time.monotonic() > deadline:
                raise RuntimeError("the proxy did not start:\n" + self.log_tail("proxy"))
            time.sleep(0.05)
        self.proxy_port = int(match.group(1))
        found = subprocess.run(
            [PY, "-c", "import llamaswap; print(llamaswap.__file__)"],
            cwd=self.tree,
            env=env,
            capture_output=True,
            text=True,
        )
        self.results["proxy_llamaswap"] = found.stdout.strip()
        asyncio.run(first_health(self.direct_port))
        log(
            f"direct llama-server on {self.direct_port}; proxy (pid {self.proxy.pid},"
            f" {self.results['proxy_llamaswap']}) on {self.proxy_port}"
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {proc.name}: {e}")
        from tests.gguf_models import llama_servers

        left = llama_servers(self.binary, [*self.model_ports.values(), self.direct_port])
        for pid in left:
            log(f"llama-server {pid} outlived the proxy: killing it")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.results["servers_left_behind"] = len(left)

    def sides(self, round_: int) -> list[tuple[str, int]]:
        sides = [("direct", self.direct_port), ("proxy", self.proxy_port)]
        return sides if round_ % 2 == 0 else sides[::-1]

    # What llama-server does with connections ------------------------------------

    async def probe(self) -> dict[str, Any]:
        """
        On one kept-alive connection each, direct: does llama-server close it
        after a streamed answer, after a whole one?
        """
        out: dict[str, Any] = {}
        for stream in (True, False):
            client = Client(self.direct_port)
            body = chat_body(CELL_MODEL, 4, stream=stream)
            first = await client.chat(body, stream=stream)
            # How long after the answer's last byte the server's close (FIN) comes.
            fin_ms = None
            if client.reader is not None:
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(client.reader.read(1), 1.0) == b"":
                        fin_ms = round((now() - first.end) * 1000, 3)
            client.close()
            out["stream" if stream else "whole"] = {
                "ok": first.ok,
                "connection_close_header": first.close_header,
                "server_closed_within_1s": fin_ms is not None,
                "close_after_last_byte_ms": fin_ms,
            }
        return out

    # Streams, direct vs proxy ---------------------------------------------------

    def streams(self) -> None:
        args = self.args
        log(
            f"streams: {args.rounds} rounds x concurrency {args.concurrency}, "
            + (f"{args.requests} requests" if args.requests else f"{args.duration:g} s")
            + f" per client, max_tokens {args.max_tokens}"
        )
        warm = [(n, p) for n, p in self.sides(0)]
        for _, port in warm:  # connections, slots, the proxy's first start of its model
            asyncio.run(cell(port, CELL_MODEL, 8, 0.5, 0, args.max_tokens))
        self.results["llama_server_connections"] = asyncio.run(self.probe())
        runs: dict[int, dict[str, list[dict[str, Any]]]] = {
            c: {"direct": [], "proxy": []} for c in args.concurrency
        }
        proxy_cpu: dict[int, float] = dict.fromkeys(args.concurrency, 0.0)
        assert self.proxy is not None
        for round_ in range(args.rounds):
            for conc in args.concurrency:
                for name, port in self.sides(round_):
                    before = run.cpu_seconds(self.proxy.pid)
                    result = asyncio.run(
                        cell(port, CELL_MODEL, conc, args.duration, args.requests, args.max_tokens)
                    )
                    if name == "proxy":
                        proxy_cpu[conc] += run.cpu_seconds(self.proxy.pid) - before
                    runs[conc][name].append(result)
                    bad = sum(not a.ok for a in result["answers"])
                    log(
                        f"  round {round_ + 1} c={conc} {name}: {len(result['answers'])} streams"
                        + (f", {bad} errors" if bad else "")
                    )
            if not self.proxy.alive():
                raise RuntimeError("the proxy died:\n" + self.log_tail("proxy"))
        out: dict[str, Any] = {}
        for conc in args.concurrency:
            row = {n: summarise_cell(r, args.max_tokens) for n, r in runs[conc].items()}
            events = sum(len(a.events) for r in runs[conc]["proxy"] for a in r["answers"])
            row["proxy"]["proxy_cpu_us_per_event"] = proxy_cpu[conc] / max(1, events) * 1e6
            out[f"c={conc}"] = row
            d, p = row["direct"], row["proxy"]
            log(
                f"  c={conc}: TTFB p50 {d['ttfb_p50_ms']:.2f} / {p['ttfb_p50_ms']:.2f} ms, "
                f"gap p99 {d['gap_p99_ms']:.2f} / {p['gap_p99_ms']:.2f} ms, "
                f"errors {d['errors']} / {p['errors']} (direct / proxy)"
            )
        self.results["streams"] = out

    # Swap bursts --------------------------------------------------------------------

    async def bursts(self) -> list[dict[str, Any]]:
        args = self.args
        clients = [Client(self.proxy_port) for _ in range(BURST)]

        async def burst(model: str) -> list[Answer]:
            return list(
                await asyncio.gather(
                    *(
                        c.chat(
                            chat_body(model, args.burst_tokens, stream=i < args.burst_streams),
                            stream=i < args.burst_streams,
                        )
                        for i, c in enumerate(clients)
                    )
                )
            )

        def describe(answers: list[Answer], model: str) -> dict[str, Any]:
            streams = [a for a in answers if a.stream and a.ok]
            bad = [a for a in answers if not a.ok or a.model != model]
            return {
                "errors": len(bad),
                "error_samples": sorted({a.describe() for a in bad})[:3],
                "most_in_10ms": [a.most_in_window() for a in streams],
                "client_tps": [round(t) for a in streams if (t := a.client_tps()) is not None],
                "server_tps": [round(a.server_tps) for a in streams if a.server_tps],
                "rate_ratio": [round(q, 2) for a in streams if (q := a.rate_ratio()) is not None],
            }

        out = []
        await burst(MODELS[0])  # a first swap (from the streams' model), not counted
        for i in range(args.swaps):
            model = MODELS[(i + 1) % 2]
            health = asyncio.create_task(first_health(self.model_ports[model]))
            sent = now()
            answers = await burst(model)
            ready = await health
            swap = describe(answers, model)
            swap.update(
                model=model,
                health_after_s=ready - sent,
                spread_s=max(a.end for a in answers) - ready,
                first_end_s=min(a.end for a in answers) - ready,
            )
            # The same burst again, on the loaded model: the steady state.
            sent = now()
            again = await burst(model)
            swap["loaded"] = {
                **describe(again, model),
                "spread_s": max(a.end for a in again) - sent,
            }
            out.append(swap)
            log(
                f"  burst {i + 1} -> {model}: healthy {swap['health_after_s']:.3f} s after sending,"
                f" spread {swap['spread_s']:.3f} s (loaded: {swap['loaded']['spread_s']:.3f} s),"
                f" most per 10 ms {max(swap['most_in_10ms'], default=0)}"
                f" (loaded {max(swap['loaded']['most_in_10ms'], default=0)}),"
                f" errors {swap['errors']}"
            )
        for c in clients:
            c.close()
        return out

    def swaps(self) -> None:
        log(
            f"swap bursts: {self.args.swaps} x {BURST} requests"
            f" ({self.args.burst_streams} streamed, max_tokens {self.args.burst_tokens})"
            " for the model not loaded"
        )
        runs = asyncio.run(self.bursts())
        spreads = [b["spread_s"] for b in runs]
        swapped_rates = [t for b in runs for t in b["client_tps"]]
        loaded_rates = [t for b in runs for t in b["loaded"]["client_tps"]]
        self.results["swaps"] = {
            "bursts": runs,
            "spread_s": spreads,
            "spread_max_s": max(spreads, default=float("nan")),
            "spread_p50_s": median(spreads),
            "loaded_spread_p50_s": median([b["loaded"]["spread_s"] for b in runs]),
            "errors": sum(b["errors"] + b["loaded"]["errors"] for b in runs),
            "most_in_10ms_max": max((m for b in runs for m in b["most_in_10ms"]), default=0),
            "loaded_most_in_10ms_max": max(
                (m for b in runs for m in b["loaded"]["most_in_10ms"]), default=0
            ),
            "client_tps_p50": median(swapped_rates),
            "client_tps_max": max(swapped_rates, default=float("nan")),
            "loaded_client_tps_p50": median(loaded_rates),
            "loaded_client_tps_max": max(loaded_rates, default=float("nan")),
            "server_tps_p50": median([t for b in runs for t in b["server_tps"]]),
            "rate_ratio_max": max((q for b in runs for q in b["rate_ratio"]), default=0),
            "loaded_rate_ratio_max": max(
                (q for b in runs for q in b["loaded"]["rate_ratio"]), default=0
            ),
            "bunched": sum(q > BUNCHED for b in runs for q in b["rate_ratio"]),
            "loaded_bunched": sum(q > BUNCHED for b in runs for q in b["loaded"]["rate_ratio"]),
            "streams": sum(len(b["rate_ratio"]) for b in runs),
        }

    def run(self) -> None:
        self.start()
        if self.args.concurrency:
            self.streams()
        if self.args.swaps:
            self.swaps()


# --- summaries and the table --------------------------------------------------------


def targets(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}

    def put(key: str, value: float, ok: bool, unit: str, detail: str = "") -> None:
        out[key] = {"target": TARGETS[key], "value": round(value, 3), "unit": unit, "met": ok}
        if detail:
            out[key]["detail"] = detail

    streams = results.get("streams", {})
    if "c=1" in streams:
        row = streams["c=1"]
        added = row["proxy"]["ttfb_p50_ms"] - row["direct"]["ttfb_p50_ms"]
        put("TTFB p50 added at c=1", added, added <= 2, "ms")
    if streams:
        added_gaps = {
            k: row["proxy"]["gap_p99_ms"] - row["direct"]["gap_p99_ms"]
            for k, row in streams.items()
        }
        worst = max(added_gaps.values())
        detail = ", ".join(f"{k}: {v:+.2f}" for k, v in added_gaps.items())
        put("gap p99 added", worst, worst <= 1, "ms (worst concurrency)", detail)
    # The proxy's errors; direct ones are llama-server's own, shown for comparison.
    errors = {k: row["proxy"]["errors"] for k, row in streams.items()}
    if "swaps" in results:
        errors["swaps"] = results["swaps"]["errors"]
    if errors:
        total = sum(errors.values())
        detail = ", ".join(f"{k}: {v}" for k, v in errors.items())
        direct = sum(row["direct"]["errors"] for row in streams.values())
        put("errors", total, total == 0, "errors (proxy)", f"{detail}; direct: {direct}")
    if "swaps" in results:
        spread = results["swaps"]["spread_max_s"]
        put("swap spread", spread, spread <= 0.5, "s (worst burst)")
    return out


def table(results: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    header = ["measure", "direct", "proxy", "proxy vs direct"]
    measures = (
        ("TTFB p50 ms", "ttfb_p50_ms", ".2f", "+"),
        ("TTFB p99 ms", "ttfb_p99_ms", ".2f", "+"),
        ("gap p50 ms", "gap_p50_ms", ".3f", "+"),
        ("gap p99 ms", "gap_p99_ms", ".2f", "+"),
        ("gap max ms", "gap_max_ms", ".1f", "+"),
        ("tokens/s aggregate", "tps_aggregate", ".0f", "x"),
        ("tokens/s per stream p50", "tps_per_stream_p50", ".0f", "x"),
        ("most tokens in 10 ms", "most_in_10ms_max", "d", ""),
        ("client/server rate max", "rate_ratio_max", ".2f", ""),
        (f"% streams > {BUNCHED:g}x server rate", "bunched_pct", ".1f", ""),
        ("streams", "streams", "d", ""),
        ("errors", "errors", "d", ""),
        ("connections opened", "connections_opened", "d", ""),
    )
    for conc, row in results.get("streams", {}).items():
        for label, key, fmt, cmp in measures:
            d, p = row["direct"][key], row["proxy"][key]
            diff = ""
            if cmp == "+":
                diff = f"{p - d:+.2f} ms"
            elif cmp == "x" and d:
                diff = f"{p / d:.2f}x"
            rows.append([f"{conc} {label}", format(d, fmt), format(p, fmt), diff])
        cpu = row["proxy"]["proxy_cpu_us_per_event"]
        rows.append([f"{conc} proxy CPU per relayed event", "", f"{cpu:.0f} us", ""])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    out = "\n".join(line.rstrip() for line in lines)
    sw = results.get("swaps")
    if sw:
        out += "\n\nswap bursts (proxy): spread = slowest answer end - new server's first"
        out += " /health 200\n"
        out += "  spreads s: " + " ".join(f"{s:.3f}" for s in sw["spread_s"]) + "\n"
        out += (
            f"  spread p50 {sw['spread_p50_s']:.3f} s, max {sw['spread_max_s']:.3f} s;"
            f" the same burst on the loaded model p50 {sw['loaded_spread_p50_s']:.3f} s;"
            f" errors {sw['errors']}\n"
        )
        out += (
            f"  streams right after a swap: most tokens in 10 ms {sw['most_in_10ms_max']},"
            f" client tokens/s p50 {sw['client_tps_p50']:.0f} max {sw['client_tps_max']:.0f};"
            f" loaded: most {sw['loaded_most_in_10ms_max']}, p50 {sw['loaded_client_tps_p50']:.0f}"
            f" max {sw['loaded_client_tps_max']:.0f}; llama-server's own p50"
            f" {sw['server_tps_p50']:.0f} tokens/s; client/server rate max"
            f" {sw['rate_ratio_max']:.2f} (loaded {sw['loaded_rate_ratio_max']:.2f});"
            f" streams seen > {BUNCHED:g}x faster than generated: {sw['bunched']} of"
            f" {sw['streams']} (loaded {sw['loaded_bunched']})"
        )
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {}
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    info.update(
        nproc=os.cpu_count(),
        cpu=cpu,
        kernel=platform.release(),
        python=platform.python_version(),
        twisted=run._version("twisted"),
        treq=run._version("treq"),
        load_avg_at_start=os.getloadavg(),
    )
    return info


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--duration", type=float, default=5.0, help="seconds of streaming per client per cell"
    )
    p.add_argument(
        "--requests", type=int, default=0, help="requests per client per cell instead of --duration"
    )
    p.add_argument("--concurrency", type=int, nargs="*", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per streamed answer")
    p.add_argument("--swaps", type=int, default=10, help="swap bursts (0: none)")
    p.add_argument(
        "--burst-tokens", type=int, default=32, help="max_tokens of the swap-burst requests"
    )
    p.add_argument(
        "--burst-streams",
        type=int,
        default=BURST // 2,
        choices=range(BURST + 1),
        metavar=f"0..{BURST}",
        help=f"how many of a burst's {BURST} requests stream (default {BURST // 2})",
    )
    p.add_argument(
        "--server-flags",
        default="-np 32 -c 8192 -t 1",
        help="llama-server options of the streams' model, besides -m/--host/--port/--alias"
        " (default: 32 slots of 256 tokens)",
    )
    p.add_argument(
        "--swap-flags",
        default="-np 8 -c 2048 -t 1",
        help="llama-server options of the swap bursts' two models (default: a slot for each of"
        " the burst's 8 requests; the end-to-end tests use -np 1 -c 256 -t 1)",
    )
    p.add_argument("--quick", action="store_true", help="1 round of 1 s, 2 swaps: a smoke test")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument(
        "--tree",
        type=Path,
        default=None,
        help="measure the llamaswap of another checkout (e.g. a worktree of an older commit)",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.swaps = 1, 1.0, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from tests.gguf_models import find_llama_server

    binary = find_llama_server()
    if binary is None:
        print("bench-real: no llama-server: run `make llama-server models`", file=sys.stderr)
        return 2
    binary = binary.resolve()
    tmp = Path(tempfile.mkdtemp(prefix="llamaswap-bench-real-"))
    started = time.time()
    bench = Bench(args, tmp, binary)
    build_info = binary.parent.parent / "BUILD_INFO"
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "git": run.git_rev(bench.tree),
        "git_status": subprocess.run(
            ["git", "status", "--short"], cwd=bench.tree, capture_output=True, text=True
        ).stdout.splitlines()[:20],
        "tree": str(bench.tree),
        "command": " ".join([Path(PY).name, "bench/real.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "llama_server": str(binary),
        "llama_server_build": build_info.read_text() if build_info.exists() else "",
        "settings": {
            "rounds": args.rounds,
            "duration_s": args.duration,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "swaps": args.swaps,
            "burst": BURST,
            "burst_streams": args.burst_streams,
            "burst_tokens": args.burst_tokens,
            "server_flags": args.server_flags,
            "swap_flags": args.swap_flags,
        },
    }
    code = 0
    try:
        bench.run()
    except (Exception, KeyboardInterrupt) as e:
        log(f"aborted: {e!r}")
        code = 1
    finally:
        bench.stop()
        if args.keep or code:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results = {**meta, "elapsed_s": round(time.time() - started, 1), **bench.results}
    results["targets"] = targets(bench.results)
    out = args.out or RESULTS / time.strftime("real-%Y%m%d-%H%M%S.json", time.localtime(started))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(bench.results))
    conns = bench.results.get("llama_server_connections")
    if conns:
        print(f"\nllama-server's connections: {json.dumps(conns)}")
    print()
    for key, t in results["targets"].items():
        mark = "met" if t["met"] else "MISSED"
        detail = f" [{t['detail']}]" if "detail" in t else ""
        print(f"target {key}: {t['value']:g} {t['unit']} (goal {t['target']}): {mark}{detail}")
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"elapsed: {results['elapsed_s']} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
