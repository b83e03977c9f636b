# -*- test-case-name: tests.test_metrics,tests.test_relay,tests.test_stream_outcomes -*-
"""A strict reader of the Prometheus text format that C{/metrics} serves."""

from __future__ import annotations

import re

SAMPLE = re.compile(
    r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([a-zA-Z_][a-zA-Z0-9_]*="([^"\\\n]|\\[\\"n])*",?)*\})? '
    r"(-?[0-9.e+-]+|NaN|[+-]Inf)"
)


def parse_exposition(text: str) -> dict[str, float]:
    """
    Check the text format strictly enough (every sample parses and follows its
    TYPE line); return C{{"name{labels}": value}}.
    """
    assert text.endswith("\n")
    typed: set[str] = set()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            assert kind in ("counter", "gauge", "summary"), line
            typed.add(name)
            continue
        if line.startswith("# HELP "):
            continue
        match = SAMPLE.fullmatch(line)
        assert match, f"not a sample line: {line!r}"
        name = match.group(1)
        assert name in typed or re.sub(r"_(sum|count)$", "", name) in typed, line
        key, _, value = line.rpartition(" ")
        assert key not in samples, f"duplicate sample {key}"
        samples[key] = float(value)
    return samples
