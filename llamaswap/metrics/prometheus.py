# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus' text exposition format, version 0.0.4: metric families in, bytes out.

Pure: no I/O, no clock. A family is its C{# HELP} and C{# TYPE} lines, then one
line per sample, in the order given (callers sort where the order is theirs to
choose). Label values are escaped (backslash, double quote, newline); numbers
that are whole print without a decimal point.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

from attrs import frozen

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

Labels = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


@frozen
class Family:
    """
    One metric: its name, type, help text and samples C{(suffix, labels,
    value)}; the suffix is "" except for a summary's or histogram's C{_sum}
    and C{_count}, and a histogram's C{_bucket}.
    """

    name: str
    kind: str  # counter, gauge, summary, histogram
    help: str
    samples: tuple[tuple[str, Labels, float], ...] = ()

    def lines(self) -> Iterator[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for suffix, labels, value in self.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
            braces = f"{{{text}}}" if text else ""
            yield f"{self.name}{suffix}{braces} {_number(value)}"


def family(
    name: str, kind: str, help: str, samples: Iterable[tuple[dict[str, str], float]] = ()
) -> Family:
    """A L{Family} from samples whose labels are dicts (kept in their order)."""
    return Family(name, kind, help, tuple(("", tuple(labels.items()), v) for labels, v in samples))


def gauge(name: str, help: str, value: float) -> Family:
    """A L{Family} of one unlabelled gauge sample."""
    return family(name, "gauge", help, [({}, value)])


def summary(name: str, help: str, values: dict[str, list[float]]) -> Family:
    """A summary without quantiles, by model: C{values[model] = [sum, count]}."""
    samples = []
    for model, (total, count) in sorted(values.items()):
        labels = (("model", model),)
        samples += [("_sum", labels, total), ("_count", labels, count)]
    return Family(name, "summary", help, tuple(samples))


def histogram(
    name: str,
    help: str,
    bounds: Sequence[float],
    counts: Iterable[tuple[str, Sequence[int], float]],
) -> Family:
    """
    A histogram by model: C{counts} holds C{(model, per-bucket counts, sum)},
    where the counts are one per bound of C{bounds} and one more for C{+Inf},
    each counting only its own bucket. They are written cumulative, as the
    format wants: C{_bucket{le=...}} for each bound and C{+Inf}, then C{_sum}
    and C{_count}.
    """
    samples: list[tuple[str, Labels, float]] = []
    edges = [_number(bound) for bound in bounds] + ["+Inf"]
    for model, buckets, total in counts:
        labels = (("model", model),)
        seen = 0
        for edge, count in zip(edges, buckets, strict=True):
            seen += count
            samples.append(("_bucket", (*labels, ("le", edge)), seen))
        samples += [("_sum", labels, total), ("_count", labels, seen)]
    return Family(name, "histogram", help, tuple(samples))


def exposition(families: Iterable[Family]) -> bytes:
    """The text exposition of C{families}."""
    return ("\n".join(line for f in families for line in f.lines()) + "\n").encode("utf-8")
