# -*- test-case-name: tests.test_memory_config -*-
"""
Memory sizes as people write them (C{24GiB}, C{512MiB}, C{1.5G}) and as we
show them. Units are binary (C{G} and C{GiB} both mean 2**30), as GPU tools
report them; a bare number is MiB, nvidia-smi's unit.
"""

from __future__ import annotations

import re

from llamaswap.config._readers import ConfigError

UNITS = {"": 2**20, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
_BYTES = re.compile(r"\s*(\d+)\s*b\s*", re.IGNORECASE)


def parse_size(where: str, value: object) -> int:
    """
    A size in bytes: a number of MiB, or a string with a unit.

    @raise ConfigError: for anything else, or a size below zero.
    """
    if isinstance(value, bool):
        raise ConfigError(f"{where}: must be a size like 24GiB or 512MiB, not a boolean")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ConfigError(f"{where}: must not be negative")
        return int(value * UNITS[""])
    if isinstance(value, str):
        exact = _BYTES.fullmatch(value)
        if exact is not None:
            return int(exact.group(1))
        match = _SIZE.fullmatch(value)
        if match is not None:
            return int(float(match.group(1)) * UNITS[match.group(2).lower()])
    raise ConfigError(f"{where}: must be a size like 24GiB, 512MiB or 1.5G, not {value!r}")


def format_size(size: int) -> str:
    """C{size} bytes for people: C{24.0 GiB}, C{512 MiB}."""
    if size >= 2**30:
        return f"{size / 2**30:.1f} GiB"
    return f"{size / 2**20:.0f} MiB"
