#!/usr/bin/env python3
"""
Instructions per proxied request, counted by valgrind's callgrind.

Wall-clock figures on a shared 2-core machine move by 30 % from one minute to
the next; instruction counts do not (the same code and inputs give the same
count to within about 1 %). This is how the per-change savings in
docs/performance.md were measured:

    .venv/bin/python bench/instructions.py                  # this checkout
    .venv/bin/python bench/instructions.py --tree ../other  # another one
    .venv/bin/python bench/instructions.py --minimal        # bench/minimal_relay.py

The proxy runs as ``twistd -n llamaswap`` under callgrind with instrumentation
off; it starts nginx as its model's server, gets 200 warm-up requests, then
instrumentation is switched on for N sequential small chat requests on one
keep-alive connection. Needs Debian's valgrind and nginx. About 30 s.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # bench/run.py: ports, nginx config, request body


def send(port: int, count: int) -> None:
    conn = http.client.HTTPConnection(run.HOST, port, timeout=60)
    body = run.chat_body("bench-nginx")
    for _ in range(count):
        conn.request("POST", run.CHAT_PATH, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    conn.close()


def wait_ready(port: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, RuntimeError):
            send(port, 1)
            return
        time.sleep(0.5)
    raise RuntimeError("the relay did not answer")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--tree", type=Path, default=run.ROOT, help="checkout to measure")
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--minimal", action="store_true", help="measure bench/minimal_relay.py")
    p.add_argument("--minimal-flags", default="--raw-body --cache-endpoints")
    args = p.parse_args()
    for tool in ("valgrind", "callgrind_control", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (Debian: apt-get install -y valgrind nginx)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="llamaswap-callgrind-"))
    ports = run.Ports()
    (tmp / "nginx.conf").write_text(run.nginx_conf(tmp, "nginx", ports.nginx, None))
    nginx = None
    if args.minimal:
        nginx = subprocess.Popen(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)])
        target = [run.PY, str(run.ROOT / "bench" / "minimal_relay.py")]
        target += ["--port", str(ports.proxy), "--upstream", f"http://{run.HOST}:{ports.nginx}"]
        target += args.minimal_flags.split()
        cwd = run.ROOT
    else:
        config = tmp / "llamaswap.yaml"
        config.write_text(
            "models:\n  bench-nginx:\n"
            f"    cmd: nginx -c {tmp}/nginx.conf -p {tmp}\n"
            f"    proxy: http://{run.HOST}:{ports.nginx}\n"
        )
        target = [run.PY, "-c", "from twisted.scripts.twistd import run; run()"]
        target += ["-n", "--pidfile=", "llamaswap", "--config", str(config)]
        target += ["--listen", f"tcp:{ports.proxy}:interface={run.HOST}"]
        cwd = args.tree.resolve()
    out = tmp / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no"]
    valgrind += [f"--callgrind-out-file={out}.%p"]
    log = open(tmp / "relay.log", "wb")  # closed when we exit
    proc = subprocess.Popen(valgrind + target, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_ready(ports.proxy, 120)
        send(ports.proxy, 200)
        control = ["callgrind_control"]
        subprocess.run([*control, "-i", "on", str(proc.pid)], check=True, capture_output=True)
        send(ports.proxy, args.requests)
        subprocess.run([*control, "-i", "off", str(proc.pid)], check=True, capture_output=True)
        subprocess.run([*control, "-d", str(proc.pid)], check=True, capture_output=True)
        time.sleep(1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        if nginx is not None:
            nginx.terminate()
            nginx.wait(10)
    total = 0
    for dump in tmp.glob("callgrind.out.*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith("totals:"):
                total += int(line.split()[1])
    shutil.rmtree(tmp, ignore_errors=True)
    what = "bench/minimal_relay.py " + args.minimal_flags if args.minimal else str(cwd)
    print(f"{what}: {total / args.requests / 1e6:.3f} M instructions per request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
