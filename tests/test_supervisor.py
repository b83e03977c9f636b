"""
Unit tests for L{llamaswap.supervisor}: the swap rules, the queue, profiles,
leases, unload and shutdown, on a fake process reactor and a fake clock.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.testing import StringTransport
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.errors import (
    HealthTimeout,
    ModelNotFound,
    QueueFull,
    QueueTimeout,
    ShuttingDown,
    StartFailed,
)
from llamaswap.events import EventBus
from llamaswap.names import Resolver
from llamaswap.process.health import POLL_FAST
from llamaswap.supervisor import REFUSED_WAIT, Lease, ModelStatus, Supervisor, may_run_with
from llamaswap.testing.memory import FakeProbe
from llamaswap.testing.process import (
    FakeChild,
    FakeHealth,
    FakeKill,
    FakeProcessReactor,
    make_config,
)

PY = sys.executable


def yaml_for(*names: str, extra: dict[str, str] | None = None, top: str = "") -> str:
    """Models named C{names}, each a fake server on its own port."""
    extra = extra or {}
    lines = [top, "healthCheckTimeout: 30", "models:"]
    if "queue:" not in top:
        # The rules of which models run together, without the scheduler's residency (its
        # own tests below turn it on): a swap may stop a model the moment it is idle.
        lines.insert(1, "queue: {minResidency: 0}")
    for name in names:
        lines += [
            f"  {name}:",
            f"    cmd: {PY} -m llamaswap.fakeserver --name {name} --port ${{PORT}}",
            "    unloadTimeout: 5",
        ]
        lines += [f"    {line}" for line in extra.get(name, "").splitlines() if line]
    return "\n".join(lines) + "\n"


class SupervisorHarness:
    """A Supervisor on fakes, with every published state change recorded."""

    def __init__(self, yaml_text: str, memory: dict[str, Any] | None = None) -> None:
        self.config = make_config(yaml_text)
        self.reactor = FakeProcessReactor()
        # memory: FakeProbe's keyword arguments (totals, usage, ...), for memory admission
        self.probe = None if memory is None else FakeProbe(self.reactor, **memory)
        self.kill = FakeKill(self.reactor)
        self.health = FakeHealth(self.reactor)
        self.events = EventBus()
        self.published: list[tuple[str, str]] = []
        self.queue_events: list[tuple[str, int]] = []
        self.max_running = 0
        self.events.subscribe(self._on_event)
        self.sup = Supervisor(
            self.config,
            reactor=self.reactor,
            events=self.events,
            kill=self.kill,
            http=self.health,  # type: ignore[arg-type]
            memory_probe=self.probe,
        )

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "queue":
            self.queue_events.append((data["model"], data["queued"]))
            return
        assert kind == "modelStatus"
        self.published.append((data["model"], data["state"]))
        self.max_running = max(self.max_running, len(self.reactor.live()))

    def url(self, model_id: str) -> str:
        return self.config.models[model_id].proxy + "/health"

    def healthy(self, *model_ids: str) -> None:
        for model_id in model_ids or tuple(self.config.models):
            self.health.set(self.url(model_id), 200)

    def child_of(self, model_id: str) -> FakeChild:
        """The latest child spawned for C{model_id}."""
        for child in reversed(self.reactor.children):
            if f"--name {model_id} " in " ".join(child.args) + " ":
                return child
        raise AssertionError(f"no child for {model_id}")

    def spawned(self) -> list[str]:
        """Model ids in spawn order."""
        names = []
        for child in self.reactor.children:
            if "--name" in child.args:
                names.append(child.args[child.args.index("--name") + 1])
        return names

    def state(self, model_id: str) -> str:
        return self.sup.status(model_id).state

    def tick(self, n: int = 1) -> None:
        for _ in range(n):
            self.reactor.advance(POLL_FAST)


class AcquireTests(SynchronousTestCase):
    def test_cold_start_then_lease(self) -> None:
        """acquire starts a stopped model and fires with a lease once healthy."""
        h = SupervisorHarness(yaml_for("a"))
        h.healthy()
        d = h.sup.acquire_by_name("a")
        self.assertNoResult(d)
        self.assertEqual(h.state("a"), "starting")
        h.tick()
        lease = self.successResultOf(d)
        self.assertIsInstance(lease, Lease)
        self.assertEqual(lease.url, "http://127.0.0.1:5800")
        self.assertEqual(lease.model.id, "a")
        self.assertIsNone(lease.target.upstream_model)
        self.assertEqual(h.sup.status("a").in_flight, 1)
        lease.release()
        lease.release()  # idempotent
        self.assertEqual(h.sup.status("a").in_flight, 0)

    def test_ready_model_is_served_at_once(self) -> None:
        """A second request for a ready model needs no start."""
        h = SupervisorHarness(yaml_for("a"))
        h.healthy()
        d = h.sup.acquire_by_name("a")
        h.tick()
        self.successResultOf(d).release()
        self.successResultOf(h.sup.acquire_by_name("a"))
        self.assertEqual(len(h.reactor.children), 1)

    def test_unknown_model(self) -> None:
        """Unknown names errback with ModelNotFound, starting nothing."""
        h = SupervisorHarness(yaml_for("a"))
        self.failureResultOf(h.sup.acquire_by_name("nope"), ModelNotFound)
        self.assertEqual(h.reactor.children, [])

    def test_alias_and_use_model_name(self) -> None:
        """Aliases resolve to their model; useModelName is the upstream name."""
        h = SupervisorHarness(
            yaml_for("a", extra={"a": 'aliases: ["alpha"]\nuseModelName: "A-7B"'})
        )
        h.healthy()
        d = h.sup.acquire_by_name("alpha")
        h.tick()
        lease = self.successResultOf(d)
        self.assertEqual(lease.model.id, "a")
        self.assertEqual(lease.target.upstream_model, "A-7B")

    def test_concurrent_requests_share_one_start(self) -> None:
        """Requests for a starting model all wait for the same single start."""
        h = SupervisorHarness(yaml_for("a"))
        waiting = [h.sup.acquire_by_name("a") for _ in range(5)]
        h.tick(10)
        self.assertEqual(len(h.reactor.children), 1)
        h.healthy()
        h.tick()
        leases = [self.successResultOf(d) for d in waiting]
        self.assertEqual(h.sup.status("a").in_flight, 5)
        for lease in leases:
            lease.release()
        self.assertEqual(h.sup.status("a").in_flight, 0)

    def test_failed_start_fails_every_waiter_and_next_request_retries(self) -> None:
        """Exit during startup: all waiters get StartFailed with the tail; retry works."""
        h = SupervisorHarness(yaml_for("a"))
        first, second = h.sup.acquire_by_name("a"), h.sup.acquire_by_name("a")
        child = h.child_of("a")
        child.output(b"bind: address already in use\n", fd=2)
        child.exit(code=1)
        for d in (first, second):
            message = self.failureResultOf(d, StartFailed).value.message
            self.assertIn("address already in use", message)
        self.assertEqual(h.state("a"), "failed")
        self.assertIn("address already in use", h.sup.status("a").last_error or "")
        h.healthy()
        third = h.sup.acquire_by_name("a")
        h.tick()
        self.successResultOf(third)
        self.assertEqual(len(h.reactor.children), 2)
        self.assertIsNone(h.sup.status("a").last_error)

    def test_port_in_use_fails_every_waiter(self) -> None:
        """Another server owns the model's port: every waiter gets StartFailed (502)."""
        h = SupervisorHarness(yaml_for("a"))
        h.reactor.hang_connects = True
        first, second = h.sup.acquire_by_name("a"), h.sup.acquire_by_name("a")
        [(host, port, factory, _, _)] = h.reactor.tcpClients  # one check for both
        factory.buildProtocol(IPv4Address("TCP", host, port)).makeConnection(StringTransport())
        for d in (first, second):
            failure = self.failureResultOf(d, StartFailed)
            self.assertEqual(failure.value.status, 502)
            self.assertIn("port 5800 on 127.0.0.1 is already in use", failure.value.message)
        self.assertEqual(h.reactor.children, [])
        self.assertEqual(h.published, [("a", "starting"), ("a", "failed")])

    def test_health_timeout_fails_waiters(self) -> None:
        """No 200 within healthCheckTimeout: HealthTimeout for every waiter."""
        h = SupervisorHarness(yaml_for("a"))
        d = h.sup.acquire_by_name("a")
        h.reactor.advance(30)
        self.failureResultOf(d, HealthTimeout)
        self.assertEqual(h.state("a"), "failed")

    def test_concurrency_limit_queues(self) -> None:
        """Beyond concurrencyLimit requests queue, and get the next free slot in order."""
        h = SupervisorHarness(yaml_for("a", extra={"a": "concurrencyLimit: 2"}))
        first, second, third = (h.sup.acquire_by_name("a") for _ in range(3))
        h.healthy()
        h.tick()
        lease = self.successResultOf(first)
        self.successResultOf(second)
        self.assertNoResult(third)
        fourth = h.sup.acquire_by_name("a")
        self.assertEqual(h.sup.status("a").queued, 2)
        lease.release()
        self.successResultOf(third)
        self.assertNoResult(fourth)
        self.assertEqual(h.sup.status("a").in_flight, 2)

    def test_global_concurrency_limit_queues(self) -> None:
        """queue.concurrencyLimit counts the leases on every model."""
        h = SupervisorHarness(
            yaml_for(
                "a",
                "b",
                top="queue: {concurrencyLimit: 1}\ngroups: {g: {swap: false, members: [a, b]}}",
            )
        )
        a = h.sup.acquire_by_name("a")
        h.healthy()
        h.tick()
        lease = self.successResultOf(a)
        b = h.sup.acquire_by_name("b")
        h.tick(5)
        self.assertEqual(h.spawned(), ["a", "b"])  # b starts beside a (the group allows it) ...
        self.assertNoResult(b)  # ... but waits for the one slot
        lease.release()
        self.successResultOf(b)

    def test_full_queue_is_a_429_with_retry_after(self) -> None:
        """Beyond queue.maxLength waiting requests, a new one is refused at once."""
        h = SupervisorHarness(yaml_for("a", top="queue: {maxLength: 2}"))
        waiting = [h.sup.acquire_by_name("a") for _ in range(2)]
        h.reactor.advance(3.2)
        failure = self.failureResultOf(h.sup.acquire_by_name("a"), QueueFull)
        self.assertEqual((failure.value.status, failure.value.retry_after), (429, 4))
        self.assertIn("queue.maxLength", failure.value.message)
        self.assertEqual(h.sup.stats.refused[("a", 429)], 1)
        h.healthy()
        h.reactor.advance(2)
        for d in waiting:
            self.successResultOf(d)

    def test_queue_timeout_is_a_503(self) -> None:
        """A request that waits queue.timeout seconds fails; the others go on waiting."""
        h = SupervisorHarness(yaml_for("a", "b", top="queue: {timeout: 20, maxWait: 600}"))
        lease = self.ready(h, "a")
        b = h.sup.acquire_by_name("b")
        h.reactor.advance(10)
        later = h.sup.acquire_by_name("b")
        h.reactor.advance(10)
        failure = self.failureResultOf(b, QueueTimeout)
        self.assertEqual(failure.value.status, 503)
        self.assertIn("queue.timeout", failure.value.message)
        self.assertEqual(h.sup.status("b").queued, 1)
        lease.release()
        h.tick(3)
        self.successResultOf(later)
        self.assertEqual(h.sup.stats.refused[("b", 503)], 1)

    def ready(self, h: SupervisorHarness, model_id: str) -> Lease:
        d = h.sup.acquire_by_name(model_id)
        h.healthy()
        h.tick()
        return self.successResultOf(d)


class SwapTests(SynchronousTestCase):
    def ready(self, h: SupervisorHarness, model_id: str) -> Lease:
        d = h.sup.acquire_by_name(model_id)
        h.healthy()
        h.tick()
        return self.successResultOf(d)

    def test_swap_stops_the_other_model_first(self) -> None:
        """One model at a time: B starts only after A has ended."""
        h = SupervisorHarness(yaml_for("a", "b"))
        self.ready(h, "a").release()
        a = h.child_of("a")
        a.dies_on = set()
        d = h.sup.acquire_by_name("b")
        self.assertEqual(h.kill.sent, [(a.original_pid, signal.SIGTERM)])
        self.assertEqual(h.spawned(), ["a"])  # b waits for a to end
        a.exit(sig=signal.SIGTERM)
        self.assertEqual(h.spawned(), ["a", "b"])
        h.tick()
        self.assertEqual(self.successResultOf(d).model.id, "b")
        self.assertEqual(h.max_running, 1)

    def test_swap_waits_for_in_flight_requests(self) -> None:
        """A model with a request in flight is never stopped to make room."""
        h = SupervisorHarness(yaml_for("a", "b", top="queue: {minResidency: 0, timeout: 0}"))
        lease = self.ready(h, "a")
        d = h.sup.acquire_by_name("b")
        h.reactor.advance(3600)
        self.assertEqual(h.kill.sent, [])
        self.assertEqual(h.state("a"), "ready")
        self.assertNoResult(d)
        lease.release()
        self.assertEqual(h.kill.sent[0][1], signal.SIGTERM)
        h.tick()
        self.assertEqual(self.successResultOf(d).model.id, "b")
        self.assertEqual(h.max_running, 1)

    def test_requests_for_the_ready_model_are_served_while_others_wait(self) -> None:
        """Collation: the ready model serves new requests although b is queued."""
        h = SupervisorHarness(yaml_for("a", "b"))
        lease = self.ready(h, "a")
        b = h.sup.acquire_by_name("b")
        again = self.successResultOf(h.sup.acquire_by_name("a"))
        lease.release()
        self.assertNoResult(b)
        self.assertEqual(h.kill.sent, [])
        again.release()
        h.tick()
        self.successResultOf(b)

    def test_other_models_wait_in_fifo_order(self) -> None:
        """Queued requests for different models are started in arrival order."""
        h = SupervisorHarness(yaml_for("a", "b", "c"))
        lease = self.ready(h, "a")
        c = h.sup.acquire_by_name("c")
        b = h.sup.acquire_by_name("b")
        c2 = h.sup.acquire_by_name("c")
        lease.release()
        h.tick()
        c_lease = self.successResultOf(c)
        self.successResultOf(c2).release()
        self.assertNoResult(b)
        c_lease.release()
        h.tick()
        self.successResultOf(b)
        self.assertEqual(h.spawned(), ["a", "c", "b"])
        self.assertEqual(h.max_running, 1)

    def test_repeated_wishes_keep_their_place(self) -> None:
        """b, c, c queued behind a busy a: b goes first, both c's after b."""
        h = SupervisorHarness(yaml_for("a", "b", "c"))
        lease = self.ready(h, "a")
        b, c1, c2 = (
            h.sup.acquire_by_name("b"),
            h.sup.acquire_by_name("c"),
            h.sup.acquire_by_name("c"),
        )
        lease.release()
        h.tick()
        b_lease = self.successResultOf(b)
        self.assertEqual(h.spawned(), ["a", "b"])
        self.assertNoResult(c1)
        self.assertNoResult(c2)
        b_lease.release()
        h.tick()
        self.successResultOf(c1)
        self.successResultOf(c2)
        self.assertEqual(h.max_running, 1)

    def test_many_waiters(self) -> None:
        """A thousand queued requests are served by one start, quickly."""
        h = SupervisorHarness(yaml_for("a", "b", top="queue: {minResidency: 0, maxLength: 1000}"))
        lease = self.ready(h, "a")
        waiting = [h.sup.acquire_by_name("b") for _ in range(1000)]
        lease.release()
        h.tick()
        leases = [self.successResultOf(d) for d in waiting]
        self.assertEqual(h.sup.status("b").in_flight, 1000)
        for each in leases:
            each.release()
        self.assertEqual(h.spawned(), ["a", "b"])

    def test_cancelled_queued_request_triggers_no_load(self) -> None:
        """A client that left while queued does not cause a swap."""
        h = SupervisorHarness(yaml_for("a", "b"))
        lease = self.ready(h, "a")
        d = h.sup.acquire_by_name("b")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        lease.release()
        h.reactor.advance(60)
        self.assertEqual(h.spawned(), ["a"])
        self.assertEqual(h.state("a"), "ready")
        self.assertEqual(h.kill.sent, [])

    def test_cancelled_waiter_of_a_start_lets_it_finish(self) -> None:
        """The only waiter of a start leaves: the model still ends up ready."""
        h = SupervisorHarness(yaml_for("a"))
        d = h.sup.acquire_by_name("a")
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.healthy()
        h.tick()
        self.assertEqual(h.state("a"), "ready")

    def test_starting_model_is_not_aborted_by_a_swap(self) -> None:
        """A swap away from a model that is still starting waits for it first."""
        h = SupervisorHarness(yaml_for("a", "b"))
        a = h.sup.acquire_by_name("a")
        a.cancel()
        self.failureResultOf(a, CancelledError)
        b = h.sup.acquire_by_name("b")
        self.assertEqual(h.kill.sent, [])
        h.healthy()
        h.tick()  # a becomes ready, is stopped, then b starts
        h.tick()
        self.successResultOf(b)
        self.assertEqual(h.spawned(), ["a", "b"])
        self.assertEqual(h.max_running, 1)

    def test_request_during_ttl_stop_waits_and_restarts(self) -> None:
        """A request arriving while the TTL unload runs gets a fresh start."""
        h = SupervisorHarness(yaml_for("a", extra={"a": "ttl: 10"}))
        self.ready(h, "a").release()
        h.child_of("a").dies_on = set()
        h.reactor.advance(10)
        self.assertEqual(h.state("a"), "stopping")
        d = h.sup.acquire_by_name("a")
        self.assertNoResult(d)
        h.child_of("a").exit(sig=signal.SIGTERM)
        self.assertEqual(h.state("a"), "starting")
        h.tick()
        self.successResultOf(d)
        self.assertEqual(len(h.reactor.children), 2)

    def test_crash_then_next_request_restarts(self) -> None:
        """A model that crashed while ready is started again on demand."""
        h = SupervisorHarness(yaml_for("a"))
        lease = self.ready(h, "a")
        h.child_of("a").exit(sig=signal.SIGKILL)
        self.assertEqual(h.state("a"), "stopped")
        lease.release()  # the request that saw the crash ends
        d = h.sup.acquire_by_name("a")
        h.tick()
        self.successResultOf(d)
        self.assertEqual(len(h.reactor.children), 2)

    def test_ttl_counts_from_last_release(self) -> None:
        """Through the supervisor: no TTL unload while a lease is held."""
        h = SupervisorHarness(yaml_for("a", extra={"a": "ttl: 10"}))
        lease = self.ready(h, "a")
        h.reactor.advance(100)
        self.assertEqual(h.state("a"), "ready")
        self.assertIsNone(h.sup.status("a").ttl_remaining)
        lease.release()
        self.assertEqual(h.sup.status("a").ttl_remaining, 10)
        h.reactor.advance(10)
        self.assertEqual(h.state("a"), "stopped")


class RefusedTests(SynchronousTestCase):
    """Lease.connection_refused: the server refused a connection (a crash not yet noticed?)."""

    def ready(self, h: SupervisorHarness, model_id: str = "a") -> Lease:
        d = h.sup.acquire_by_name(model_id)
        h.healthy()
        h.tick()
        return self.successResultOf(d)

    def test_crash_not_yet_noticed(self) -> None:
        """
        The server died but its exit was not processed yet: the wait ends when
        it is, and the next acquire starts a new server.
        """
        h = SupervisorHarness(yaml_for("a"))
        lease = self.ready(h)
        waiting = lease.connection_refused()
        self.assertNoResult(waiting)
        h.child_of("a").exit(code=1)
        self.assertIs(self.successResultOf(waiting), True)
        lease.release()
        again = h.sup.acquire_by_name("a")
        h.tick()
        self.assertEqual(self.successResultOf(again).model.id, "a")
        self.assertEqual(len(h.reactor.children), 2)

    def test_crash_already_noticed(self) -> None:
        """The model left the state the lease was granted in: no wait at all."""
        h = SupervisorHarness(yaml_for("a"))
        lease = self.ready(h)
        h.child_of("a").exit(code=1)
        self.assertIs(self.successResultOf(lease.connection_refused()), True)
        # Even once the model is ready again, the lease is on the dead server.
        lease.release()
        self.ready(h)
        self.assertIs(self.successResultOf(lease.connection_refused()), True)

    def test_alive_but_refusing(self) -> None:
        """Still ready: the wait ends after REFUSED_WAIT; nothing is stopped."""
        h = SupervisorHarness(yaml_for("a"))
        lease = self.ready(h)
        waiting = lease.connection_refused()
        h.reactor.advance(REFUSED_WAIT - 0.01)
        self.assertNoResult(waiting)
        h.reactor.advance(0.01)
        self.assertIs(self.successResultOf(waiting), True)
        self.assertEqual(h.state("a"), "ready")
        self.assertEqual(h.kill.sent, [])

    def test_cancelled_wait_leaves_nothing_behind(self) -> None:
        """A client that leaves during the wait cancels it: no timer is left."""
        h = SupervisorHarness(yaml_for("a"))
        lease = self.ready(h)
        waiting = lease.connection_refused()
        waiting.cancel()
        self.failureResultOf(waiting, CancelledError)
        self.assertEqual([c for c in h.reactor.getDelayedCalls() if c.active()], [])

    def test_lease_without_a_supervised_server(self) -> None:
        """A lease made without a refusal hook (a fake, a peer) says: do not retry."""
        model = make_config(yaml_for("a")).models["a"]
        lease = Lease(model, Resolver(make_config(yaml_for("a"))).local("a"), lambda: None)
        self.assertIs(self.successResultOf(lease.connection_refused()), False)


class ProfileTests(SynchronousTestCase):
    YAML = yaml_for("a", "b", "c", top="profiles:\n  p: [a, b]\n  q: [b, c]")

    def test_profile_members_run_together(self) -> None:
        """p:a then p:b: both run; the prefix is stripped upstream."""
        h = SupervisorHarness(self.YAML)
        h.healthy()
        da, db = h.sup.acquire_by_name("p:a"), h.sup.acquire_by_name("p:b")
        h.tick()
        la, lb = self.successResultOf(da), self.successResultOf(db)
        self.assertEqual((la.target.upstream_model, lb.target.upstream_model), ("a", "b"))
        self.assertEqual((h.state("a"), h.state("b")), ("ready", "ready"))
        self.assertEqual(h.kill.sent, [])

    def test_switching_profile_stops_the_others(self) -> None:
        """q:c stops a (not in q) and keeps b; a plain request stops the rest."""
        h = SupervisorHarness(self.YAML)
        h.healthy()
        for name in ("p:a", "p:b"):
            d = h.sup.acquire_by_name(name)
            h.tick()
            self.successResultOf(d).release()
        d = h.sup.acquire_by_name("q:c")
        self.assertEqual(h.state("a"), "stopped")
        h.tick()
        self.successResultOf(d).release()
        self.assertEqual([s.state for s in h.sup.statuses()], ["stopped", "ready", "ready"])
        d = h.sup.acquire_by_name("c")
        self.assertEqual(h.state("b"), "stopped")
        self.successResultOf(d)
        self.assertEqual(h.spawned(), ["a", "b", "c"])

    def test_non_member_is_not_found(self) -> None:
        """p:c is not part of profile p."""
        h = SupervisorHarness(self.YAML)
        self.failureResultOf(h.sup.acquire_by_name("p:c"), ModelNotFound)
        self.failureResultOf(h.sup.acquire_by_name("zz:a"), ModelNotFound)


class _ReadyModelsCase(SynchronousTestCase):
    """Helpers for tests about which models end up running together."""

    def ready(self, h: SupervisorHarness, name: str) -> None:
        """Request C{name} until served; release the lease at once."""
        d = h.sup.acquire_by_name(name)
        h.healthy()
        h.tick(2)
        self.successResultOf(d).release()

    def running(self, h: SupervisorHarness) -> list[str]:
        return [s.model_id for s in h.sup.statuses() if s.state == "ready"]


class GroupTests(_ReadyModelsCase):
    """llama-swap's groups: swap, exclusive and persistent (checklist item 86)."""

    def test_no_groups_is_one_at_a_time(self) -> None:
        """may_run_with without groups: a model runs alone (plain) or with its profile."""
        config = make_config(yaml_for("a", "b", "c", top="profiles:\n  p: [a, b]"))
        self.assertEqual(may_run_with(Resolver(config), Resolver(config).local("a")), {"a"})
        self.assertEqual(may_run_with(Resolver(config), Resolver(config).local("p:a")), {"a", "b"})

    def test_swap_false_members_run_side_by_side(self) -> None:
        """Members of a swap:false group run together; the default group still swaps."""
        h = SupervisorHarness(
            yaml_for("a", "b", "c", top="groups:\n  g: {swap: false, members: [a, b]}")
        )
        both = [h.sup.acquire_by_name("a"), h.sup.acquire_by_name("b")]
        self.assertEqual(h.spawned(), ["a", "b"])  # started in parallel
        h.healthy()
        h.tick()
        for d in both:
            self.successResultOf(d).release()
        self.assertEqual(self.running(h), ["a", "b"])
        self.assertEqual(h.kill.sent, [])
        self.ready(h, "c")  # default group: exclusive, g is not persistent
        self.assertEqual(self.running(h), ["c"])
        self.assertEqual(h.max_running, 2)

    def test_swap_group_members_replace_each_other(self) -> None:
        """A swap:true group: b replaces a; an exclusive default-group model stops b."""
        h = SupervisorHarness(yaml_for("a", "b", "c", top="groups:\n  g: {members: [a, b]}"))
        self.ready(h, "a")
        self.ready(h, "b")
        self.assertEqual(self.running(h), ["b"])
        self.ready(h, "c")
        self.assertEqual(self.running(h), ["c"])
        self.assertEqual(h.max_running, 1)

    def test_persistent_group_survives_an_exclusive_load(self) -> None:
        """A persistent group's member is never stopped by another group's load."""
        top = (
            "groups:\n"
            "  keep: {persistent: true, exclusive: false, members: [e]}\n"
            "  chat: {members: [a, b]}"
        )
        h = SupervisorHarness(yaml_for("a", "b", "e", "d", top=top))
        self.ready(h, "e")
        self.ready(h, "a")
        self.ready(h, "b")  # swaps a for b, keeps e
        self.ready(h, "d")  # default group: exclusive, stops chat but not keep
        self.assertEqual(self.running(h), ["e", "d"])
        self.assertEqual([s.model_id for s in h.sup.statuses() if s.state == "stopped"], ["a", "b"])

    def test_persistent_and_exclusive_group_stops_others(self) -> None:
        """Persistence protects a group; its own exclusive loads still stop the others."""
        top = "groups:\n  keep: {persistent: true, members: [e]}"
        h = SupervisorHarness(yaml_for("a", "e", top=top))
        self.ready(h, "a")
        self.ready(h, "e")
        self.assertEqual(self.running(h), ["e"])
        self.ready(h, "a")  # the default group is exclusive, but keep is persistent
        self.assertEqual(self.running(h), ["a", "e"])

    def test_non_exclusive_group_unloads_nothing_outside(self) -> None:
        """
        Loading a member of an exclusive:false group stops no other group, not
        even an exclusive one; loading the exclusive one again stops it.
        """
        top = "groups:\n  side: {exclusive: false, members: [n]}"
        h = SupervisorHarness(yaml_for("a", "n", top=top))
        self.ready(h, "a")
        self.ready(h, "n")
        self.assertEqual(self.running(h), ["a", "n"])
        self.assertEqual(h.kill.sent, [])
        self.ready(h, "a")  # a's (default) group is exclusive and side is not persistent
        self.assertEqual(self.running(h), ["a"])

    def test_load_waits_for_in_flight_requests_of_the_group(self) -> None:
        """A swap inside a group still waits for the member's in-flight requests."""
        h = SupervisorHarness(yaml_for("a", "b", "n", top="groups:\n  g: {members: [a, b]}"))
        d = h.sup.acquire_by_name("a")
        h.healthy()
        h.tick()
        lease = self.successResultOf(d)
        b = h.sup.acquire_by_name("b")
        h.reactor.advance(60)
        self.assertNoResult(b)
        self.assertEqual(h.kill.sent, [])
        lease.release()
        h.tick()
        self.successResultOf(b)

    def test_profile_request_keeps_persistent_members(self) -> None:
        """p:m stops what is outside the profile, except persistent groups' members."""
        top = (
            "profiles:\n  p: [a, b]\n"
            "groups:\n  keep: {persistent: true, exclusive: false, members: [e]}\n"
            "  g: {members: [a, b]}"
        )
        h = SupervisorHarness(yaml_for("a", "b", "c", "e", top=top))
        self.ready(h, "e")
        self.ready(h, "c")
        self.ready(h, "p:a")
        self.ready(h, "p:b")  # the profile wins over g's swap for its own members
        self.assertEqual(self.running(h), ["a", "b", "e"])
        self.assertEqual(
            may_run_with(h.sup.names, h.sup.names.local("p:a")), frozenset({"a", "b", "e"})
        )

    def test_waiters_for_compatible_models_do_not_block_each_other(self) -> None:
        """Queued requests for models that may coexist start together, in any order."""
        top = "groups:\n  g: {swap: false, members: [b, c]}"
        h = SupervisorHarness(yaml_for("a", "b", "c", top=top))
        d = h.sup.acquire_by_name("a")
        h.healthy()
        h.tick()
        lease = self.successResultOf(d)
        b, c = h.sup.acquire_by_name("b"), h.sup.acquire_by_name("c")
        lease.release()  # a stops; then b and c start at once
        self.assertEqual(sorted(h.spawned()), ["a", "b", "c"])
        h.tick()
        self.successResultOf(b)
        self.successResultOf(c)


class MatrixTests(_ReadyModelsCase):
    """llama-swap's matrix: sets of co-resident models, cheapest eviction (item 87)."""

    TOP = (
        "matrix:\n"
        "  vars: {x: a}\n"
        "  evict_costs: {c: 3}\n"
        "  sets:\n"
        "    one: 'x & b'\n"
        "    two: 'a & c'\n"
        "    three: 'b & c'\n"
    )

    def setUp(self) -> None:
        self.logged: list[str] = []
        self.patch(Supervisor, "log", Logger(observer=self._observe))

    def _observe(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        if text.startswith("matrix:"):
            self.logged.append(text)

    def test_models_sharing_a_set_stay_up(self) -> None:
        """b shares a set with the running a: nothing is evicted, both run."""
        h = SupervisorHarness(yaml_for("a", "b", "c", "e", top=self.TOP))
        self.ready(h, "a")
        self.ready(h, "b")
        self.assertEqual(self.running(h), ["a", "b"])
        self.assertEqual(h.kill.sent, [])
        self.assertEqual(
            self.logged,
            [
                "matrix: model=a set=one evict=[] cost=0",
                "matrix: model=b set=one evict=[] cost=0",
            ],
        )

    def test_equal_costs_go_to_the_first_set(self) -> None:
        """
        With a and b running, c fits with either (sets two and three, one
        eviction each): two is defined first, so b is stopped and a stays.
        """
        h = SupervisorHarness(yaml_for("a", "b", "c", "e", top=self.TOP))
        self.ready(h, "a")
        self.ready(h, "b")
        del self.logged[:]
        self.ready(h, "c")
        self.assertEqual(self.running(h), ["a", "c"])
        self.assertEqual(self.logged, ["matrix: model=c set=two evict=[b] cost=1"])
        self.assertEqual(h.spawned(), ["a", "b", "c"])

    def test_eviction_cost_keeps_the_expensive_model(self) -> None:
        """With b and c running, a keeps c (cost 3) and evicts b (cost 1)."""
        h = SupervisorHarness(yaml_for("a", "b", "c", "e", top=self.TOP))
        self.ready(h, "b")
        self.ready(h, "c")
        del self.logged[:]
        self.ready(h, "a")
        self.assertEqual(self.running(h), ["a", "c"])
        self.assertEqual(self.logged, ["matrix: model=a set=two evict=[b] cost=1"])

    def test_model_in_no_set_runs_alone(self) -> None:
        """e is in no set: everything else is stopped first, and e then runs alone."""
        h = SupervisorHarness(yaml_for("a", "b", "c", "e", top=self.TOP))
        self.ready(h, "b")
        self.ready(h, "c")
        del self.logged[:]
        self.ready(h, "e")
        self.assertEqual(self.running(h), ["e"])
        self.assertEqual(self.logged, ["matrix: model=e set=(none) evict=[b, c] cost=4"])
        self.ready(h, "e")  # already running: no swap, no decision logged
        self.assertEqual(len(self.logged), 1)

    def test_eviction_waits_for_in_flight_requests(self) -> None:
        """A conflicting model is stopped only once its requests ended."""
        h = SupervisorHarness(yaml_for("a", "b", "c", "e", top=self.TOP))
        d = h.sup.acquire_by_name("a")
        h.healthy()
        h.tick()
        lease = self.successResultOf(d)
        b = h.sup.acquire_by_name("b")  # compatible: starts at once, beside the busy a
        h.tick()
        self.successResultOf(b).release()
        e = h.sup.acquire_by_name("e")
        h.reactor.advance(60)
        self.assertNoResult(e)
        self.assertEqual(h.state("b"), "ready")  # not stopped while a keeps e waiting
        self.assertEqual(h.kill.sent, [])
        lease.release()
        h.tick()
        self.successResultOf(e)
        self.assertEqual(self.running(h), ["e"])

    def test_incompatible_request_keeps_its_place(self) -> None:
        """A later request that a queued swap would evict waits behind it (FIFO)."""
        top = "matrix:\n  sets:\n    pair: 'a & b'\n    solo: c\n"
        h = SupervisorHarness(yaml_for("a", "b", "c", top=top))
        d = h.sup.acquire_by_name("a")
        h.healthy()
        h.tick()
        lease = self.successResultOf(d)
        c = h.sup.acquire_by_name("c")  # must evict a, which is busy
        b = h.sup.acquire_by_name("b")  # fits beside a, but c is first and excludes b
        h.tick()
        self.assertNoResult(c)
        self.assertNoResult(b)
        self.assertEqual(h.spawned(), ["a"])
        lease.release()
        h.tick()
        lease_c = self.successResultOf(c)
        self.assertNoResult(b)
        self.assertEqual(h.spawned(), ["a", "c"])
        lease_c.release()
        h.tick()
        self.successResultOf(b)
        self.assertEqual(self.running(h), ["b"])
        self.assertEqual(h.max_running, 1)

    def test_compatible_waiters_start_together(self) -> None:
        """Queued requests for two models of one set start in parallel after the eviction."""
        top = "matrix:\n  sets:\n    pair: 'b & c'\n    solo: a\n"
        h = SupervisorHarness(yaml_for("a", "b", "c", top=top))
        d = h.sup.acquire_by_name("a")
        h.healthy()
        h.tick()
        lease = self.successResultOf(d)
        b, c = h.sup.acquire_by_name("b"), h.sup.acquire_by_name("c")
        lease.release()
        self.assertEqual(sorted(h.spawned()), ["a", "b", "c"])
        h.tick()
        self.successResultOf(b)
        self.successResultOf(c)
        self.assertEqual(self.running(h), ["b", "c"])
        self.assertEqual(len([t for t in self.logged if "evict=[a]" in t]), 1)

    def test_profiles_keep_their_meaning(self) -> None:
        """A profile:model request uses the profile's members, not the matrix."""
        top = "profiles:\n  p: [a, c]\nmatrix:\n  sets:\n    pair: 'a & b'\n"
        h = SupervisorHarness(yaml_for("a", "b", "c", top=top))
        self.ready(h, "a")
        self.ready(h, "b")
        self.ready(h, "p:c")  # the matrix would stop a and b (c is in no set)
        self.assertEqual(self.running(h), ["a", "c"])
        self.assertEqual(h.state("b"), "stopped")


class UnloadAndStatusTests(SynchronousTestCase):
    def test_unload_one_and_all(self) -> None:
        """unload(id or alias) stops that model; unload() stops everything."""
        text = yaml_for("a", "b", extra={"a": 'aliases: ["alpha"]'}, top="profiles:\n  p: [a, b]")
        h = SupervisorHarness(text)
        h.healthy()
        for name in ("p:a", "p:b"):
            d = h.sup.acquire_by_name(name)
            h.tick()
            self.successResultOf(d).release()
        self.successResultOf(h.sup.unload("alpha"))
        self.assertEqual((h.state("a"), h.state("b")), ("stopped", "ready"))
        self.successResultOf(h.sup.unload())
        self.assertEqual((h.state("a"), h.state("b")), ("stopped", "stopped"))
        self.failureResultOf(h.sup.unload("nope"), ModelNotFound)

    def test_unload_does_not_wait_for_in_flight(self) -> None:
        """Explicit unload stops a model even while it serves."""
        h = SupervisorHarness(yaml_for("a"))
        h.healthy()
        d = h.sup.acquire_by_name("a")
        h.tick()
        lease = self.successResultOf(d)
        self.successResultOf(h.sup.unload("a"))
        lease.release()
        self.assertEqual(h.sup.status("a").in_flight, 0)

    def test_unload_while_starting_fails_the_waiters(self) -> None:
        """Unloading a starting model aborts the start."""
        h = SupervisorHarness(yaml_for("a"))
        d = h.sup.acquire_by_name("a")
        self.successResultOf(h.sup.unload("a"))
        self.assertIn("aborted", self.failureResultOf(d, StartFailed).value.message)
        self.assertEqual(h.state("a"), "stopped")

    def test_statuses_and_events(self) -> None:
        """statuses() lists models in config order; every transition is published."""
        h = SupervisorHarness(yaml_for("b", "a", extra={"a": "ttl: 30"}))
        h.healthy()
        d = h.sup.acquire_by_name("a")
        h.tick()
        lease = self.successResultOf(d)
        pid = h.child_of("a").original_pid
        self.assertEqual(
            h.sup.statuses(),
            [
                ModelStatus(
                    model_id="b",
                    state="stopped",
                    pid=None,
                    in_flight=0,
                    ttl=0,
                    ttl_remaining=None,
                    last_error=None,
                ),
                ModelStatus(
                    model_id="a",
                    state="ready",
                    pid=pid,
                    in_flight=1,
                    ttl=30,
                    ttl_remaining=None,
                    last_error=None,
                ),
            ],
        )
        lease.release()
        self.successResultOf(h.sup.unload())
        self.assertEqual(
            h.published, [("a", "starting"), ("a", "ready"), ("a", "stopping"), ("a", "stopped")]
        )
        self.assertRaises(ModelNotFound, h.sup.status, "nope")


class ServiceTests(SynchronousTestCase):
    def test_stop_service_waits_for_every_child(self) -> None:
        """stopService fires only when all children ended; SIGKILL after the grace."""
        h = SupervisorHarness(yaml_for("a", "b", top="profiles:\n  p: [a, b]"))
        h.healthy()
        for name in ("p:a", "p:b"):
            d = h.sup.acquire_by_name(name)
            h.tick()
            self.successResultOf(d)
        h.child_of("a").dies_on = {signal.SIGKILL}
        h.sup.startService()
        stopped = h.sup.stopService()
        self.assertEqual(h.state("b"), "stopped")
        self.assertNoResult(stopped)
        h.reactor.advance(5)
        self.successResultOf(stopped)
        self.assertEqual(h.reactor.live(), [])
        self.failureResultOf(h.sup.acquire_by_name("a"), ShuttingDown)

    def test_stop_service_fails_queued_requests(self) -> None:
        """Requests still waiting when shutdown starts get ShuttingDown."""
        h = SupervisorHarness(yaml_for("a"))
        d = h.sup.acquire_by_name("a")
        stopped = h.sup.stopService()
        self.failureResultOf(d, ShuttingDown)
        self.successResultOf(stopped)

    def test_preload_on_start(self) -> None:
        """Models in hooks.on_startup.preload are started (and released) in order."""
        top = "hooks:\n  on_startup:\n    preload: [a, b]\nprofiles:\n  p: [a, b]"
        h = SupervisorHarness(yaml_for("a", "b", top=top))
        h.healthy()
        h.sup.startService()
        h.tick(3)
        self.assertEqual(h.spawned(), ["a", "b"])
        self.assertEqual(h.state("b"), "ready")
        self.assertEqual(h.sup.status("b").in_flight, 0)
        self.successResultOf(h.sup.stopService())

    def test_preload_failure_is_logged_not_fatal(self) -> None:
        """A preload that fails is logged; the service keeps running."""
        h = SupervisorHarness(yaml_for("a", top="hooks:\n  on_startup:\n    preload: [a]"))
        h.sup.startService()
        h.child_of("a").exit(code=3)
        self.assertEqual(h.state("a"), "failed")
        self.assertTrue(h.sup.running)
        h.healthy()
        d: Deferred[Lease] = h.sup.acquire_by_name("a")
        h.tick()
        self.successResultOf(d)
        self.successResultOf(h.sup.stopService())
