"""
A fake memory probe for the supervisor's unit tests: what each fake child
holds comes from its model's figure, on the device its C{CUDA_VISIBLE_DEVICES}
names (else the figure's own); a child that exited keeps its memory for
C{linger} more seconds of the fake clock, as a real driver does for a moment.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from twisted.internet.defer import Deferred, fail, succeed

from llamaswap.memory.probe import DeviceReading, ProbeError, Reading
from llamaswap.testing.process import FakeChild, FakeProcessReactor


class FakeProbe:
    def __init__(
        self,
        reactor: FakeProcessReactor,
        totals: Mapping[str, int],
        usage: Mapping[str, Mapping[str, int]],
        *,
        per_process: bool = True,
        linger: float = 0.0,
    ) -> None:
        self.reactor = reactor
        self.devices = dict(totals)
        self.usage = {name: dict(u) for name, u in usage.items()}  # model name -> device -> bytes
        self.per_process = per_process
        self.linger = linger
        self.foreign = dict.fromkeys(totals, 0)  # held by something else
        self.reads = 0
        self.failures = 0  # the next reads that fail, as an nvidia-smi that errs does
        self._exited: dict[int, float] = {}  # pid -> when its child was seen gone

    def held(self, child: FakeChild) -> dict[str, int]:
        name = child.args[child.args.index("--name") + 1] if "--name" in child.args else ""
        usage = self.usage.get(name, {})
        visible = child.env.get("CUDA_VISIBLE_DEVICES")
        if visible is not None and len(usage) == 1:
            return {visible: sum(usage.values())}
        return dict(usage)

    def _holders(self) -> list[tuple[int, dict[str, int], bool]]:
        now = self.reactor.seconds()
        found = []
        for child in self.reactor.children:
            pid = child.original_pid
            if child.exited:
                gone = self._exited.setdefault(pid, now)
                if now >= gone + self.linger:
                    continue
            found.append((pid, self.held(child), not child.exited))
        return found

    def totals(self) -> dict[str, int]:
        return dict(self.devices)

    def read(self, pids: Collection[int] = ()) -> Deferred[Reading]:
        self.reads += 1
        if self.failures:
            self.failures -= 1
            return fail(ProbeError("nvidia-smi failed (exit status 15): driver busy"))
        used = dict(self.foreign)
        processes: dict[int, Mapping[str, int]] = {}
        for pid, usage, alive in self._holders():
            for dev, size in usage.items():
                used[dev] = used.get(dev, 0) + size
            if alive:
                processes[pid] = usage
        devices = {d: DeviceReading(d, total, used.get(d, 0)) for d, total in self.devices.items()}
        return succeed(Reading(devices, processes if self.per_process else None))

    def group(self, pgid: int) -> set[int]:
        return {pgid}

    def settled(self) -> Deferred[None]:
        return succeed(None)
