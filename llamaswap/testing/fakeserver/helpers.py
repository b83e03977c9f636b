# -*- test-case-name: tests.test_fakeserver -*-
"""
Deterministic helpers of the fake server: durations, compact JSON, token text, word counts,
embeddings and rerank scores. Pure functions of their arguments (no request, no clock), so the
same input always gives the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct

EMBEDDING_DIM = 8
# 1x1 transparent PNG: what the image endpoints hand back.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


def parse_duration(text: str) -> float:
    """
    Seconds from C{"0.5"}, C{"500ms"}, C{"2s"} or C{"1m"} (Go-style suffixes,
    so tests ported from llama-swap keep working).

    @raise ValueError: unparseable or negative.
    """
    units = (("ms", 0.001), ("us", 0.000001), ("s", 1.0), ("m", 60.0))
    for suffix, scale in units:
        if text.endswith(suffix):
            value = float(text[: -len(suffix)]) * scale
            break
    else:
        value = float(text)
    if not value >= 0:
        raise ValueError(f"bad duration: {text!r}")
    return value


def dumps(obj: object) -> bytes:
    """Compact JSON (no spaces), UTF-8: one line, as an SSE C{data:} payload needs."""
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def token_text(name: str, i: int) -> str:
    """The C{i}-th token of every generation by the server called C{name}."""
    text = f"Hello from {name} (token {i})"
    return text if i == 0 else " " + text


def full_text(name: str, n: int) -> str:
    """The first C{n} tokens, joined: the whole answer of a non-streamed generation."""
    return "".join(token_text(name, i) for i in range(n))


def words(value: object) -> int:
    """A rough token count of any JSON value (words in its strings)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, list):
        return sum(words(v) for v in value)
    if isinstance(value, dict):
        return sum(words(v) for v in value.values())
    return 0


def embedding(text: str) -> list[float]:
    """A deterministic unit vector of dimension 8, rounded to float32."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [(b - 127.5) / 127.5 for b in digest[:EMBEDDING_DIM]]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    packed = struct.pack(f"<{EMBEDDING_DIM}f", *(v / norm for v in raw))
    return list(struct.unpack(f"<{EMBEDDING_DIM}f", packed))


def embedding_base64(vector: list[float]) -> str:
    """C{vector} as OpenAI's C{encoding_format: base64} sends it (little-endian float32)."""
    packed = struct.pack(f"<{EMBEDDING_DIM}f", *vector)
    return base64.b64encode(packed).decode("ascii")


def relevance(query: str, text: str) -> float:
    """
    The share of C{query}'s words found in C{text}, plus a tiny deterministic
    tie-breaker that keeps equal overlaps ordered.
    """
    query_words = set(query.lower().split())
    overlap = len(query_words & set(text.lower().split())) / (len(query_words) or 1)
    return overlap + hashlib.sha256(text.encode("utf-8")).digest()[0] / 1e5
