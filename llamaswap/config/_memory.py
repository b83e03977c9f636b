# -*- test-case-name: tests.test_memory_config -*-
"""
Reading the C{memory} section and each model's C{memory}, and the checks
that need both: a declared figure larger than its device is an error here,
at load, not at the first request.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping

from llamaswap.config._readers import (
    ConfigError,
    _check_keys,
    _choice,
    _join,
    _mapping,
    _number,
    _str,
)
from llamaswap.config.schema import (
    ANY_DEVICE,
    DEFAULT_MEMORY_RESERVE,
    DEFAULT_MEMORY_STATE_FILE,
    DEFAULT_RELEASE_TIMEOUT,
    MEMORY_SOURCES,
    MemoryConfig,
    ModelConfig,
)
from llamaswap.config.sizes import format_size, parse_size

_MEMORY_KEYS = ("source", "devices", "reserve", "releaseTimeout", "stateFile", "nvidiaSmi")
GPU_MACRO = "${GPU}"


def read_memory(value: object, base_dir: str) -> MemoryConfig:
    """C{memory}: a mapping (even C{{}}) turns memory admission on."""
    raw = _mapping("memory", value)
    _check_keys("memory", raw, _MEMORY_KEYS)
    source = _choice("memory.source", raw.get("source", "nvidia-smi"), MEMORY_SOURCES)
    devices = {
        str(key): parse_size(_join("memory.devices", str(key)), size)
        for key, size in _mapping("memory.devices", raw.get("devices")).items()
    }
    if source == "none" and not devices:
        raise ConfigError("memory.devices: required with source: none (each device's memory)")
    if source == "meminfo" and set(devices) - {"ram"}:
        raise ConfigError("memory.devices: with source: meminfo the one device is 'ram'")
    command = raw.get("nvidiaSmi", "nvidia-smi")
    argv = tuple(shlex.split(_str("memory.nvidiaSmi", command)))
    if not argv:
        raise ConfigError("memory.nvidiaSmi: must not be empty")
    state_file = _str("memory.stateFile", raw.get("stateFile", DEFAULT_MEMORY_STATE_FILE))
    return MemoryConfig(
        source=source,
        devices=devices,
        reserve=parse_size("memory.reserve", raw.get("reserve", f"{DEFAULT_MEMORY_RESERVE}B")),
        release_timeout=_number(
            "memory.releaseTimeout", raw.get("releaseTimeout", DEFAULT_RELEASE_TIMEOUT), minimum=0
        ),
        state_file=os.path.join(base_dir, os.path.expanduser(state_file)),
        nvidia_smi=argv,
    )


def read_model_memory(where: str, value: object) -> dict[str, int] | None:
    """A model's C{memory}: one size, or a size per device (C{0: 12GiB, 1: 12GiB})."""
    if value is None:
        return None
    if isinstance(value, dict):
        if not value:
            raise ConfigError(f"{where}: give at least one device's size")
        return {str(dev): parse_size(_join(where, str(dev)), size) for dev, size in value.items()}
    return {ANY_DEVICE: parse_size(where, value)}


def check_memory(memory: MemoryConfig | None, models: Mapping[str, ModelConfig]) -> None:
    """
    What depends on the C{memory} section: C{${GPU}} needs it; a placed model
    has one figure; a declared figure fits its declared device.
    """
    for model in models.values():
        where = f"models.{model.id}"
        if model.placed and memory is None:
            raise ConfigError(f"{where}: uses {GPU_MACRO}, which needs a memory: section")
        if model.memory is not None and memory is None:
            raise ConfigError(f"{where}.memory: needs a top-level memory: section to take effect")
        if memory is None or model.memory is None:
            continue
        if model.placed and set(model.memory) != {ANY_DEVICE}:
            raise ConfigError(f"{where}.memory: a model placed with {GPU_MACRO} takes one size")
        if memory.devices:
            check_fits(where, model, budgets(memory.devices, memory.reserve))


def budgets(totals: Mapping[str, int], reserve: int) -> dict[str, int]:
    """Each device's budget: its memory less the reserve."""
    return {dev: max(0, total - reserve) for dev, total in totals.items()}


def check_fits(where: str, model: ModelConfig, budget: Mapping[str, int]) -> None:
    """
    @raise ConfigError: C{model}'s declared memory names an unknown device or
        exceeds a device's whole budget.
    """
    assert model.memory is not None
    for dev, size in model.memory.items():
        if dev == ANY_DEVICE:
            fits = [d for d in budget if budget[d] >= size]
            first = next(iter(sorted(budget)), None)
            if not fits or (not model.placed and first not in fits):
                largest = max(budget.values(), default=0)
                room = budget[first] if first is not None and not model.placed else largest
                raise ConfigError(
                    f"{where}.memory: {format_size(size)} is more than the whole budget "
                    f"({format_size(room)}: the device's memory less memory.reserve)"
                )
        elif dev not in budget:
            raise ConfigError(
                f"{where}.memory.{dev}: no such device (devices: {', '.join(sorted(budget))})"
            )
        elif size > budget[dev]:
            raise ConfigError(
                f"{where}.memory.{dev}: {format_size(size)} is more than the device's whole "
                f"budget ({format_size(budget[dev])}: its memory less memory.reserve)"
            )
