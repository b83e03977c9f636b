"""
The scheduler's fairness rules (llamaswap.scheduling, docs/swapping.md "Fairness"): bounded
waits, residency, collation, the idle hold, queue order; on a fake process reactor and clock.
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.supervisor import Lease
from tests.test_supervisor import SupervisorHarness, yaml_for

# Two models, one at a time; a request becomes due after 30 s, residency 10 s.
FAIR = "queue: {maxWait: 30, minResidency: 10, timeout: 0}"


class Fixture(SynchronousTestCase):
    def harness(self, *names: str, top: str = FAIR, extra: dict[str, str] | None = None) -> None:
        self.h = SupervisorHarness(yaml_for(*(names or ("a", "b")), top=top, extra=extra))
        self.h.healthy()

    def lease(self, name: str) -> Lease:
        """A lease on C{name}, which must be granted at once (or within a poll)."""
        d = self.h.sup.acquire_by_name(name)
        self.h.tick()
        return self.successResultOf(d)

    def advance(self, seconds: float) -> None:
        self.h.reactor.advance(seconds)

    def running(self) -> list[str]:
        return [s.model_id for s in self.h.sup.statuses() if s.state == "ready"]


class BoundedWaitTests(Fixture):
    def test_busy_model_cannot_starve_another(self) -> None:
        """
        a is never idle (each new request starts before the last ends); b's request
        becomes due at 30 s, after which new requests for a queue behind it.
        """
        self.harness()
        self.advance(20)  # a's residency is long over when b arrives
        held = self.lease("a")
        b = self.h.sup.acquire_by_name("b")
        for _ in range(29):  # one new request for a per second, each 1.5 s long
            self.advance(1)
            fresh = self.h.sup.acquire_by_name("a")
            self.assertTrue(fresh.called, "a is served at once while b is not due")
            held.release()
            held = self.successResultOf(fresh)
        self.advance(1)  # b is due now
        late = self.h.sup.acquire_by_name("a")
        self.assertNoResult(late)  # queued behind b
        self.assertEqual(self.h.kill.sent, [])  # a is busy: never killed
        held.release()  # a drains: the swap happens
        self.h.tick()
        self.assertEqual(self.successResultOf(b).model.id, "b")
        self.assertNoResult(late)
        self.assertEqual(self.h.spawned(), ["a", "b"])

    def test_due_request_waits_for_in_flight_ones(self) -> None:
        """Due or not, a busy model is never stopped: the swap waits for its last request."""
        self.harness()
        self.advance(20)
        held = self.lease("a")
        b = self.h.sup.acquire_by_name("b")
        self.advance(300)
        self.assertNoResult(b)
        self.assertEqual((self.running(), self.h.kill.sent), (["a"], []))
        held.release()
        self.h.tick()
        self.successResultOf(b)

    def test_per_model_max_wait(self) -> None:
        """A model's own maxWait overrides the queue's."""
        self.harness(extra={"b": "maxWait: 5"})
        held = self.lease("a")
        self.advance(20)  # past a's residency
        b = self.h.sup.acquire_by_name("b")
        self.advance(5)
        self.assertNoResult(self.h.sup.acquire_by_name("a"))
        held.release()
        self.h.tick()
        self.successResultOf(b)

    def test_earliest_due_goes_first(self) -> None:
        """Among due requests the earliest deadline wins, whatever the arrival order."""
        self.harness("a", "b", "c", extra={"c": "maxWait: 2"})
        self.advance(20)
        held = self.lease("a")
        b = self.h.sup.acquire_by_name("b")  # due at +30
        c = self.h.sup.acquire_by_name("c")  # arrives later, due at +2
        self.advance(40)
        held.release()
        self.h.tick()
        self.successResultOf(c).release()
        self.assertNoResult(b)
        self.advance(1)
        self.h.tick()
        self.successResultOf(b)
        self.assertEqual(self.h.spawned(), ["a", "c", "b"])

    def test_a_waiter_becoming_due_is_noticed_without_other_events(self) -> None:
        """The moment a request becomes due, an idle model in its hold is stopped for it."""
        self.harness(top="queue: {maxWait: 0.5, minResidency: 60, timeout: 0}")
        self.lease("a").release()
        b = self.h.sup.acquire_by_name("b")
        self.advance(0.49)
        self.assertEqual(self.h.state("a"), "ready")  # kept for its next request ...
        self.advance(0.01)
        self.assertEqual(self.h.state("a"), "stopped")  # ... until b is due
        self.h.tick()
        self.successResultOf(b)


class ResidencyTests(Fixture):
    def test_fresh_model_keeps_taking_its_requests(self) -> None:
        """Within minResidency of its load, a model takes new requests even with b due."""
        self.harness(extra={"b": "maxWait: 1"})
        first = self.lease("a")
        b = self.h.sup.acquire_by_name("b")
        self.advance(2)  # b is due, a became ready 2 s ago
        second = self.h.sup.acquire_by_name("a")
        self.assertTrue(second.called)
        self.advance(8.1)  # residency over
        third = self.h.sup.acquire_by_name("a")
        self.assertNoResult(third)
        first.release()
        self.successResultOf(second).release()
        self.h.tick()
        self.successResultOf(b)

    def test_idle_model_is_kept_for_its_next_request(self) -> None:
        """
        In its residency an idle model waits a second (or its load time) for its next
        request before a not-yet-due request may stop it; after its residency, not at all.
        """
        self.harness()
        self.lease("a").release()
        b = self.h.sup.acquire_by_name("b")
        self.advance(0.5)
        self.assertEqual(self.running(), ["a"])
        again = self.lease("a")  # came back within the hold: no swap
        self.advance(0.9)
        again.release()
        self.advance(0.9)
        self.assertEqual(self.running(), ["a"])
        self.advance(0.2)  # idle for a full second: b's turn
        self.h.tick()
        self.successResultOf(b).release()
        self.advance(20)  # b's residency is over: an idle b is stopped at once
        a = self.h.sup.acquire_by_name("a")
        self.assertEqual(self.h.state("b"), "stopped")
        self.h.tick()
        self.successResultOf(a)
        self.assertEqual(self.h.spawned(), ["a", "b", "a"])

    def test_collation_serves_everything_queued_for_a_load(self) -> None:
        """What queued while a loaded is served by that load, even with b due meanwhile."""
        self.harness(extra={"b": "maxWait: 0.01", "a": "minResidency: 0"})
        self.h.health.codes.clear()  # a takes a while to load
        waiting = [self.h.sup.acquire_by_name("a") for _ in range(3)]
        b = self.h.sup.acquire_by_name("b")
        self.advance(2)
        self.h.healthy()
        self.h.tick()
        leases = [self.successResultOf(d) for d in waiting]
        self.assertNoResult(b)
        self.assertNoResult(self.h.sup.acquire_by_name("a"))  # a newcomer is not
        for lease in leases:
            lease.release()
        self.h.tick()
        self.successResultOf(b)


class QueueTests(Fixture):
    def test_position_and_visible_queue(self) -> None:
        """position() and the status tell where a request stands; events tell the views."""
        self.harness("a", "b", "c")
        self.advance(20)
        held = self.lease("a")
        self.advance(1)
        b = self.h.sup.acquire_by_name("b")
        self.advance(2)
        c = self.h.sup.acquire_by_name("c")
        self.assertEqual(self.h.sup.position(b), (0, 2))
        self.assertEqual(self.h.sup.position(c), (1, 2))
        status = self.h.sup.status("b")
        self.assertEqual((status.queued, status.oldest_wait), (1, 2.0))
        self.assertEqual(self.h.sup.status("a").queued, 0)
        self.assertEqual(self.h.queue_events[-2:], [("b", 1), ("c", 1)])
        self.assertIsNone(self.h.sup.position(Deferred()))
        c.cancel()
        self.failureResultOf(c, CancelledError)
        self.assertEqual(self.h.queue_events[-1], ("c", 0))
        self.assertEqual(self.h.sup.status("c").queued, 0)
        held.release()
        self.advance(1)  # a is in its residency: kept a second for its next request
        self.h.tick()
        self.successResultOf(b)
        self.assertIsNone(self.h.sup.position(b))

    def test_swaps_are_counted_by_reason(self) -> None:
        """Starts count as "request", stops by their cause."""
        self.harness("a", "b", top="queue: {minResidency: 0}", extra={"b": "ttl: 5"})
        self.lease("a").release()
        self.lease("b").release()
        self.advance(5)
        self.h.tick()
        self.successResultOf(self.h.sup.unload("a"))
        self.lease("a")
        self.successResultOf(self.h.sup.unload())
        swaps = dict(self.h.sup.stats.swaps)
        self.assertEqual(
            swaps,
            {("a", "request"): 2, ("a", "evict"): 1, ("b", "request"): 1, ("b", "ttl"): 1}
            | {("a", "unload"): 1},
        )

    def test_ties_are_broken_by_arrival(self) -> None:
        """Equal deadlines: the earlier request's model is loaded first, every time."""
        for _ in range(3):
            self.harness("a", "b", "c")
            self.advance(20)
            held = self.lease("a")
            c = self.h.sup.acquire_by_name("c")
            b = self.h.sup.acquire_by_name("b")
            self.advance(31)
            held.release()
            self.h.tick()
            self.successResultOf(c).release()
            self.advance(2)
            self.h.tick()
            self.successResultOf(b)
            self.assertEqual(self.h.spawned(), ["a", "c", "b"])


class GroupsAndMatrixTests(Fixture):
    def test_due_request_holds_back_only_what_it_must_stop(self) -> None:
        """With a and c allowed together, a due request for c does not hold a back."""
        self.harness(
            "a",
            "b",
            "c",
            top=FAIR + "\ngroups:\n  g: {swap: false, members: [a, c]}\n  h: {members: [b]}",
        )
        self.advance(20)
        held = self.lease("b")
        a = self.h.sup.acquire_by_name("a")
        self.advance(31)  # a is due: b drains, then a loads
        held.release()
        self.h.tick()
        self.successResultOf(a)
        c = self.h.sup.acquire_by_name("c")
        self.h.tick()
        self.successResultOf(c)
        self.assertEqual(sorted(self.running()), ["a", "c"])

    def hot_then_due(self, top: str, hot: str, rare: str) -> None:
        """
        C{hot} is busy past its residency while C{rare}, which must stop it, becomes
        due: a new request for C{hot} then waits, and C{rare} is served once it drains.
        """
        self.harness("a", "b", top=FAIR + top)
        self.advance(20)
        held = self.lease(hot)
        waiting = self.h.sup.acquire_by_name(rare)
        self.advance(30)
        self.assertNoResult(self.h.sup.acquire_by_name(hot))
        held.release()
        self.h.tick()
        self.successResultOf(waiting)

    def test_matrix_sets_obey_the_bound(self) -> None:
        """The bound applies to a matrix's swaps like to groups'."""
        self.hot_then_due("\nmatrix:\n  sets:\n    one: 'a'\n    two: 'b'\n", "a", "b")

    def test_profiles_obey_the_bound(self) -> None:
        """p:a is held back by a due request for q:b, which must stop it."""
        self.hot_then_due("\nprofiles:\n  p: [a]\n  q: [b]", "p:a", "q:b")


class KeyTests(Fixture):
    """An API key's priority and concurrency limit (docs/api.md, "API keys")."""

    def test_priority_orders_requests_that_are_not_due(self) -> None:
        from llamaswap.config.schema import ApiKey

        self.harness("a", "b", "c")
        held = self.lease("a")
        batch, urgent = ApiKey(key="k1", priority=0), ApiKey(key="k2", priority=10)
        first = self.h.sup.acquire(self.h.sup.names.local("b"), api_key=batch)
        second = self.h.sup.acquire(self.h.sup.names.local("c"), api_key=urgent)
        held.release()
        self.advance(20)
        self.h.tick(3)
        self.assertEqual(self.h.spawned()[1], "c")  # the higher priority swaps in first
        self.assertNoResult(first)
        self.successResultOf(second).release()
        self.advance(20)
        self.h.tick(3)
        self.successResultOf(first)

    def test_due_requests_go_first_whatever_the_priority(self) -> None:
        from llamaswap.config.schema import ApiKey

        self.harness("a", "b", "c")
        held = self.lease("a")
        old = self.h.sup.acquire(self.h.sup.names.local("b"))
        self.advance(31)  # b is due
        urgent = self.h.sup.acquire(
            self.h.sup.names.local("c"), api_key=ApiKey(key="k", priority=100)
        )
        held.release()
        self.h.tick(3)
        self.assertEqual(self.h.spawned()[1], "b")
        self.successResultOf(old)
        self.assertNoResult(urgent)

    def test_key_concurrency_limit(self) -> None:
        from llamaswap.config.schema import ApiKey

        self.harness("a")
        key = ApiKey(key="k", concurrency_limit=2)
        target = self.h.sup.names.local("a")
        leases = [self.h.sup.acquire(target, api_key=key) for _ in range(3)]
        self.h.tick(3)
        first, second = (self.successResultOf(d) for d in leases[:2])
        self.assertNoResult(leases[2])  # the key's third waits in the queue
        self.successResultOf(self.h.sup.acquire(target))  # others are not limited by it
        first.release()
        self.h.tick()
        self.successResultOf(leases[2])
        second.release()
