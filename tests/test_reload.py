"""
Reloading the config (docs/deployment.md, "Reloading the configuration"):
what changes model by model, on the supervisor with fake processes; the file
watcher on a fake clock; ports that stay put.
"""

from __future__ import annotations

import os

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import ConfigError, parse_config
from llamaswap.config.diff import diff_configs
from llamaswap.errors import ModelNotFound
from llamaswap.lifecycle.watch import POLL_SECONDS, ConfigWatcher
from llamaswap.supervisor import Lease
from llamaswap.testing.process import make_config
from tests.test_supervisor import SupervisorHarness, yaml_for


class DiffTests(SynchronousTestCase):
    def test_what_each_model_gets(self) -> None:
        old = make_config(yaml_for("a", "b", "c", "d", extra={"d": "ttl: 5"}))
        kept = {m.id: m.port for m in old.models.values() if m.port is not None}
        new = parse_config(
            yaml_for("a", "b", "d", "e", extra={"b": "env: [X=1]", "d": "ttl: 9"}),
            kept_ports=kept,
        )
        diff = diff_configs(old, new)
        self.assertEqual(
            (diff.added, diff.removed, diff.restarted, diff.updated, diff.unchanged),
            (("e",), ("c",), ("b",), ("d",), ("a",)),
        )

    def test_ports_stay_with_their_models(self) -> None:
        """A model added before others in id order takes a free port, not theirs."""
        old = parse_config(yaml_for("b", "c"))
        kept = {m.id: m.port for m in old.models.values() if m.port is not None}
        new = parse_config(yaml_for("a", "b", "c"), kept_ports=kept)
        self.assertEqual(
            {m: new.models[m].port for m in ("b", "c")}, {m: old.models[m].port for m in ("b", "c")}
        )
        self.assertNotIn(new.models["a"].port, kept.values())
        self.assertEqual(diff_configs(old, new).unchanged, ("b", "c"))


class SupervisorReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = SupervisorHarness(
            yaml_for(
                "a",
                "b",
                "c",
                top="queue: {minResidency: 0}\ngroups: {all: {swap: false, members: [a, b, c]}}",
            )
        )
        self.h.healthy()

    def reload(self, *names: str, extra: dict[str, str] | None = None) -> None:
        members = ", ".join(names)
        top = f"queue: {{minResidency: 0}}\ngroups: {{all: {{swap: false, members: [{members}]}}}}"
        kept = {m.id: m.port for m in self.h.config.models.values() if m.port is not None}
        new = parse_config(yaml_for(*names, top=top, extra=extra), kept_ports=kept)
        self.h.sup.check_reload(new)
        self.h.sup.reload(new)
        self.h.config = new
        self.h.healthy()

    def lease(self, name: str) -> Lease:
        d = self.h.sup.acquire_by_name(name)
        self.h.tick(3)
        return self.successResultOf(d)

    def test_unchanged_model_keeps_its_server_and_ttl(self) -> None:
        self.reload("a", "b", "c", extra={"a": "ttl: 30"})
        self.lease("a").release()
        pid = self.h.sup.status("a").pid
        self.h.reactor.advance(20)
        self.reload("a", "b", "c", extra={"a": "ttl: 30", "b": "description: new"})
        self.assertEqual(self.h.sup.status("a").pid, pid)
        self.assertAlmostEqual(self.h.sup.status("a").ttl_remaining or 0, 10, delta=0.5)
        self.h.reactor.advance(11)
        self.assertEqual(self.h.state("a"), "stopped")  # the same timer ran out

    def test_changed_model_finishes_then_restarts_with_new_settings(self) -> None:
        held = self.lease("b")
        old_pid = self.h.sup.status("b").pid
        self.reload("a", "b", "c", extra={"b": "env: [MODE=new]"})
        queued = self.h.sup.acquire_by_name("b")
        self.h.tick(3)
        self.assertNoResult(queued)  # not on the old server
        self.assertEqual(self.h.kill.sent, [])  # the request in flight goes on
        held.release()
        self.h.tick(5)
        lease = self.successResultOf(queued)
        self.assertNotEqual(self.h.sup.status("b").pid, old_pid)
        self.assertEqual(self.h.reactor.children[-1].env.get("MODE"), "new")
        self.assertEqual(lease.model.env.get("MODE"), "new")
        self.assertIn(("b", "stopping"), self.h.published)

    def test_removed_model_drains_then_goes(self) -> None:
        held = self.lease("c")
        self.reload("a", "b")
        self.failureResultOf(self.h.sup.acquire_by_name("c"), ModelNotFound)
        self.assertIn("c", [s.model_id for s in self.h.sup.statuses()])  # still draining
        self.assertEqual(self.h.kill.sent, [])
        held.release()
        self.h.tick(3)
        self.assertNotIn("c", [s.model_id for s in self.h.sup.statuses()])
        self.assertEqual(self.h.reactor.live(), [])

    def test_queued_request_for_removed_model_fails(self) -> None:
        d = self.h.sup.acquire_by_name("c")  # starting
        self.reload("a", "b")
        failure = self.failureResultOf(d, ModelNotFound)
        self.assertIn("removed by a config reload", str(failure.value))

    def test_added_model_at_once(self) -> None:
        self.reload("a", "b", "c", "d")
        self.assertEqual(self.lease("d").model.id, "d")

    def test_memory_section_needs_a_restart(self) -> None:
        new = parse_config(yaml_for("a", top="memory: {source: none, devices: {0: 8G}}"))
        with self.assertRaises(ConfigError) as e:
            self.h.sup.check_reload(new)
        self.assertIn("restart llamaswap", str(e.exception))


class WatcherTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = self.mktemp()
        self.write("one")
        self.clock = Clock()
        self.seen: list[float] = []
        self.watcher = ConfigWatcher(
            self.path, self.clock, lambda: self.seen.append(self.clock.seconds())
        )
        self.watcher.start()
        self.addCleanup(self.watcher.stop)

    def write(self, text: str, rename: bool = False) -> None:
        target = self.path + ".tmp" if rename else self.path
        with open(target, "w") as f:
            f.write(text)
        if rename:
            os.replace(target, self.path)

    def look(self, times: int = 1) -> None:
        for _ in range(times):
            self.clock.advance(POLL_SECONDS)

    def test_change_is_reloaded_once_it_holds_still(self) -> None:
        self.look(2)
        self.assertEqual(self.seen, [])
        self.write("two, longer")
        self.look()
        self.assertEqual(self.seen, [])  # changed: wait one more look
        self.look()
        self.assertEqual(len(self.seen), 1)
        self.look(4)
        self.assertEqual(len(self.seen), 1)

    def test_rename_on_save_and_missing_moments(self) -> None:
        os.remove(self.path)
        self.look(2)  # missing: nothing happens
        self.write("three", rename=True)
        self.look(2)
        self.assertEqual(len(self.seen), 1)
