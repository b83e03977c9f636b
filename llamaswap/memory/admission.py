# -*- test-case-name: tests.test_memory -*-
"""
The admission rule, pure: where a model goes and which models must stop
first so that it fits.

Each device has a budget (its memory less the reserve). What runs holds
memory on devices (a L{Holder}); a model to start needs memory on one or
more devices (its L{options}: one per device it may be placed on). It fits
beside what runs if every device it needs has room; otherwise holders on the
short devices are chosen to stop, cheapest first: those already stopping,
then idle ones, least recently used first, then busy or loading ones (which
are never stopped: the plan then L{waits<Plan.waits>} until they are idle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from attrs import frozen

from llamaswap.config.schema import ANY_DEVICE

STOPPING, IDLE, BUSY = 0, 1, 2  # a holder's stage: what stopping it costs


@frozen
class Holder:
    """A model that holds memory: C{usage} bytes by device."""

    model_id: str
    usage: Mapping[str, int]
    stage: int  # STOPPING, IDLE or BUSY (serving, or loading)
    last_used: float  # clock seconds: when its last request ended


@frozen
class Plan:
    """Start the model on C{devices} (bytes by device) once C{victims} stopped."""

    devices: Mapping[str, int]
    victims: tuple[str, ...]
    waits: bool  # a victim is busy or loading: nothing may be stopped yet

    @property
    def device(self) -> str:
        """The device it goes on (the first, for a model that spans several)."""
        return next(iter(self.devices))


def need(
    declared: Mapping[str, int] | None, measured: Mapping[str, int] | None
) -> dict[str, int] | None:
    """
    What a model needs, by device (C{ANY_DEVICE} for one figure): the larger
    of the declared and the measured figure on each device; None if neither is known.
    """
    if declared is None and measured is None:
        return None
    result: dict[str, int] = {}
    for figures in (declared or {}, measured or {}):
        for dev, size in figures.items():
            result[dev] = max(result.get(dev, 0), size)
    return result


def options(
    needed: Mapping[str, int] | None, placed: bool, budget: Mapping[str, int]
) -> list[dict[str, int]]:
    """
    The ways a model may be laid out: one per device for a placed model,
    else the one its figures give (one figure: the first device). An unknown
    need takes a device's whole budget (all devices, unless placed) until it
    is measured.
    """
    devices = sorted(budget)
    if placed:
        size = None if needed is None else sum(needed.values())
        return [{dev: budget[dev] if size is None else size} for dev in devices]
    if needed is None:
        return [{dev: budget[dev] for dev in devices}]
    if set(needed) == {ANY_DEVICE}:
        return [{devices[0]: needed[ANY_DEVICE]}]
    return [{dev: size for dev, size in needed.items() if dev != ANY_DEVICE}]


def plan(
    layouts: Sequence[Mapping[str, int]],
    budget: Mapping[str, int],
    holders: Sequence[Holder],
    reserved: Mapping[str, int],
) -> Plan | None:
    """
    The best way to start a model laid out as one of C{layouts}: fewest
    busy victims, then fewest victims, then the most room left. C{reserved}
    is memory earlier requests wait for. None if no layout fits even with
    every holder gone (a layout on an unknown device never fits).
    """
    best: tuple[tuple[int, int, int], Plan] | None = None
    order = sorted(holders, key=lambda h: (h.stage, h.last_used, h.model_id))
    for layout in layouts:
        if any(dev not in budget for dev in layout):
            continue
        room = {
            dev: budget[dev] - reserved.get(dev, 0) - sum(h.usage.get(dev, 0) for h in holders)
            for dev in budget
        }
        short = {dev: size - room[dev] for dev, size in layout.items() if size > room[dev]}
        victims: list[Holder] = []
        for holder in order:
            if not short:
                break
            if not any(holder.usage.get(dev, 0) > 0 for dev in short):
                continue
            victims.append(holder)
            for dev in list(short):
                short[dev] -= holder.usage.get(dev, 0)
                room[dev] += holder.usage.get(dev, 0)
                if short[dev] <= 0:
                    del short[dev]
        if short:
            continue
        busy = sum(1 for v in victims if v.stage == BUSY)
        left = min(room[dev] - size for dev, size in layout.items()) if layout else 0
        score = (busy, len(victims), -left)
        candidate = Plan(dict(layout), tuple(v.model_id for v in victims), busy > 0)
        if best is None or score < best[0]:
            best = (score, candidate)
    return None if best is None else best[1]
