#!/usr/bin/env python3
"""
llamaswap benchmark: the proxy against a direct connection to the same upstream.

Run with ``make bench`` (or ``.venv/bin/python bench/run.py --help``). One run
starts the proxy as a real ``twistd`` process, which starts its model servers
itself: nginx (a fast upstream: a fixed JSON answer, a static SSE file, a 20 MB
file) and llamaswap's fake server (paced tokens, slow start-up). Every
scenario is measured for the proxy and for a direct connection to the same
upstream *interleaved*, round by round, so that both see the same machine
state. It prints a table with ratios to direct and writes the raw
figures to ``bench/results/<timestamp>.json``. See docs/performance.md.

Scenarios: S1 small chat requests (wrk), S2 SSE streams (2,000 events from
nginx, and 100 paced tokens from the fake), S3 a 20 MB response, S4 swap
overhead, S5 proxy RSS, S6 100 ``/logs/stream`` listeners during S1.

This is a script, not library code: it prints, and uses only the stdlib.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import os
import platform
import re
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PY = sys.executable
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"

SSE_EVENTS = 2000
BIG_MB = 20
PACED_TOKENS = 100
PACED_DELAY = 0.005
SWAP_DELAY = 0.3
LISTENERS = 100

# What a small llama-server answer looks like (about 400 bytes).
CHAT_ANSWER = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
    },
    separators=(",", ":"),
)

TARGETS = {
    "S1 c=8 req/s": ">= 4000",
    "S2 added gap p99": "<= 1 ms",
    "S3 throughput": ">= 30 % of direct",
    "S4 swap overhead": "<= 100 ms",
    "S5 idle RSS": "<= 40 MB",
    "S6 listeners cost": "<= 10 %",
}


# --- small helpers ------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in kB."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(rest.split()[0])
    return out


def chat_body(model: str, *, stream: bool = False) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 16,
    }
    if stream:
        body["stream"] = True
    return json.dumps(body).encode()


def http_call(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes, float]:
    """One blocking request on a fresh connection: (status, body, seconds)."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        conn.request(method, path, body=body, headers=hdrs)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, data, time.perf_counter() - start
    finally:
        conn.close()


def wait_http(port: int, path: str, deadline: float, want: int = 200) -> bool:
    while time.monotonic() < deadline:
        try:
            status, _, _ = http_call(port, "GET", path, timeout=2)
            if status == want:
                return True
        except OSError:
            pass
        time.sleep(0.02)
    return False


# --- processes ----------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    stop_signal: int = signal.SIGTERM

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace: float = 15.0) -> None:
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            self.popen.send_signal(self.stop_signal)
        try:
            self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            log(f"{self.name} did not stop in {grace}s; killing")
            self.popen.kill()
            self.popen.wait()


@dataclass
class Ports:
    proxy: int = field(default_factory=free_port)
    nginx: int = field(default_factory=free_port)
    nginx_proxy: int = field(default_factory=free_port)
    nginx_logged: int = field(default_factory=free_port)
    twisted_min: int = field(default_factory=free_port)
    paced: int = field(default_factory=free_port)
    swap_a: int = field(default_factory=free_port)
    swap_b: int = field(default_factory=free_port)
    proxy_logged: int = field(default_factory=free_port)


def write_upstream_files(tmp: Path) -> None:
    with open(tmp / "sse.txt", "w") as f:
        for i in range(SSE_EVENTS):
            chunk = {
                "id": "chatcmpl-bench",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": "bench",
                "choices": [{"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}],
            }
            f.write("data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n")
        f.write("data: [DONE]\n\n")
    block = os.urandom(1 << 20)
    with open(tmp / "big.bin", "wb") as f:
        for _ in range(BIG_MB):
            f.write(block)


def nginx_conf(tmp: Path, name: str, port: int, reference_port: int | None) -> str:
    """
    The upstream, which the proxy itself starts and supervises as the model's
    server (as it would llama-server). One worker: the machine has 2 cores for
    everything. The chat location answers every POST with the same JSON;
    ``X-Bench: sse|big`` selects the static SSE or 20 MB file instead, so
    that all payloads reach the proxy as the same model on the same path (no
    swaps between scenarios). With C{reference_port}, a second server block
    is nginx as a reverse proxy in front of itself: what a C proxy costs here.
    """
    user = "user root;" if os.geteuid() == 0 else ""
    answer = CHAT_ANSWER.replace("'", "\\'")
    ref = ""
    if reference_port:
        ref = f"""
  upstream bench_up {{ server {HOST}:{port}; keepalive 64; }}
  server {{
    listen {HOST}:{reference_port};
    location / {{
      proxy_pass http://bench_up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
    }}
  }}"""
    return f"""{user}
worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/{name}-body;
  proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fcgi;
  uwsgi_temp_path {tmp}/{name}-uwsgi;
  scgi_temp_path {tmp}/{name}-scgi;
  keepalive_requests 10000000;
  sendfile on;
  server {{
    listen {HOST}:{port} backlog=4096;
    root {tmp};
    location = /health {{ return 200 'ok'; }}
    location = {CHAT_PATH} {{
      if ($http_x_bench = sse) {{ rewrite ^ /sse.txt last; }}
      if ($http_x_bench = big) {{ rewrite ^ /big.bin last; }}
      default_type application/json;
      return 200 '{answer}';
    }}
    # Static files answer POST too: the 405 becomes an internal GET.
    location = /sse.txt {{ default_type text/event-stream; error_page 405 =200 $uri; }}
    location = /big.bin {{ default_type application/octet-stream; error_page 405 =200 $uri; }}
  }}{ref}
}}
"""


def proxy_config(
    ports: Ports,
    tmp: Path,
    *,
    tree: Path = ROOT,
    nginx: str = "nginx",
    log_requests: bool = False,
    fakes: bool = True,
) -> str:
    """
    The proxy's config. logRequests is off as in the default config, except
    for S6's second proxy (with its own nginx): with it on, each request is a
    line on /logs/stream.
    """
    nginx_port = ports.nginx if nginx == "nginx" else ports.nginx_logged
    fake = "${PYTHON} -m llamaswap.fakeserver --quiet"
    paced = f"--tokens {PACED_TOKENS} --token-delay {PACED_DELAY}"
    nginx_model = f"""# generated by bench/run.py
healthCheckTimeout: 15
logRequests: {"true" if log_requests else "false"}
models:
  bench-nginx:
    cmd: nginx -c {tmp}/{nginx}.conf -p {tmp}
    proxy: http://{HOST}:{nginx_port}
    checkEndpoint: /health
"""
    if not fakes:
        return nginx_model
    # The fake server comes from this checkout, installed or not.
    env = f'env: ["PYTHONPATH={tree}"]'
    return (
        nginx_model
        + f"""  bench-paced:
    cmd: {fake} --port {ports.paced} --name paced {paced}
    proxy: http://{HOST}:{ports.paced}
    {env}
  bench-swap-a:
    cmd: {fake} --port {ports.swap_a} --name swap-a --startup-delay {SWAP_DELAY}
    proxy: http://{HOST}:{ports.swap_a}
    {env}
  bench-swap-b:
    cmd: {fake} --port {ports.swap_b} --name swap-b --startup-delay {SWAP_DELAY}
    proxy: http://{HOST}:{ports.swap_b}
    {env}
"""
    )


# --- wrk (S1, S6) ---------------------------------------------------------------

WRK_LUA = """
wrk.method = "POST"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,' ..
    '"p50_us":%d,"p99_us":%d,"max_us":%d}}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout,
    e.status, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


def cpu_seconds(pid: int) -> float:
    """
    CPU time used so far by all threads of one process, in seconds, from the
    scheduler's nanosecond counters (/proc/<pid>/stat counts 10 ms ticks).
    """
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError), open(task / "schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e9


def wrk(port: int, lua: Path, conns: int, seconds: int, pid: int | None = None) -> dict[str, float]:
    """
    One wrk run. With C{pid}, also that process's CPU time per request: a
    figure that the other load on a shared machine disturbs much less than
    req/s (it does not count time spent waiting for a core).
    """
    cpu_before = cpu_seconds(pid) if pid else 0.0
    cmd = [
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{seconds}s",
        "--timeout",
        "5s",
        "-s",
        str(lua),
        f"http://{HOST}:{port}{CHAT_PATH}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("BENCHJSON "):
            raw = json.loads(line[len("BENCHJSON ") :])
            secs = raw["duration_us"] / 1e6
            cpu = (cpu_seconds(pid) - cpu_before) if pid else float("nan")
            return {
                "cpu_us_per_req": cpu / max(1, raw["requests"]) * 1e6,
                "rps": raw["requests"] / secs,
                "p50_ms": raw["p50_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000,
                "max_ms": raw["max_us"] / 1000,
                "requests": raw["requests"],
                "errors": raw["errors"] + raw["non2xx"],
            }
    raise RuntimeError(f"wrk failed: {out.stdout}\n{out.stderr}")


RSS_PROBE = """
import sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS"))
out = {"python_kb": rss()}
if sys.argv[1] == "no-tls":
    sys.modules["OpenSSL"] = None  # as if pyOpenSSL were not installed
from twisted.scripts import twistd
import twisted.internet.reactor, twisted.web.server, twisted.web.client, treq, yaml, attrs
out["stack_kb"] = rss()
print(out)
"""


def rss_floor() -> dict[str, int]:
    """
    What the proxy cannot go below: RSS of a bare interpreter and of one that
    has imported twistd, twisted.web, the HTTP client, treq and PyYAML, with
    and without pyOpenSSL (treq requires twisted[tls], and Twisted's TCP
    support imports pyOpenSSL eagerly whenever it is installed).
    """
    out: dict[str, int] = {}
    for mode in ("tls", "no-tls"):
        probe = subprocess.run(
            [PY, "-c", RSS_PROBE, mode], capture_output=True, text=True, check=True
        )
        found = json.loads(probe.stdout.strip().replace("'", '"'))
        out["python_kb"] = found["python_kb"]
        out[f"stack_{mode.replace('-', '_')}_kb"] = found["stack_kb"]
    return out


class RssSampler:
    """Peak VmRSS of a process, sampled every 50 ms while active."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(OSError):
                self.peak_kb = max(self.peak_kb, rss_kb(self.pid)["VmRSS"])


# --- streaming client (S2, S3) --------------------------------------------------


@dataclass
class StreamResult:
    status: int
    ttfb: float  # request start to first complete event (or first body byte)
    total: float
    events: int
    nbytes: int
    gaps: list[float]


async def stream_request(
    port: int, body: bytes, headers: dict[str, str], *, count_events: bool = True
) -> StreamResult:
    """
    POST on a fresh connection and time each SSE event's arrival. Decodes
    Content-Length, chunked and read-to-close bodies (the proxy may re-chunk).
    """
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection(HOST, port, limit=1 << 20)
    try:
        head = [
            f"POST {CHAT_PATH} HTTP/1.1",
            f"Host: {HOST}:{port}",
            "Content-Type: application/json",
            "Accept: text/event-stream",
            f"Content-Length: {len(body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items()),
        ]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        raw_head = await reader.readuntil(b"\r\n\r\n")
        lines = raw_head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        times: list[float] = []
        pending = b""
        nbytes = 0
        first_byte = 0.0

        def feed(data: bytes) -> None:
            nonlocal pending, nbytes, first_byte
            now = time.perf_counter()
            if not nbytes:
                first_byte = now
            nbytes += len(data)
            if not count_events:
                return
            pending += data
            n = pending.count(b"\n\n")
            if n:
                times.extend([now] * n)
                pending = pending[pending.rfind(b"\n\n") + 2 :]

        if "chunked" in hdrs.get("transfer-encoding", ""):
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    break
                feed(await reader.readexactly(size))
                await reader.readexactly(2)
        elif "content-length" in hdrs:
            left = int(hdrs["content-length"])
            while left > 0:
                data = await reader.read(min(left, 1 << 18))
                if not data:
                    break
                left -= len(data)
                feed(data)
        else:
            while data := await reader.read(1 << 18):
                feed(data)
        end = time.perf_counter()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    gaps = [b - a for a, b in itertools.pairwise(times)]
    ttfb = (times[0] if times else first_byte or end) - start
    return StreamResult(status, ttfb, end - start, len(times), nbytes, gaps)


def run_streams(
    port: int, body: bytes, headers: dict[str, str], conc: int, batches: int
) -> list[StreamResult]:
    async def main() -> list[StreamResult]:
        out: list[StreamResult] = []
        for _ in range(batches):
            out += await asyncio.gather(*(stream_request(port, body, headers) for _ in range(conc)))
        return out

    return asyncio.run(main())


def download(port: int, body: bytes, headers: dict[str, str]) -> tuple[int, float]:
    """Read a whole response to EOF with recv_into: (bytes, seconds)."""
    req = (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    ).encode() + body
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=60) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.sendall(req)
        while n := s.recv_into(view):
            total += n
    return total, time.perf_counter() - start


# --- /logs/stream listeners (S6), run in a child process -------------------------


def listeners_main(port: int, count: int) -> None:
    """Hold ``count`` /logs/stream connections and drain them until SIGTERM."""
    sel = selectors.DefaultSelector()
    socks = []
    req = f"GET /logs/stream?no-history HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
    for _ in range(count):
        s = socket.create_connection((HOST, port))
        s.sendall(req)
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        socks.append(s)
    heads: dict[int, bytes] = {s.fileno(): b"" for s in socks}
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    received = 0
    statuses: dict[str, int] = {}
    print("ready", flush=True)
    while not stop.is_set():
        for key, _ in sel.select(0.2):
            sock: socket.socket = key.fileobj  # type: ignore[assignment]
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                continue
            if not data:
                sel.unregister(sock)
                continue
            received += len(data)
            fd = sock.fileno()
            if fd in heads:
                heads[fd] += data
                if b"\r\n" in heads[fd]:
                    code = heads.pop(fd).split(b" ", 2)[1].decode()
                    statuses[code] = statuses.get(code, 0) + 1
    print(json.dumps({"bytes": received, "open": len(sel.get_map()), "statuses": statuses}))


# --- the benchmark -----------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.ports = Ports()
        self.procs: list[Proc] = []
        self.results: dict[str, Any] = {}
        self.proxy: Proc | None = None
        self.pids: dict[str, int] = {}  # system -> the process whose CPU time we count
        # The checkout whose proxy is measured (the harness always comes from ROOT).
        self.tree: Path = (args.tree or ROOT).resolve()
        self.rounds: int = args.rounds
        self.dur: int = args.duration
        lua_body = chat_body("bench-nginx").decode().replace("'", "\\'")
        self.lua = tmp / "chat.lua"
        self.lua.write_text(WRK_LUA.format(body=lua_body))

    # systems: name -> port, in the interleaving order
    def systems(self, *, reference: bool = True) -> list[tuple[str, int]]:
        out = [("direct", self.ports.nginx), ("proxy", self.ports.proxy)]
        if reference and self.args.reference:
            out.append(("nginx-proxy", self.ports.nginx_proxy))
            out.append(("twisted-min", self.ports.twisted_min))
        return out

    def spawn(self, name: str, cmd: list[str], cwd: Path = ROOT) -> Proc:
        logf = open(self.tmp / f"{name}.log", "wb")  # closed when we exit
        popen = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=cwd)
        proc = Proc(name, popen)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        write_upstream_files(self.tmp)
        ref = self.ports.nginx_proxy if self.args.reference else None
        (self.tmp / "nginx.conf").write_text(nginx_conf(self.tmp, "nginx", self.ports.nginx, ref))
        (self.tmp / "nginx-logged.conf").write_text(
            nginx_conf(self.tmp, "nginx-logged", self.ports.nginx_logged, None)
        )
        self.proxy = self.start_proxy(
            "proxy", proxy_config(self.ports, self.tmp, tree=self.tree), self.ports.proxy
        )
        self.pids["proxy"] = self.proxy.pid
        self.warm("bench-nginx")  # the proxy starts nginx
        with contextlib.suppress(OSError, ValueError, IndexError):
            master = int((self.tmp / "nginx.pid").read_text())
            children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
            self.pids["direct"] = int(children[0])  # the one nginx worker
        if self.args.reference:
            minimal = [PY, str(ROOT / "bench" / "minimal_relay.py")]
            minimal += ["--port", str(self.ports.twisted_min)]
            minimal += ["--upstream", f"http://{HOST}:{self.ports.nginx}"]
            minimal += ["--raw-body", "--cache-endpoints"]  # the floor, not a strawman
            self.pids["twisted-min"] = self.spawn("twisted-min", minimal).pid
            if not wait_http(self.ports.twisted_min, "/health", time.monotonic() + 10):
                raise RuntimeError("bench/minimal_relay.py did not start")
        log(f"proxy pid {self.proxy.pid} on port {self.ports.proxy}, nginx on {self.ports.nginx}")

    def start_proxy(self, name: str, config: str, port: int) -> Proc:
        cfg = self.tmp / f"{name}.yaml"
        cfg.write_text(config)
        # twistd itself (``python -m twisted`` would be ``twist``, another runner),
        # run the way its console script does; the cwd puts the plugin on sys.path.
        cmd = [PY, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
        cmd += ["llamaswap", "--config", str(cfg), "--listen", f"tcp:{port}:interface={HOST}"]
        proc = self.spawn(name, cmd, cwd=self.tree)
        if not wait_http(port, "/v1/models", time.monotonic() + 30):
            raise RuntimeError(f"{name} did not start:\n" + self.proxy_log_tail(name=name))
        return proc

    def proxy_log_tail(self, n: int = 30, name: str = "proxy") -> str:
        path = self.tmp / f"{name}.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else ""
        )

    def stop(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as e:  # keep stopping the others
                log(f"stopping {proc.name}: {e}")

    def warm(
        self, model: str, headers: dict[str, str] | None = None, port: int | None = None
    ) -> float:
        """One request through the proxy (may start or swap the model)."""
        port = port or self.ports.proxy
        status, data, secs = http_call(port, "POST", CHAT_PATH, chat_body(model), headers, 60)
        if status != 200:
            raise RuntimeError(f"warm-up of {model} got {status}: {data[:300]!r}")
        return secs

    def proxy_rss(self) -> dict[str, int]:
        assert self.proxy is not None
        return rss_kb(self.proxy.pid)

    # S1 ------------------------------------------------------------------------

    def s1(self) -> None:
        log("S1: small chat requests (wrk)")
        self.warm("bench-nginx")
        for _, port in self.systems():
            wrk(port, self.lua, 8, 1)  # warm-up: connections, caches, pool
        out: dict[str, Any] = {}
        peak = 0
        for conns in self.args.concurrency:
            runs: dict[str, list[dict[str, float]]] = {name: [] for name, _ in self.systems()}
            for _ in range(self.rounds):
                for name, port in self.systems():
                    pid = self.pids.get(name)
                    if name == "proxy":
                        assert self.proxy is not None
                        with RssSampler(self.proxy.pid) as sampler:
                            runs[name].append(wrk(port, self.lua, conns, self.dur, pid))
                        peak = max(peak, sampler.peak_kb)
                    else:
                        runs[name].append(wrk(port, self.lua, conns, self.dur, pid))
            out[f"c={conns}"] = {name: summarise_wrk(r) for name, r in runs.items()}
            log(f"  c={conns}: " + fmt_s1(out[f"c={conns}"]))
        self.results["S1"] = out
        self.results.setdefault("S5", {})["load_peak_kb"] = peak

    # S6 ------------------------------------------------------------------------

    def s6(self) -> None:
        """
        A second proxy with logRequests on, so that every request is a line
        that each /logs/stream listener receives; alternate rounds without and
        with the listeners. Its no-listener figure against S1's proxy also
        shows what logRequests itself costs.
        """
        log(f"S6: S1 c=8 with and without {LISTENERS} /logs/stream listeners (logRequests on)")
        port = self.ports.proxy_logged
        config = proxy_config(
            self.ports,
            self.tmp,
            tree=self.tree,
            nginx="nginx-logged",
            log_requests=True,
            fakes=False,
        )
        logged = self.start_proxy("proxy-logged", config, port)
        try:
            self.warm("bench-nginx", port=port)
            wrk(port, self.lua, 8, 1)
            without: list[dict[str, float]] = []
            with_: list[dict[str, float]] = []
            plain: list[dict[str, float]] = []
            info: list[dict[str, Any]] = []
            for _ in range(self.rounds):
                plain.append(wrk(self.ports.proxy, self.lua, 8, self.dur, self.pids["proxy"]))
                without.append(wrk(port, self.lua, 8, self.dur, logged.pid))
                lst = subprocess.Popen(
                    [PY, __file__, "--listeners-child", str(port), str(LISTENERS)],
                    stdout=subprocess.PIPE,
                    text=True,
                )
                try:
                    assert lst.stdout is not None
                    if lst.stdout.readline().strip() != "ready":
                        raise RuntimeError("listener child failed")
                    time.sleep(0.3)  # let the proxy finish the stream set-ups
                    with_.append(wrk(port, self.lua, 8, self.dur, logged.pid))
                finally:
                    lst.send_signal(signal.SIGTERM)
                    stdout, _ = lst.communicate(timeout=10)
                info.append(json.loads(stdout.strip().splitlines()[-1]))
        finally:
            logged.stop()
        a, b = summarise_wrk(without), summarise_wrk(with_)
        self.results["S6"] = {
            "log_requests_off": summarise_wrk(plain),
            "without": a,
            "with_listeners": b,
            "ratio": b["rps"] / a["rps"],
            "listeners": info,
            "bytes_per_request_per_listener": median(
                [
                    i["bytes"] / LISTENERS / max(1, w["requests"])
                    for i, w in zip(info, with_, strict=True)
                ]
            ),
        }
        log(f"  ratio {b['rps'] / a['rps']:.3f}; listeners {info[-1]}")
        if any(i["statuses"] != {"200": LISTENERS} for i in info):
            raise RuntimeError(f"/logs/stream listeners were not all answered 200: {info}")

    # S2 ------------------------------------------------------------------------

    def s2(self) -> None:
        log("S2: SSE, 2,000 events from nginx")
        sse = {"X-Bench": "sse"}
        self.warm("bench-nginx")
        out: dict[str, Any] = {}
        for conc, batches in ((1, 3), (32, 1)):
            runs: dict[str, list[StreamResult]] = {n: [] for n, _ in self.systems()}
            for _ in range(self.rounds):
                for name, port in self.systems():
                    runs[name] += run_streams(
                        port, chat_body("bench-nginx", stream=True), sse, conc, batches
                    )
            out[f"nginx-sse c={conc}"] = {
                n: summarise_streams(r, SSE_EVENTS + 1) for n, r in runs.items()
            }
            log(f"  nginx c={conc}: " + fmt_s2(out[f"nginx-sse c={conc}"]))
        self.results["S2"] = out

    def s2_paced(self) -> None:
        log(f"S2: {PACED_TOKENS} paced tokens {PACED_DELAY * 1000:g} ms apart (fake server)")
        self.warm("bench-paced")
        body = chat_body("bench-paced", stream=True)
        systems = [("direct", self.ports.paced), ("proxy", self.ports.proxy)]
        out = self.results.setdefault("S2", {})
        for conc, batches in ((1, 3), (32, 1)):
            runs: dict[str, list[StreamResult]] = {n: [] for n, _ in systems}
            cpu = 0.0
            for _ in range(self.rounds):
                for name, port in systems:
                    before = cpu_seconds(self.pids["proxy"])
                    runs[name] += run_streams(port, body, {}, conc, batches)
                    if name == "proxy":
                        cpu += cpu_seconds(self.pids["proxy"]) - before
            out[f"paced c={conc}"] = {n: summarise_streams(r, None) for n, r in runs.items()}
            # What relaying one token event costs the proxy (the fake's CPU is its own).
            events = sum(r.events for r in runs["proxy"])
            out[f"paced c={conc}"]["proxy"]["cpu_us_per_event"] = cpu / max(1, events) * 1e6
            log(f"  paced c={conc}: " + fmt_s2(out[f"paced c={conc}"]))

    # S3 ------------------------------------------------------------------------

    def s3(self) -> None:
        """
        One 20 MB answer at a time, 2 + 2 * rounds times per system (the first
        is a warm-up). Also the relaying process's CPU time per MB, which the
        other load on a shared machine disturbs much less than MB/s.
        """
        log(f"S3: {BIG_MB} MB response")
        self.warm("bench-nginx")
        body = chat_body("bench-nginx")
        runs: dict[str, list[float]] = {n: [] for n, _ in self.systems()}
        cpu: dict[str, float] = {n: 0.0 for n, _ in self.systems()}
        mbytes: dict[str, float] = {n: 0.0 for n, _ in self.systems()}
        sizes: dict[str, int] = {}
        for i in range(2 * self.rounds + 2):
            for name, port in self.systems():
                pid = self.pids.get(name)
                before = cpu_seconds(pid) if pid else 0.0
                nbytes, secs = download(port, body, {"X-Bench": "big"})
                if i == 0:
                    continue
                sizes[name] = nbytes
                runs[name].append(nbytes / secs / 1e6)
                cpu[name] += (cpu_seconds(pid) - before) if pid else float("nan")
                mbytes[name] += nbytes / 1e6
        out = {
            n: {
                "mb_s": median(v),
                "runs": [round(x) for x in v],
                "bytes": sizes[n],
                "cpu_ms_per_mb": cpu[n] / mbytes[n] * 1000,
            }
            for n, v in runs.items()
        }
        for n in out:
            out[n]["ratio"] = out[n]["mb_s"] / out["direct"]["mb_s"]
        self.results["S3"] = out
        log("  " + ", ".join(f"{n} {v['mb_s']:.0f} MB/s" for n, v in out.items()))

    # S4 ------------------------------------------------------------------------

    def direct_cycle(self) -> tuple[float, float]:
        """
        Start a fake server by hand as the proxy would (same flags), poll its
        /health every 5 ms: (spawn to first 200, SIGTERM to exit) in seconds.
        """
        port = free_port()
        cmd = [PY, "-m", "llamaswap.fakeserver", "--quiet", "--port", str(port)]
        cmd += ["--name", "direct", "--startup-delay", str(SWAP_DELAY)]
        start = time.perf_counter()
        p = subprocess.Popen(cmd, cwd=self.tree, stdout=subprocess.DEVNULL)
        try:
            while True:
                with contextlib.suppress(OSError):
                    if http_call(port, "GET", "/health", timeout=2)[0] == 200:
                        break
                if p.poll() is not None or time.perf_counter() - start > 20:
                    raise RuntimeError("fake server did not become healthy")
                time.sleep(0.005)
            ready = time.perf_counter()
            p.terminate()
            p.wait(10)
            return ready - start, time.perf_counter() - ready
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()

    def s4(self) -> None:
        """
        Alternate two fake models, and between swaps start and stop the same
        fake server by hand: the upstream's own start-up (and stop) time, under
        the same machine conditions.
        """
        log(f"S4: swap between two fake models healthy {SWAP_DELAY} s after start")
        self.warm("bench-swap-a")
        loaded = [self.warm("bench-swap-a") for _ in range(3)]  # no swap: the plain request cost
        starts: list[float] = []
        stops: list[float] = []
        swaps: list[float] = []
        for i in range(self.args.swaps):
            start, stop = self.direct_cycle()
            starts.append(start)
            stops.append(stop)
            swaps.append(self.warm("bench-swap-b" if i % 2 == 0 else "bench-swap-a"))
        startup, plain = median(starts), median(loaded)
        overhead = median(swaps) - startup - plain
        self.results["S4"] = {
            "direct_startup_s": starts,
            "direct_stop_s": stops,
            "loaded_request_s": loaded,
            "swap_request_s": swaps,
            # The definition: swapped request - upstream start-up (- a plain request).
            "overhead_ms": overhead * 1000,
            "overhead_max_ms": (max(swaps) - startup - plain) * 1000,
            # Also minus stopping the other upstream, which a swap must wait for.
            "overhead_excl_stop_ms": (overhead - median(stops)) * 1000,
        }
        log(
            f"  upstream start {startup * 1000:.0f} ms, stop {median(stops) * 1000:.0f} ms,"
            f" swapped request {median(swaps) * 1000:.0f} ms, overhead {overhead * 1000:.0f} ms"
        )

    # profiling (opt-in) ---------------------------------------------------------

    def profile(self) -> None:
        """py-spy on the proxy during wrk c=8: where the proxy's CPU goes."""
        assert self.proxy is not None
        spy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
        if not Path(spy).exists():
            raise RuntimeError("py-spy not found (pip install py-spy)")
        secs = max(6, self.args.profile)
        log(f"profile: py-spy for {secs} s during wrk c=8")
        self.warm("bench-nginx")
        raw = self.tmp / "py-spy.txt"
        cmd = [spy, "record", "--pid", str(self.proxy.pid), "--rate", "200", "--format", "raw"]
        # Without --idle: only samples where a thread runs (the reactor thread, in
        # practice), so shares are of the proxy's busy time.
        cmd += ["--nonblocking", "--duration", str(secs), "--output", str(raw)]
        spy_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)  # attach
        load = wrk(self.ports.proxy, self.lua, 8, secs - 2, self.proxy.pid)
        _, err = spy_proc.communicate(timeout=60)
        if not raw.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        report = collapse(raw.read_text())
        report["rps_while_profiling"] = load["rps"]
        # From the scheduler, not from py-spy (which misses samples with --nonblocking).
        report["busy_pct"] = load["cpu_us_per_req"] * load["rps"] / 1e4
        self.results["profile"] = report
        log(
            f"  {report['samples']} samples; proxy on a core {report['busy_pct']:.0f} % of the time"
        )

    def run(self) -> None:
        self.start()
        time.sleep(1)
        self.results["S5"] = {"idle_start_kb": self.proxy_rss()["VmRSS"], **rss_floor()}
        steps: list[tuple[str, Callable[[], None]]] = [
            ("S1", self.s1),
            ("S6", self.s6),
            ("S2", self.s2),
            ("S3", self.s3),
            ("S2p", self.s2_paced),
            ("S4", self.s4),
        ]
        if self.args.profile:
            steps.insert(1, ("profile", self.profile))
        only = set(self.args.only or [])
        for name, step in steps:
            if only and name.rstrip("p") not in only and name != "profile":
                continue
            try:
                step()
            except Exception as e:
                log(f"{name} failed: {e!r}")
                self.results.setdefault("errors", {})[name] = repr(e)
            if self.proxy is None or not self.proxy.alive():
                raise RuntimeError("the proxy died:\n" + self.proxy_log_tail())
        time.sleep(1)
        rss = self.proxy_rss()
        self.results["S5"].update(idle_end_kb=rss["VmRSS"], hwm_kb=rss["VmHWM"])


# py-spy's raw output: one collapsed stack per line, "frame;frame;... count".
_LINE_NO = re.compile(r":\d+\)$")
IDLE_FRAMES = ("poll (selectors", "doPoll (twisted/internet/epollreactor", "select (selectors")


def collapse(raw: str, top: int = 25) -> dict[str, Any]:
    """Top functions by own ("self") and by inclusive samples, in percent."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = idle = 0
    for line in raw.splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        # Per function, not per line: "f (path:12)" -> "f (path)".
        frames = [
            _LINE_NO.sub(")", f)
            for f in stack.split(";")
            if not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += count
        if any(marker in frames[-1] for marker in IDLE_FRAMES):
            idle += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count

    def best(table: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])[:top]
        return [(frame, round(100 * n / max(1, total), 2)) for frame, n in ranked]

    return {
        "samples": total,
        "idle_pct": 100 * idle / max(1, total),
        "self": best(own),
        "inclusive": best(incl),
    }


# --- summaries and the table ----------------------------------------------------


def summarise_wrk(runs: list[dict[str, float]]) -> dict[str, Any]:
    return {
        "rps": median([r["rps"] for r in runs]),
        "p50_ms": median([r["p50_ms"] for r in runs]),
        "p99_ms": median([r["p99_ms"] for r in runs]),
        "max_ms": max(r["max_ms"] for r in runs),
        "cpu_us_per_req": median([r["cpu_us_per_req"] for r in runs]),
        "errors": sum(int(r["errors"]) for r in runs),
        "rounds_rps": [round(r["rps"]) for r in runs],
    }


def summarise_streams(runs: list[StreamResult], expect: int | None) -> dict[str, Any]:
    gaps = [g for r in runs for g in r.gaps]
    bad = [r for r in runs if r.status != 200 or (expect is not None and r.events != expect)]
    return {
        "streams": len(runs),
        "bad_streams": len(bad),
        "events_median": median([r.events for r in runs]),
        "ttfb_p50_ms": median([r.ttfb for r in runs]) * 1000,
        "ttfb_max_ms": max(r.ttfb for r in runs) * 1000,
        "gap_p50_ms": pct(gaps, 50) * 1000,
        "gap_p99_ms": pct(gaps, 99) * 1000,
        "gap_max_ms": max(gaps, default=float("nan")) * 1000,
        "total_p50_ms": median([r.total for r in runs]) * 1000,
        "total_max_ms": max(r.total for r in runs) * 1000,
    }


def fmt_s1(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{n} {v['rps']:.0f} req/s p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms"
        + (f" ({v['errors']} errors)" if v["errors"] else "")
        for n, v in row.items()
    )


def fmt_s2(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{n} ttfb {v['ttfb_p50_ms']:.2f} gap p99 {v['gap_p99_ms']:.2f} "
        f"total {v['total_p50_ms']:.1f} ms"
        + (f" ({v['bad_streams']} bad)" if v["bad_streams"] else "")
        for n, v in row.items()
    )


REFERENCES = ("nginx-proxy", "twisted-min")


def table(results: dict[str, Any]) -> str:
    """
    The human summary: one line per measure. "vs direct" is a ratio (x) for
    rates and totals and a difference (ms) for latencies and gaps; the
    reference columns show the same comparison for the reference proxies.
    """
    rows: list[list[str]] = []

    def add(
        what: str, row: dict[str, Any], key: str, fmt: str, cmp: Callable[[float, float], str]
    ) -> None:
        d = row["direct"][key]
        cells = [what, format(d, fmt), format(row["proxy"][key], fmt), cmp(row["proxy"][key], d)]
        for ref in REFERENCES:
            v = row.get(ref, {}).get(key)
            cells.append(f"{format(v, fmt)} ({cmp(v, d)})" if v is not None else "")
        rows.append(cells)

    def note(text: str) -> None:
        rows.append([text, "", "", "", *("" for _ in REFERENCES)])

    for conc, row in results.get("S1", {}).items():
        add(f"S1 {conc} req/s", row, "rps", ".0f", x)
        add(f"S1 {conc} p50 ms", row, "p50_ms", ".2f", plus)
        add(f"S1 {conc} p99 ms", row, "p99_ms", ".2f", plus)
        add(f"S1 {conc} CPU us/req", row, "cpu_us_per_req", ".0f", x)
        if row["proxy"]["errors"]:
            note(f"  !! S1 {conc}: proxy had {row['proxy']['errors']} errors")
    for case, row in results.get("S2", {}).items():
        add(f"S2 {case} ttfb p50 ms", row, "ttfb_p50_ms", ".2f", plus)
        add(f"S2 {case} gap p50 ms", row, "gap_p50_ms", ".2f", plus)
        add(f"S2 {case} gap p99 ms", row, "gap_p99_ms", ".2f", plus)
        add(f"S2 {case} gap max ms", row, "gap_max_ms", ".2f", plus)
        add(f"S2 {case} total p50 ms", row, "total_p50_ms", ".1f", x)
        if "cpu_us_per_event" in row["proxy"]:
            note(f"  S2 {case}: the proxy spent {row['proxy']['cpu_us_per_event']:.0f} us of CPU"
                 " per relayed event")  # fmt: skip
        if row["proxy"]["bad_streams"]:
            note(f"  !! S2 {case}: {row['proxy']['bad_streams']} incomplete or failed streams")
    if "S3" in results:
        add(f"S3 {BIG_MB} MB response MB/s", results["S3"], "mb_s", ".0f", x)
        add(f"S3 {BIG_MB} MB response CPU ms/MB", results["S3"], "cpu_ms_per_mb", ".2f", x)
    if "S4" in results:
        s4 = results["S4"]
        row = {
            "direct": {"ms": median(s4["direct_startup_s"]) * 1000},
            "proxy": {"ms": median(s4["swap_request_s"]) * 1000},
        }
        add("S4 upstream start-up vs swapped request ms", row, "ms", ".0f", plus)
        note(f"  S4 overhead {s4['overhead_ms']:.0f} ms (worst {s4['overhead_max_ms']:.0f} ms);"
             f" {s4['overhead_excl_stop_ms']:.0f} ms once the old upstream's own stop"
             f" ({median(s4['direct_stop_s']) * 1000:.0f} ms) is deducted")  # fmt: skip
    if "S5" in results:
        s5 = results["S5"]
        for k, label in (("idle_start_kb", "idle"), ("load_peak_kb", "peak under S1"),
                         ("idle_end_kb", "idle at end"), ("python_kb", "floor: bare python"),
                         ("stack_tls_kb", "floor: twistd+web+treq"),
                         ("stack_no_tls_kb", "floor: same, no pyOpenSSL")):  # fmt: skip
            if k in s5:
                rows.append([f"S5 proxy RSS {label} MB", "", f"{s5[k] / 1024:.1f}", "", "", ""])
    if "S6" in results:
        s6 = results["S6"]
        row = {"direct": s6["without"], "proxy": s6["with_listeners"]}
        add(f"S6 c=8 req/s: none vs {LISTENERS} log listeners", row, "rps", ".0f", x)
        add(f"S6 c=8 CPU us/req: none vs {LISTENERS} listeners", row, "cpu_us_per_req", ".0f", x)
        row = {"direct": s6["log_requests_off"], "proxy": s6["without"]}
        add("S6 c=8 req/s: logRequests off vs on", row, "rps", ".0f", x)
        note(f"  S6 each listener got {s6['bytes_per_request_per_listener']:.0f} B per request")
    header = ["measure", "direct", "proxy", "proxy vs direct", *REFERENCES]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b and a == a and b == b else "n/a"  # a == a: not NaN


def plus(a: float, b: float) -> str:
    return f"{a - b:+.2f} ms"


def targets(results: dict[str, Any]) -> dict[str, Any]:
    """Each goal from the issue: the measured value and whether it is met."""
    out: dict[str, Any] = {}

    def put(key: str, value: float, ok: bool, unit: str) -> None:
        out[key] = {"target": TARGETS[key], "value": round(value, 3), "unit": unit, "met": ok}

    with contextlib.suppress(KeyError):
        rps = results["S1"]["c=8"]["proxy"]["rps"]
        put("S1 c=8 req/s", rps, rps >= 4000, "req/s")
    with contextlib.suppress(KeyError, ValueError):
        added = max(
            row["proxy"]["gap_p99_ms"] - row["direct"]["gap_p99_ms"]
            for k, row in results["S2"].items()
            if k.startswith("paced")
        )
        put("S2 added gap p99", added, added <= 1.0, "ms")
    with contextlib.suppress(KeyError):
        ratio = results["S3"]["proxy"]["ratio"] * 100
        put("S3 throughput", ratio, ratio >= 30, "% of direct")
    with contextlib.suppress(KeyError):
        ms = results["S4"]["overhead_ms"]
        put("S4 swap overhead", ms, ms <= 100, "ms")
    with contextlib.suppress(KeyError):
        mb = results["S5"]["idle_start_kb"] / 1024
        put("S5 idle RSS", mb, mb <= 40, "MB")
    with contextlib.suppress(KeyError):
        cost = (1 - results["S6"]["ratio"]) * 100
        put("S6 listeners cost", cost, cost <= 10, "%")
    return out


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    mem = ""
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        mem = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("MemTotal")), "")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "mem": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "nginx": subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip(),
        "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("[")[0],
        "twisted": _version("twisted"),
        "treq": _version("treq"),
        "load_avg_at_start": os.getloadavg(),
    }


def git_rev(tree: Path) -> str:
    out = subprocess.run(
        ["git", "describe", "--always", "--dirty"], cwd=tree, capture_output=True, text=True
    )
    return out.stdout.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per measure")
    p.add_argument("--duration", type=int, default=3, help="seconds per wrk run")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--swaps", type=int, default=8, help="swapped requests in S4")
    p.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the reference proxies in S1-S3 (nginx as a reverse proxy, and "
        "bench/minimal_relay.py, the smallest Twisted relay)",
    )
    p.add_argument("--only", nargs="+", choices=["S1", "S2", "S3", "S4", "S6"])
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="SECONDS",
        help="also record py-spy on the proxy for SECONDS during wrk c=8",
    )
    p.add_argument("--quick", action="store_true", help="1 round of 1 s: a smoke test")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    p.add_argument(
        "--tree",
        type=Path,
        default=None,
        help="measure the llamaswap of another checkout (e.g. a branch's worktree)",
    )
    p.add_argument("--listeners-child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.duration, args.swaps = 1, 1, 2
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.listeners_child:
        listeners_main(*args.listeners_child)
        return 0
    for tool in ("nginx", "wrk"):
        if shutil.which(tool) is None:
            print(
                f"bench: {tool} not found (Debian: apt-get install -y nginx wrk)", file=sys.stderr
            )
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="llamaswap-bench-"))
    started = time.time()
    bench = Bench(args, tmp)
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "git": git_rev(bench.tree),
        "tree": str(bench.tree),
        "command": " ".join([Path(PY).name, "bench/run.py", *(argv or sys.argv[1:])]),
        "machine": machine(),
        "settings": {
            "rounds": args.rounds,
            "wrk_seconds": args.duration,
            "concurrency": args.concurrency,
            "sse_events": SSE_EVENTS,
            "big_mb": BIG_MB,
            "paced": [PACED_TOKENS, PACED_DELAY],
            "swap_startup_delay": SWAP_DELAY,
            "listeners": LISTENERS,
        },
    }
    code = 0
    try:
        bench.run()
    except (Exception, KeyboardInterrupt) as e:
        log(f"aborted: {e}")
        code = 1
    finally:
        bench.stop()
        if args.keep or code:
            log(f"logs kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    results = {**meta, "elapsed_s": round(time.time() - started, 1), **bench.results}
    results["targets"] = targets(bench.results)
    out = args.out or RESULTS / time.strftime("%Y%m%d-%H%M%S.json", time.localtime(started))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table(bench.results))
    print()
    for key, t in results["targets"].items():
        mark = "met" if t["met"] else "MISSED"
        print(f"target {key}: {t['value']:g} {t['unit']} (goal {t['target']}): {mark}")
    prof = bench.results.get("profile")
    if prof:
        print(f"\nprofile ({prof['samples']} samples; proxy on a core {prof['busy_pct']:.0f} %):")
        for label in ("self", "inclusive"):
            print(f"  top by {label} time:")
            for frame, share in prof[label][:15]:
                print(f"    {share:5.1f} %  {frame}")
    print(f"\nresults: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    print(f"elapsed: {results['elapsed_s']} s")
    return code


if __name__ == "__main__":
    sys.exit(main())
