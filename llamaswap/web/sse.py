# -*- test-case-name: tests.test_relay -*-
"""Server-sent events framing: the one framer every stream uses (the fake server's too).

A frame is C{event: <kind>\\n} (optional) then C{data: <payload>\\n} and a blank line. Our
payloads are single-line JSON, so one C{data:} line always carries the whole payload.

It imports nothing: the fake server frames its streams with it and must start fast.
"""

from __future__ import annotations

DONE = b"data: [DONE]\n\n"
RETRY_2S = b"retry: 2000\n\n"


def frame(data: bytes, event: bytes | None = None) -> bytes:
    """One event carrying C{data} (a single line), named C{event} when given."""
    if event is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + event + b"\ndata: " + data + b"\n\n"
