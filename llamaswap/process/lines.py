# -*- test-case-name: tests.test_process -*-
"""
A child's stdout and stderr as text lines, with a bounded buffer.

Not Twisted's C{LineOnlyReceiver}: it needs a transport per stream (a process
protocol has one for all its pipes), drops the rest of a chunk after a line
that is too long, and keeps an endless partial line; here a long line is cut
and the lines after it still come, CR before LF is dropped, and an
unterminated last line is passed on at the end.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

MAX_LINE_BYTES = 16 * 1024  # longer lines are cut (log observers must cope with each line)
TAIL_LINES = 20  # child output lines kept for error messages


class LineSplitter:
    """Split a byte stream into text lines; bounded partial-line buffer."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self._emit = emit
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, rest = (self._partial + data).split(b"\n")
        for line in lines:
            self._emit(_decode(_cut(line)))
        if len(rest) > MAX_LINE_BYTES:
            self._emit(_decode(_cut(rest)))  # an endless line must not eat our memory
            rest = b""
        self._partial = rest

    def flush(self) -> None:
        if self._partial:
            partial, self._partial = self._partial, b""
            self._emit(_decode(partial))


def _cut(line: bytes) -> bytes:
    if len(line) <= MAX_LINE_BYTES:
        return line
    return line[:MAX_LINE_BYTES] + b" [%d bytes cut]" % (len(line) - MAX_LINE_BYTES)


def _decode(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


class LineProtocol(ProcessProtocol):
    """A child whose stdout and stderr are passed on line by line, as C{on_line(stream, line)}."""

    def __init__(self, on_line: Callable[[str, str], None]) -> None:
        self._splitters = {
            1: LineSplitter(lambda line: on_line("stdout", line)),
            2: LineSplitter(lambda line: on_line("stderr", line)),
        }

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        splitter = self._splitters.get(childFD)
        if splitter is not None:
            splitter.feed(data)

    def flush_lines(self) -> None:
        """Pass on an unterminated last line of each stream (call at processEnded)."""
        for splitter in self._splitters.values():
            splitter.flush()


class OutputTail:
    """
    A model's child output: each line is logged to C{llamaswap.upstream.<model>}
    (the text as a field, never as the format), and the last L{TAIL_LINES}
    are kept for error messages.
    """

    def __init__(self, model_id: str) -> None:
        self._model_id = model_id
        self._log = Logger(namespace=f"llamaswap.upstream.{model_id}")
        self._lines: deque[str] = deque(maxlen=TAIL_LINES)

    def add(self, stream: str, line: str) -> None:
        self._lines.append(line)
        self._log.info("{line}", line=line, model=self._model_id, stream=stream)

    def lines(self) -> list[str]:
        return list(self._lines)

    def clear(self) -> None:
        self._lines.clear()

    def text(self) -> str:
        """The tail as the end of an error message."""
        if not self._lines:
            return " (no output)"
        return "; last output:\n" + "\n".join(self._lines)
