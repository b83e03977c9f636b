# -*- test-case-name: tests.test_process -*-
"""
A model server's states, the events that move it, and the one table of moves.

L{TRANSITIONS} is the whole lifecycle: C{(state, event) -> next state}. It is
what docs/swapping.md's diagram shows (C{tests.test_process} checks that both
agree). L{ModelProcess<llamaswap.process.model.ModelProcess>} changes its
state only through L{next_state}, so a move the table lacks is a bug that
raises L{IllegalTransition}, never a silent no-op.

The state names double as API values (C{/running}, C{modelStatus} events,
metrics): L{State} is a C{str} enum, so C{State.READY == "ready"} and JSON
writes it as C{"ready"}.

A plain dict rather than an Automat machine: the states are data that leave
the process, the side effects of entering a state are few and shared, and a
dict reads as the table it is.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class State(enum.StrEnum):
    STOPPED = "stopped"  # not running; the next request starts it
    STARTING = "starting"  # port check, spawn, health polling
    READY = "ready"  # healthy; requests are relayed to it
    STOPPING = "stopping"  # signalled or exited; not yet reaped with every pipe closed
    FAILED = "failed"  # the last start failed; like stopped, the next start retries


class Event(enum.StrEnum):
    START = "start"  # a request wants the model
    HEALTHY = "healthy"  # the health check answered 200 (or `checkEndpoint: none`)
    STOP = "stop"  # swap, TTL, unload, shutdown
    TIMEOUT = "timeout"  # no 200 within healthCheckTimeout
    EXITED = "exited"  # the server exited on its own
    ENDED = "ended"  # nothing of this run is left: reaped, pipes closed, cmdStop done
    FAILED = "failed"  # nothing of this run is left, and its start failed


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.STOPPED, Event.START): State.STARTING,
    (State.FAILED, Event.START): State.STARTING,
    (State.STARTING, Event.HEALTHY): State.READY,
    (State.STARTING, Event.FAILED): State.FAILED,  # port in use or spawn error: nothing ran
    (State.STARTING, Event.ENDED): State.STOPPED,  # unloaded during the port check
    (State.STARTING, Event.STOP): State.STOPPING,
    (State.STARTING, Event.TIMEOUT): State.STOPPING,
    (State.STARTING, Event.EXITED): State.STOPPING,
    (State.READY, Event.STOP): State.STOPPING,
    (State.READY, Event.EXITED): State.STOPPING,
    (State.STOPPING, Event.ENDED): State.STOPPED,
    (State.STOPPING, Event.FAILED): State.FAILED,  # after a timeout or an exit while starting
}


class IllegalTransition(RuntimeError):
    """A bug: an event that L{TRANSITIONS} does not allow in the current state."""


def next_state(state: State, event: Event) -> State:
    """
    Where C{event} leads from C{state}.

    @raise IllegalTransition: if the table has no such move.
    """
    try:
        return TRANSITIONS[state, event]
    except KeyError:
        raise IllegalTransition(f"no transition from {state} on {event}") from None
