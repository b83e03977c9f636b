# -*- test-case-name: tests.test_memory_admission -*-
"""
The supervisor's memory book: each device's budget, what every occupied
model holds, the gate a start passes before it spawns, and the measurement
taken once a server is ready.

What a model holds is its plan's figure from its start until it is measured,
then the measured figure, until its server ended. The gate reads the device:
a start waits (up to C{releaseTimeout}) until the free memory it was promised
is really free, since a driver frees a dead process's memory a moment after
the process is gone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from llamaswap.config import ConfigError, MemoryConfig, ModelConfig
from llamaswap.config._memory import budgets, check_fits
from llamaswap.config.schema import ANY_DEVICE
from llamaswap.config.sizes import format_size
from llamaswap.memory.admission import Holder, Plan, need, options, plan
from llamaswap.memory.probe import MemInfo, NvidiaSmi, Probe, ProbeError, Reading
from llamaswap.memory.store import MeasuredStore

GATE_POLL = 0.25  # seconds between readings while a start waits for memory
NOISE = 64 * 2**20  # a used-memory change smaller than this is not a server's


def make_probe(config: MemoryConfig, reactor: Any) -> Probe | None:
    """The source C{memory.source} names; None for C{none} (declared figures only)."""
    if config.source == "nvidia-smi":
        return NvidiaSmi(config.nvidia_smi, reactor)
    if config.source == "meminfo":
        return MemInfo()
    return None


class MemoryLedger:
    """See the module docstring; one per supervisor."""

    log = Logger()

    def __init__(
        self,
        config: MemoryConfig,
        models: Mapping[str, ModelConfig],
        *,
        probe: Probe | None,
        clock: IReactorTime,
    ) -> None:
        """
        @raise ConfigError: no device totals (the source failed and none are
            declared), or a declared figure larger than its device's budget.
        """
        self.config = config
        self._probe = probe
        self._clock = clock
        totals: dict[str, int] = {}
        if probe is not None:
            try:
                totals = probe.totals()
            except ProbeError as e:
                if not config.devices:
                    raise ConfigError(
                        f"memory: {e} (declare memory.devices, or use source: meminfo "
                        "or source: none)"
                    ) from e
                self.log.warn("memory: {error}; using memory.devices", error=str(e))
        totals.update(config.devices)
        self.totals = totals
        self.budget = budgets(totals, config.reserve)
        self.check_models(models)
        self.store = MeasuredStore(config.state_file)
        self.holding: dict[str, dict[str, int]] = {}  # model id -> bytes by device, occupied ones
        self._loading: dict[str, Callable[[], int | None]] = {}  # starting: their pid
        self._before: dict[str, Reading] = {}  # the gate's last reading, for the delta fallback
        self._too_large: dict[str, str] = {}  # measured beyond the budget: refused from now on
        self.gate_waits = 0  # starts that waited for memory to come back
        self.gate_timeouts = 0  # ... and started anyway after releaseTimeout
        self.gate_seconds = 0.0

    def check_models(self, models: Mapping[str, ModelConfig]) -> None:
        """@raise ConfigError: a declared figure exceeds its device's budget."""
        for model in models.values():
            if model.memory is not None:
                check_fits(f"models.{model.id}", model, self.budget)

    # --- admission ---------------------------------------------------------

    def needed(self, model: ModelConfig) -> dict[str, int] | None:
        return need(model.memory, self.store.get(model))

    def refusal(self, model: ModelConfig) -> str | None:
        """Why C{model} can never be admitted, or None."""
        return self._too_large.get(model.id)

    def plan(
        self, model: ModelConfig, holders: Sequence[Holder], reserved: Mapping[str, int]
    ) -> Plan | None:
        layouts = options(self.needed(model), model.placed, self.budget)
        return plan(layouts, self.budget, holders, reserved)

    # --- a server's life ---------------------------------------------------

    def started(
        self, model_id: str, devices: Mapping[str, int], pid: Callable[[], int | None]
    ) -> None:
        """A start was planned on C{devices}: they are held from now."""
        self.holding[model_id] = dict(devices)
        self._loading[model_id] = pid

    def ended(self, model_id: str) -> None:
        """The server is gone (the gate, not this, waits for its memory to come back)."""
        self.holding.pop(model_id, None)
        self._loading.pop(model_id, None)
        self._before.pop(model_id, None)

    def gate(self, model_id: str) -> Deferred[None]:
        """
        Fire once the memory C{model_id} was promised is free on its devices,
        or after C{releaseTimeout} (logged); at once without a probe.
        Cancelling it (the start was aborted) stops the polling.
        """
        return Deferred.fromCoroutine(self._gate(model_id))

    async def _gate(self, model_id: str) -> None:
        devices = self.holding.get(model_id, {})
        if self._probe is None or self.config.release_timeout <= 0 or not devices:
            return
        started = self._clock.seconds()
        waiting = False
        while True:
            try:
                reading = await self._probe.read()
            except ProbeError as e:
                # A reading that failed says nothing: look again, up to the same bound.
                if self._clock.seconds() - started >= self.config.release_timeout:
                    self.log.warn(
                        "memory: {error}; starting {model} without checking",
                        error=str(e),
                        model=model_id,
                    )
                    return
                await deferLater(self._clock, GATE_POLL, lambda: None)
                continue
            self._before[model_id] = reading
            short = self._short(model_id, devices, reading)
            waited = self._clock.seconds() - started
            if not short:
                if waiting:
                    self.gate_seconds += waited
                    self.log.info(
                        "memory: {model} starts after {seconds:.1f}s: the memory came back",
                        model=model_id,
                        seconds=waited,
                    )
                return
            if not waiting:
                waiting = True
                self.gate_waits += 1
                self.log.info(
                    "memory: {model} waits for memory to come back: {short}",
                    model=model_id,
                    short=short,
                )
            if waited >= self.config.release_timeout:
                self.gate_timeouts += 1
                self.gate_seconds += waited
                self.log.warn(
                    "memory: {model} starts anyway: memory did not come back within "
                    "memory.releaseTimeout ({timeout:g}s): {short}",
                    model=model_id,
                    timeout=self.config.release_timeout,
                    short=short,
                )
                return
            await deferLater(self._clock, GATE_POLL, lambda: None)

    def _short(self, model_id: str, devices: Mapping[str, int], reading: Reading) -> str:
        """What is missing on C{devices}, for the log; empty if nothing is."""
        missing = []
        for dev, size in devices.items():
            device = reading.devices.get(dev)
            if device is None:
                continue
            # Others loading on the device take what they were promised, less what they hold.
            promised = sum(
                held.get(dev, 0) - self._group_usage(other, reading).get(dev, 0)
                for other, held in self.holding.items()
                if other != model_id and other in self._loading
            )
            if device.free - max(0, promised) < size:
                missing.append(
                    f"device {dev}: {format_size(size)} needed, {format_size(device.free)} free"
                    + (f", {format_size(promised)} promised to loading models" if promised else "")
                )
        return "; ".join(missing)

    def _group_usage(self, model_id: str, reading: Reading) -> dict[str, int]:
        """What C{model_id}'s process group holds in C{reading}, by device."""
        pid = self._loading[model_id]() if model_id in self._loading else None
        usage: dict[str, int] = {}
        if pid is None or reading.processes is None:
            return usage
        assert self._probe is not None
        for member in self._probe.group(pid):
            for dev, size in reading.processes.get(member, {}).items():
                usage[dev] = usage.get(dev, 0) + size
        return usage

    def ready(self, model: ModelConfig) -> Deferred[None]:
        """The server is ready: measure what it holds, remember it. Never errbacks."""
        return Deferred.fromCoroutine(self._measure(model))

    async def _measure(self, model: ModelConfig) -> None:
        pid_of = self._loading.get(model.id)
        pid = pid_of() if pid_of is not None else None
        if self._probe is None or pid is None:
            self._loading.pop(model.id, None)
            return
        members = self._probe.group(pid)
        try:
            reading = await self._probe.read(members)
        except ProbeError as e:
            self.log.warn("memory: cannot measure {model}: {error}", model=model.id, error=str(e))
            return
        finally:
            self._loading.pop(model.id, None)
        usage = self._usage(model.id, members, reading)
        if usage is None or model.id not in self.holding:
            return  # not measurable, or stopped meanwhile
        self.holding[model.id] = usage
        total = sum(usage.values())
        self.store.put(model, {ANY_DEVICE: total} if model.placed else usage, self._clock.seconds())
        self.log.info(
            "memory: {model} holds {usage} (declared: {declared})",
            model=model.id,
            usage=", ".join(f"{format_size(s)} on {d}" for d, s in sorted(usage.items()))
            or "nothing",
            declared=describe(model.memory),
        )
        over = [d for d, s in usage.items() if s > self.budget.get(d, 0)]
        if over:
            message = (
                f"model {model.id} holds {format_size(usage[over[0]])} on device {over[0]}, more "
                f"than its whole budget ({format_size(self.budget.get(over[0], 0))}: the device's "
                "memory less memory.reserve); it will not be started again until its command "
                "or the budget changes"
            )
            self._too_large[model.id] = message
            self.log.error("memory: {message}", message=message)

    def _usage(self, model_id: str, members: set[int], reading: Reading) -> dict[str, int] | None:
        """C{members}' figures, else the devices' used-memory change across the load."""
        usage: dict[str, int] = {}
        for member in members:
            for dev, size in (reading.processes or {}).get(member, {}).items():
                usage[dev] = usage.get(dev, 0) + size
        if usage:
            return usage
        before = self._before.get(model_id)
        if before is None:
            return {} if reading.processes is not None else None
        for dev, device in reading.devices.items():
            earlier = before.devices.get(dev)
            if earlier is not None and device.used - earlier.used > NOISE:
                usage[dev] = device.used - earlier.used
        return usage

    def settled(self) -> Deferred[None]:
        """Fire once no reading of the devices is under way (for a clean stop)."""
        return succeed(None) if self._probe is None else self._probe.settled()

    # --- views -------------------------------------------------------------

    def model_view(self, model: ModelConfig) -> dict[str, Any]:
        """Declared vs measured vs held (bytes by device), for /running and the UI."""
        return {
            "declared": None if model.memory is None else dict(model.memory),
            "measured": self.store.get(model),
            "holds": self.holding.get(model.id),
        }

    def devices_view(self) -> list[dict[str, Any]]:
        """Each device: memory, budget, and what the models running on it hold."""
        return [
            {
                "device": dev,
                "total": self.totals[dev],
                "budget": self.budget[dev],
                "allocated": sum(held.get(dev, 0) for held in self.holding.values()),
            }
            for dev in sorted(self.budget)
        ]


def describe(figures: Mapping[str, int] | None) -> str:
    if figures is None:
        return "none"
    return ", ".join(
        format_size(size) + ("" if dev == ANY_DEVICE else f" on {dev}")
        for dev, size in sorted(figures.items())
    )
