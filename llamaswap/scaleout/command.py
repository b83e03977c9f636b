# -*- test-case-name: tests.test_scaleout -*-
"""
C{llamaswap haproxy-config HOST...}: read the hosts' model lists, write
C{haproxy.cfg} and C{llamaswap-models.json} (the front's C{/v1/models}).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from llamaswap.scaleout.haproxy import FrontSettings, render
from llamaswap.scaleout.inventory import InventoryError, fetch_listing, parse_host
from llamaswap.scaleout.plan import Plan, build_plan, union_json

CONFIG_FILE = "haproxy.cfg"
MODELS_FILE = "llamaswap-models.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llamaswap haproxy-config",
        description="Write the HAProxy configuration that puts one address in front of"
        " several llamaswap hosts (docs/scale-out.md). Each host must be running: its"
        " /v1/models says what it serves.",
        allow_abbrev=False,
    )
    parser.add_argument(
        "hosts", nargs="+", metavar="HOST", help="[name=]address:port of a llamaswap host"
    )
    parser.add_argument(
        "--bind", default="127.0.0.1:8080", help="where the front listens (default %(default)s)"
    )
    parser.add_argument(
        "-o",
        "--out",
        default=".",
        metavar="DIR",
        help=f"write DIR/{CONFIG_FILE} and DIR/{MODELS_FILE} (default: here)",
    )
    parser.add_argument(
        "--models-path",
        metavar="PATH",
        help=f"where HAProxy will find {MODELS_FILE}, if not in DIR (an absolute path)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="one of the hosts' apiKeys, to read their lists; the front then asks clients"
        " for one of these keys too (repeat for several)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="longest silence of a host or a client, in seconds (default %(default)g)",
    )
    parser.add_argument(
        "--buffer-size",
        type=int,
        default=1 << 20,
        metavar="BYTES",
        help="largest request body the front reads the model from (default %(default)d)",
    )
    parser.add_argument(
        "--check-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between health checks of each host (default %(default)g)",
    )
    parser.add_argument("--user", help="the user (and group) HAProxy runs as, e.g. haproxy")
    return parser


def main(argv: Sequence[str], out: TextIO = sys.stdout) -> int:
    """Run the command; the exit status (2 for a usage error, 1 for a host that failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.timeout <= 0 or args.check_interval <= 0 or args.buffer_size < 16384:
        parser.error("--timeout and --check-interval must be > 0, --buffer-size >= 16384")
    if any(not k or "'" in k or k != k.strip() or " " in k for k in args.api_key):
        parser.error("an API key may not be empty or contain spaces or quotes")
    folder = os.path.abspath(args.out)
    models_path = args.models_path or os.path.join(folder, MODELS_FILE)
    if "'" in models_path or not os.path.isabs(models_path):
        parser.error("--models-path must be an absolute path without quotes")
    try:
        hosts = [parse_host(h) for h in args.hosts]
        key = args.api_key[0] if args.api_key else None
        plan = build_plan([fetch_listing(h, key) for h in hosts])
    except InventoryError as e:
        sys.stderr.write(f"llamaswap haproxy-config: {e}\n")
        return 1
    settings = FrontSettings(
        models_path=models_path,
        bind=args.bind,
        timeout=args.timeout,
        buffer_size=args.buffer_size,
        check_interval=args.check_interval,
        user=args.user,
        api_keys=tuple(args.api_key),
    )
    os.makedirs(folder, exist_ok=True)
    # The configuration may hold API keys; the list is public anyway.
    _write(os.path.join(folder, CONFIG_FILE), render(plan, settings).encode("utf-8"), 0o640)
    _write(os.path.join(folder, MODELS_FILE), union_json(plan), 0o644)
    out.write(summary(plan, folder))
    return 0


def _write(path: str, data: bytes, mode: int) -> None:
    """Replace C{path} whole, so that a reload never reads half a file."""
    partial = path + ".new"
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(partial, path)


def summary(plan: Plan, folder: str) -> str:
    """What was written, and where each model goes."""
    lines = [f"wrote {os.path.join(folder, CONFIG_FILE)} and {MODELS_FILE}"]
    for route in plan.routes:
        hosts = ", ".join(h.name for h in route.hosts)
        lines.append(f"  {hosts}: {', '.join(route.names)}")
    if plan.skipped:
        lines.append(f"  left out (a quote or control character): {', '.join(plan.skipped)}")
    return "\n".join(lines) + "\n"
