# -*- test-case-name: tests.test_metrics,tests.test_relay,tests.test_stream_outcomes -*-
"""A strict reader of the Prometheus text format that C{/metrics} serves."""

from __future__ import annotations

import re

SAMPLE = re.compile(
    r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
    r"(-?[0-9.e+-]+|NaN|[+-]Inf)"
)
LE = re.compile(r',?le="([^"]*)"')


def parse_exposition(text: str) -> dict[str, float]:
    """
    Check the text format strictly enough (every sample parses and follows its
    TYPE line; a histogram's buckets are cumulative, end with C{+Inf} and agree
    with its C{_count}); return C{{"name{labels}": value}}.
    """
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "summary", "histogram"), line
            assert name not in typed, f"two TYPE lines for {name}"
            typed[name] = kind
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name = match.group(1)
        base = re.sub(r"_(sum|count|bucket)$", "", name)
        if name not in typed:
            assert base in typed, line
            suffixes = (
                ("_sum", "_count", "_bucket") if typed[base] == "histogram" else ("_sum", "_count")
            )
            assert typed[base] in ("summary", "histogram"), line
            assert name[len(base) :] in suffixes, line
        key, _, value = line.rpartition(" ")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    for name, kind in typed.items():
        if kind == "histogram":
            check_histogram(name, samples)
    return samples


def check_histogram(name: str, samples: dict[str, float]) -> None:
    """Each series' buckets grow with C{le}, end with C{+Inf}, which equals its C{_count}."""
    series: dict[str, list[tuple[float, float]]] = {}
    for key, value in samples.items():
        if not key.startswith(name + "_bucket{"):
            continue
        labels = key[len(name + "_bucket") :]
        le = LE.search(labels)
        assert le, f"a bucket without le: {key}"
        rest = LE.sub("", labels, count=1).replace("{,", "{").replace("{}", "")
        series.setdefault(rest, []).append((float(le.group(1)), value))
    for labels, buckets in series.items():
        counts = [count for _, count in sorted(buckets)]
        assert counts == sorted(counts), f"{name}{labels}: buckets not cumulative: {buckets}"
        assert max(bound for bound, _ in buckets) == float("inf"), f"{name}{labels}: no +Inf"
        assert samples[f"{name}_count{labels}"] == counts[-1], f"{name}{labels}: +Inf != _count"
        assert f"{name}_sum{labels}" in samples, f"{name}{labels}: no _sum"
