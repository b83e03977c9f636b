"""The swap scheduler on simulated request traces: a Markdown table for docs/swapping.md.

    python bench/scheduler.py [--trace NAME ...] [--load S ...] [--policy today|new|both]
                              [--queue YAML] [--duration S] [--seconds S] [--seed N] [--tree DIR]

Each trace (llamaswap/testing/simulator.py) runs on the real supervisor with fake model
servers and a fake clock, for --seconds of simulated time (600 s by default; a run takes
about a second of CPU). Policies: "today" is the scheduler before issue 11 (no request is
ever due, no residency, no queue bounds), "new" the defaults; --queue adds a policy of your
own, e.g. --queue "{maxWait: 30, minResidency: 5}"; --memory 40 60 adds memory admission
on one 40 GiB and one 60 GiB device (each model 20 GiB: two or all three fit). --duration
sets how long each request holds its model (default: the trace's own, 1 s, or 2 s for
hot_rare and hot_alone).

Columns: model starts; starts per 100 granted requests; the share of time some model is
ready, and ready with a request in flight; completed requests per second (total, then per
model); per model, the wait from request to lease, p50/p99/max in seconds, where a request
still queued at the end counts with its age; requests refused (429) or timed out (503).

--tree DIR runs the same simulator with another checkout's llamaswap (e.g. the one before
issue 11). A tree that does not know the queue: keys rejects "today"; its own defaults are
the "new" policy's empty fragment, labelled "defaults@DIR".
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SIMULATOR = ROOT / "llamaswap" / "testing" / "simulator.py"
TRACE_NAMES = (
    "uniform",
    "weighted",
    "weighted_open",
    "weighted_think",
    "hot_rare",
    "hot_two_rare",
    "hot_alone",
    "bursts",
)


def load_simulator(tree: str | None) -> ModuleType:
    """This checkout's simulator, on this checkout's llamaswap or on C{tree}'s."""
    if tree is None:
        sys.path.insert(0, str(ROOT))
        from llamaswap.testing import simulator

        return simulator
    sys.path.insert(0, os.path.abspath(tree))
    spec = importlib.util.spec_from_file_location("scheduler_simulator", SIMULATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def policies(sim: ModuleType, args: argparse.Namespace) -> dict[str, str]:
    """Row label -> config fragment."""
    names = ("today", "new") if args.policy == "both" else (args.policy,)
    chosen = {name: sim.POLICIES[name] for name in names}
    if args.queue:
        chosen["queue: " + args.queue] = f"queue: {args.queue}\n"
    for budget in args.memory or ():
        chosen[f"memory {budget:g} GiB"] = sim.memory_policy(budget)
    if args.tree:
        where = os.path.basename(os.path.abspath(args.tree))
        chosen = {f"{name if text else 'defaults'}@{where}": text for name, text in chosen.items()}
    return chosen


def cell(values: list[float]) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def row(report: Any, load: float, policy: str, models: list[str]) -> str:
    """One table row for C{report}."""
    mine = {m.model: m for m in report.models}
    rates = "/".join(f"{mine[m].throughput:.2f}" for m in models if m in mine)
    waits = [
        cell([mine[m].wait_p50, mine[m].wait_p99, mine[m].wait_max])
        if m in mine and mine[m].requests
        else "-"
        for m in models
    ]
    refused = [sum(m.refused.get(status, 0) for m in report.models) for status in (429, 503)]
    cells = [
        report.trace,
        f"{load:g}",
        policy,
        str(report.swaps),
        f"{report.swaps_per_100:.1f}",
        f"{100 * report.ready:.1f}",
        f"{100 * report.serving:.1f}",
        f"{report.throughput:.2f} ({rates})",
        *waits,
        f"{refused[0]}/{refused[1]}",
    ]
    return "| " + " | ".join(cells) + " |"


def header(models: list[str]) -> list[str]:
    names = ["trace", "load s", "policy", "swaps", "swaps/100 req", "ready %", "serving %"]
    names += [f"req/s ({'/'.join(models)})", *(f"wait {m} p50/p99/max s" for m in models)]
    names.append("429/503")
    return ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace", nargs="+", choices=TRACE_NAMES, default=list(TRACE_NAMES))
    parser.add_argument("--load", nargs="+", type=float, default=[0.3, 20.0], help="seconds")
    parser.add_argument(
        "--policy", choices=("today", "new", "both"), help="default: both; with --tree: new"
    )
    parser.add_argument("--queue", help="a policy of your own: the value of queue: in YAML")
    parser.add_argument(
        "--memory",
        nargs="+",
        type=float,
        help="memory admission policies: one device of this many GiB, 20 GiB per model",
    )
    parser.add_argument("--duration", type=float, help="seconds each request holds its model")
    parser.add_argument("--seconds", type=float, default=600.0, help="simulated time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tree", help="a checkout whose llamaswap to simulate")
    args = parser.parse_args()
    if args.policy is None:
        args.policy = "new" if args.tree else "both"
    sim = load_simulator(args.tree)
    chosen = policies(sim, args)
    models = ["a", "b", "c"]
    print("\n".join(header(models)))
    for name in args.trace:
        for load in args.load:
            kwargs = {} if args.duration is None else {"duration": args.duration}
            trace = sim.TRACES[name](load, **kwargs)
            for label, text in chosen.items():
                try:
                    report = sim.simulate(trace, text, args.seconds, args.seed)
                except Exception as e:
                    print(f"{name} {load:g} {label}: {e}", file=sys.stderr)
                    continue
                print(row(report, load, label, models), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
