# -*- test-case-name: tests.test_scheduler -*-
"""
The pieces of the swap scheduler that are not the walk itself: a queued
request (L{Waiter}), the rules that decide who goes first, and the figures the
queue keeps for C{/metrics} (L{QueueStats}).

The policy (docs/swapping.md, "Fairness"), in the terms used here:

 - A waiter is I{due} once it has waited its model's C{maxWait}.
 - A due waiter is a I{barrier}: a later request that would keep its swap
   waiting (its model is one the due waiter must stop) is not granted ahead of
   it, unless the ready model is I{resident}: it became ready less than its
   C{minResidency} ago, or the request was queued before the model became
   ready (collation: what queued for a load is served by that load).
 - During its residency, a ready model with nothing in flight is not stopped
   for waiters that are not due until it has been idle for its last load time
   (at least L{MIN_HOLD}) divided by the number of requests that wait
   (L{kept_until}). Its next request is likely to come soon, and the wait
   should cost the waiting requests together no more than the reload would (a
   ski-rental rule, weighted by who pays): one waiter lets a model that loads
   in 20 s idle up to 20 s, thirty waiters 0.7 s. After its residency an idle
   model is stopped at once for whoever waits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from twisted.internet.defer import Deferred

if TYPE_CHECKING:
    from twisted.internet.interfaces import IDelayedCall

    from llamaswap.config import ModelConfig
    from llamaswap.config.matrix import Decision
    from llamaswap.names import LocalTarget
    from llamaswap.supervisor import Lease

# Upper bounds (seconds) of the queue-wait histogram's buckets; +Inf is implied.
WAIT_BUCKETS = (0.005, 0.05, 0.25, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# The least time an idle model is kept during its residency (for clients that send their next
# request a moment after the last answer, when its load took less).
MIN_HOLD = 1.0

# Why a model was started or stopped, for llamaswap_model_swaps_total.
SWAP_REASONS = ("request", "evict", "ttl", "unload", "exit", "shutdown", "failed", "reload")


class Waiter:
    """One queued L{Supervisor.acquire<llamaswap.supervisor.Supervisor.acquire>} call."""

    def __init__(
        self,
        target: LocalTarget,
        allowed: frozenset[str],
        since: float,
        seq: int,
        withdraw: Callable[[Waiter], None],
    ) -> None:
        self.target = target
        self.model: ModelConfig = target.model
        self.allowed = allowed
        self.since = since
        self.seq = seq  # arrival order: breaks every tie
        self.due_at = since + self.model.max_wait
        self.decision: Decision | None = None  # the matrix's latest choice for it
        self.victims: frozenset[str] = frozenset()  # due: what its start stops for memory
        self.deferred: Deferred[Lease] = Deferred(lambda _: withdraw(self))
        self.timer: IDelayedCall | None = None  # the queue timeout
        self.done = False  # served, failed or withdrawn: skipped, then dropped from the queue

    @property
    def key(self) -> tuple[str, frozenset[str]]:
        """Waiters with equal keys want exactly the same thing."""
        return (self.model.id, self.allowed)

    def due(self, now: float) -> bool:
        return now >= self.due_at

    def finish(self) -> None:
        """Leave the queue: no timeout any more (idempotent)."""
        self.done = True
        if self.timer is not None:
            if self.timer.active():
                self.timer.cancel()
            self.timer = None


def walk_order(waiters: list[Waiter], now: float) -> list[Waiter]:
    """
    The order in which a walk considers C{waiters}: the due ones first, the
    earliest due first (so a short C{maxWait} can overtake a long one), then
    the others in arrival order.
    """
    return sorted(waiters, key=lambda w: (0, w.due_at, w.seq) if w.due(now) else (1, 0.0, w.seq))


def held_back(waiter: Waiter, barriers: list[Waiter]) -> bool:
    """Whether serving C{waiter} would keep a due waiter's swap waiting."""
    model_id = waiter.model.id
    return any(
        model_id not in barrier.allowed or model_id in barrier.victims for barrier in barriers
    )


def resident(waiter: Waiter, ready_at: float | None, min_residency: float, now: float) -> bool:
    """
    Whether C{waiter}'s ready model still takes its requests ahead of due
    waiters: it became ready less than C{min_residency} seconds ago, or the
    waiter was queued before it became ready.
    """
    if ready_at is None:
        return False
    return now < ready_at + min_residency or waiter.since < ready_at


def kept_until(
    ready_at: float | None,
    min_residency: float,
    idle_since: float,
    load_seconds: float,
    waiting: int,
) -> float:
    """
    Until when an idle ready model is kept for C{waiting} requests that are
    not due: as long after its last request as its load took (at least
    L{MIN_HOLD}), divided among the requests that wait, and not beyond its
    residency.
    """
    if ready_at is None:
        return 0.0
    hold = max(load_seconds, MIN_HOLD) / max(1, waiting)
    return min(ready_at + min_residency, idle_since + hold)


def conflict(one: tuple[str, frozenset[str]], other: tuple[str, frozenset[str]]) -> bool:
    """Whether serving one waiter's wish would stop the other's model."""
    return one[0] not in other[1] or other[0] not in one[1]


class QueueStats:
    """What the queue counts for C{/metrics}: waits, refusals and swaps, by model."""

    def __init__(self) -> None:
        # model -> [count per bucket of WAIT_BUCKETS, then +Inf], sum
        self.wait_buckets: defaultdict[str, list[int]] = defaultdict(
            lambda: [0] * (len(WAIT_BUCKETS) + 1)
        )
        self.wait_sum: defaultdict[str, float] = defaultdict(float)
        self.refused: defaultdict[tuple[str, int], int] = defaultdict(int)  # (model, status)
        self.swaps: defaultdict[tuple[str, str], int] = defaultdict(int)  # (model, reason)

    def waited(self, model_id: str, seconds: float) -> None:
        """A request was granted after C{seconds} (0 for one served at once)."""
        buckets = self.wait_buckets[model_id]
        if seconds <= WAIT_BUCKETS[0]:  # a request served at once: most of them
            buckets[0] += 1
            self.wait_sum[model_id] += seconds
            return
        for i, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                buckets[i] += 1
                break
        else:
            buckets[-1] += 1
        self.wait_sum[model_id] += seconds
