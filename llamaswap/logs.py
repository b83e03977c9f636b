# -*- test-case-name: tests.test_logs -*-
"""
The log hub: byte-bounded history and live fan-out of log lines.

L{LogHub} is a C{twisted.logger} observer. It sorts every event into streams:

  - C{"proxy"}: everything that is not child output (llamaswap's own events,
    Twisted's, the access log), at or above C{config.log_level}, formatted as
    C{[LEVEL] message};
  - C{"upstream"}: every child's output line, prefixed with C{[model id]};
  - one stream per configured model id: that child's raw output lines;
  - C{"combined"}: what C{/logs} and C{/logs/stream} show, chosen by
    C{logToStdout} the way llama-swap HEAD does (proxy, upstream, both, none).

Child output arrives as events in namespace C{llamaswap.upstream.<model id>}
with fields C{line}, C{model} and C{stream}.

The observer runs inline on every log call in the process, so it is total: it
never raises, never blocks (subscribers only buffer) and never logs. Events
logged from other threads are handed to the reactor thread first, because
subscribers write to sockets.

C{logToStdout} also decides what twistd's own log gets. twistd attaches its
file observer to C{globalLogPublisher} before any service starts, so in
L{LogHub.startService} every observer already registered is swapped, in
place, for a L{_FilteredObserver} that forwards only the chosen events; the
wrapper compares equal to the observer it wraps, so the owner can still
remove it, and L{LogHub.stopService} puts the originals back.

twistd's C{--logfile} rotates at 1 MB and never deletes a rotated file; at
start the hub sets C{logRotation}'s size and count on that file instead.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorFromThreads
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    LogPublisher,
    formatEvent,
    globalLogPublisher,
)
from twisted.python import threadable
from twisted.python.logfile import LogFile
from zope.interface import implementer

from llamaswap._twisted import publisher_observers, rotating_log_file
from llamaswap.config import Config, LogRotation
from llamaswap.events import EventBus
from llamaswap.names import Resolver

UPSTREAM_NAMESPACE = "llamaswap.upstream"
PROXY = "proxy"
UPSTREAM = "upstream"
COMBINED = "combined"

LineCallback = Callable[[bytes], None]
CloseCallback = Callable[[], None]

_LEVELS = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}


def is_upstream_event(event: LogEvent) -> bool:
    """True for a child-output event (namespace C{llamaswap.upstream.*})."""
    namespace = event.get("log_namespace")
    return isinstance(namespace, str) and (
        namespace == UPSTREAM_NAMESPACE or namespace.startswith(UPSTREAM_NAMESPACE + ".")
    )


class LogStream:
    """
    One stream: a byte-bounded history of lines plus live subscribers.

    Each entry is one log event: UTF-8, ending in a newline (a traceback is
    one entry of several lines). Oldest entries go first when the history
    would exceed C{limit} bytes; an entry alone larger than the limit is cut.
    """

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit
        self._entries: deque[bytes] = deque()
        self._size = 0
        self._subscribers: dict[int, tuple[LineCallback, CloseCallback | None]] = {}
        self._next_key = 0

    @property
    def size(self) -> int:
        """Bytes of history held."""
        return self._size

    def history(self) -> list[bytes]:
        """The held entries, oldest first."""
        return list(self._entries)

    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def subscribe(
        self, on_line: LineCallback, on_close: CloseCallback | None = None
    ) -> Callable[[], None]:
        """Call C{on_line(entry)} for each new entry; return an idempotent unsubscribe."""
        key = self._next_key
        self._next_key += 1
        self._subscribers[key] = (on_line, on_close)

        def unsubscribe() -> None:
            self._subscribers.pop(key, None)

        return unsubscribe

    def append(self, entry: bytes) -> None:
        """Store C{entry} and hand it to every subscriber; never raises."""
        if len(entry) > self.limit:
            entry = entry[: self.limit - 1] + b"\n"
        self._entries.append(entry)
        self._size += len(entry)
        while self._size > self.limit:
            self._size -= len(self._entries.popleft())
        for key, (on_line, _) in list(self._subscribers.items()):
            try:
                on_line(entry)
            except Exception:
                # A broken subscriber is dropped; logging here would recurse.
                self._subscribers.pop(key, None)

    def close(self) -> None:
        """End every subscription (the hub is stopping)."""
        subscribers, self._subscribers = self._subscribers, {}
        for _, on_close in subscribers.values():
            if on_close is not None:
                try:
                    on_close()
                except Exception:
                    pass


@implementer(ILogObserver)
class _FilteredObserver:
    """
    Forward to C{observer} only the events C{accept} passes.

    Compares equal to the wrapped observer, so C{removeObserver(original)}
    removes the wrapper and C{addObserver(original)} does not add it twice.
    """

    def __init__(self, observer: ILogObserver, accept: Callable[[LogEvent], bool]) -> None:
        self.observer = observer
        self._accept = accept

    def __call__(self, event: LogEvent) -> None:
        if self._accept(event):
            self.observer(event)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, _FilteredObserver):
            return self.observer == other.observer
        return bool(self.observer == other)

    def __hash__(self) -> int:
        return hash(self.observer)


@implementer(ILogObserver)
class LogHub(Service):
    """The log observer service; see the module docstring."""

    log = Logger()

    def __init__(
        self,
        config: Config,
        *,
        events: EventBus | None = None,
        publisher: LogPublisher | None = None,
        reactor: IReactorFromThreads | None = None,
    ) -> None:
        self.config = config
        # Events logged by a worker thread hop over to the reactor thread through it
        # (None: the global reactor, looked up when the first such event comes).
        self._reactor = reactor
        self._names = Resolver(config)
        self.events = events
        self._publisher = publisher if publisher is not None else globalLogPublisher
        self._level = _LEVELS.get(config.log_level.lower(), LogLevel.info)
        self._mode = config.log_to_stdout
        limit = config.log_history_bytes
        self.streams: dict[str, LogStream] = {
            name: LogStream(name, limit) for name in (PROXY, UPSTREAM, COMBINED)
        }
        for model_id in config.models:
            if model_id not in self.streams:
                self.streams[model_id] = LogStream(model_id, limit)
        self._delivering = False
        self._pending: deque[LogEvent] = deque()
        self._wrapped: list[_FilteredObserver] = []
        self.internal_errors = 0

    def reconfigure(self, config: Config) -> None:
        """
        A reload: the level, what goes to stdout and the model names apply from
        now; a new model gets its stream (removed ones keep theirs, with their
        history). C{logHistoryBytes} applies to new streams only; C{logRotation}
        to twistd's log file.
        """
        self.config = config
        self._names = Resolver(config)
        self._level = _LEVELS.get(config.log_level.lower(), LogLevel.info)
        self._mode = config.log_to_stdout
        for model_id in config.models:
            if model_id not in self.streams:
                self.streams[model_id] = LogStream(model_id, config.log_history_bytes)
        if self.running:
            self._bound_log_files()  # logRotation: rotates at the next write if over the size

    # --- lookups used by the web resources ---------------------------------

    def resolve(self, name: str) -> str | None:
        """
        Map a requested stream name to a stream: C{""} is the combined stream;
        C{proxy}, C{upstream}, a model id or one of its aliases. None if unknown.
        """
        if name == "":
            return COMBINED
        if name in (PROXY, UPSTREAM) or (name != COMBINED and name in self.streams):
            return name
        model = self._names.find_model(name)
        if model is not None and model.id in self.streams:
            return model.id
        return None

    def stream(self, name: str) -> LogStream:
        """The stream called C{name} (as returned by L{resolve})."""
        return self.streams[name]

    def history(self, name: str = COMBINED) -> bytes:
        return b"".join(self.streams[name].history())

    def subscribe(
        self, name: str, on_line: LineCallback, on_close: CloseCallback | None = None
    ) -> Callable[[], None]:
        return self.streams[name].subscribe(on_line, on_close)

    # --- what twistd's own log gets -------------------------------------------

    def accepts_for_stdout(self, event: LogEvent) -> bool:
        """
        Whether twistd's log should get C{event} under C{logToStdout}.

        Critical events (unhandled errors) always pass: silencing them would
        hide crashes.
        """
        try:
            level = event.get("log_level", LogLevel.info)
            if level is LogLevel.critical:
                return True
            if is_upstream_event(event):
                return self._mode in ("upstream", "both")
            return self._mode in ("proxy", "both") and _at_least(level, self._level)
        except Exception:
            return True

    def _bound_log_files(self) -> None:
        """Apply C{logRotation} to twistd's log file, if it writes to one."""
        for observer in publisher_observers(self._publisher) or ():
            if isinstance(observer, _FilteredObserver):
                observer = observer.observer
            log_file = rotating_log_file(observer)
            if log_file is not None:
                bound_log_file(log_file, self.config.log_rotation)

    def _wrap_existing_observers(self) -> None:
        if self._mode == "both" and self._level is LogLevel.debug:
            return  # nothing to filter
        observers = publisher_observers(self._publisher)
        if observers is None:
            self.log.warn("cannot filter twistd's log: unknown LogPublisher layout")
            return
        for index, observer in enumerate(observers):
            if observer is self or isinstance(observer, _FilteredObserver):
                continue
            wrapper = _FilteredObserver(observer, self.accepts_for_stdout)
            observers[index] = wrapper
            self._wrapped.append(wrapper)

    def _unwrap_observers(self) -> None:
        observers = publisher_observers(self._publisher)
        wrapped, self._wrapped = self._wrapped, []
        if observers is None:
            return
        for wrapper in wrapped:
            for index, observer in enumerate(observers):
                if observer is wrapper:
                    observers[index] = wrapper.observer
                    break

    # --- service ----------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._publisher.addObserver(self)
        self._bound_log_files()
        self._wrap_existing_observers()

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        self._publisher.removeObserver(self)
        self._unwrap_observers()
        for stream in self.streams.values():
            stream.close()

    # --- the observer -------------------------------------------------------------

    def __call__(self, event: LogEvent) -> None:
        """Sort C{event} into streams. Total: never raises, never logs."""
        if threadable.ioThread is not None and not threadable.isInIOThread():
            # Logged from a worker thread: subscribers write to sockets, which
            # only the reactor thread may touch. Hop over, keeping the event.
            try:
                reactor = self._reactor
                if reactor is None:
                    from twisted.internet import reactor
                reactor.callFromThread(self, event)
            except Exception:
                self.internal_errors += 1
            return
        if self._delivering:
            # A subscriber's write logged something: keep order, deliver after.
            self._pending.append(event)
            return
        self._delivering = True
        try:
            self._observe(event)
            while self._pending:
                self._observe(self._pending.popleft())
        finally:
            self._delivering = False

    def _observe(self, event: LogEvent) -> None:
        try:
            if is_upstream_event(event):
                self._observe_upstream(event)
            else:
                self._observe_proxy(event)
        except Exception:
            self.internal_errors += 1

    def _observe_upstream(self, event: LogEvent) -> None:
        line = event.get("line")
        text = (formatEvent(event) if line is None else str(line)).rstrip("\r\n")
        model = event.get("model")
        if not isinstance(model, str):
            namespace: str = event["log_namespace"]
            model = namespace[len(UPSTREAM_NAMESPACE) + 1 :]
        raw = (text + "\n").encode("utf-8", "replace")
        stream = self.streams.get(model)
        if stream is not None and model not in (PROXY, UPSTREAM, COMBINED):
            stream.append(raw)
        tagged = f"[{model}] {text}\n".encode("utf-8", "replace")
        self.streams[UPSTREAM].append(tagged)
        if self._mode in ("upstream", "both"):
            self.streams[COMBINED].append(tagged)

    def _observe_proxy(self, event: LogEvent) -> None:
        level = event.get("log_level", LogLevel.info)
        if not _at_least(level, self._level):
            return
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            try:
                text = f"{text}\n{failure.getTraceback()}"
            except Exception:
                text = f"{text}\n(traceback unavailable)"
        if not text:
            return
        name = str(getattr(level, "name", "info")).upper()
        entry = f"[{name}] {text.rstrip()}\n".encode("utf-8", "replace")
        self.streams[PROXY].append(entry)
        if self._mode in ("proxy", "both"):
            self.streams[COMBINED].append(entry)


def bound_log_file(log_file: LogFile, rotation: LogRotation) -> None:
    """
    Make C{log_file} rotate at C{rotation.max_bytes} and keep C{rotation.keep}
    rotated files: each rotation deletes the ones beyond (those left over from
    an earlier run with a larger count included).
    """
    log_file.rotateLength = rotation.max_bytes
    log_file.maxRotatedFiles = rotation.keep


def _at_least(level: Any, minimum: Any) -> bool:
    # Legacy or hand-made events may carry no level (or a foreign one): keep them.
    try:
        return bool(level >= minimum)
    except TypeError:
        return True
