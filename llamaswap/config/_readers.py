# -*- test-case-name: tests.test_config -*-
"""
Typed readers for values parsed from YAML, shared by the loader and the matrix.

Each takes the dotted path of the value it reads and raises L{ConfigError}
with one line that starts with that path, e.g. C{models.qwen.ttl: must be an
integer, not a string}.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(Exception):
    """The configuration is invalid; C{str()} is one line naming the path."""


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _check_keys(where: str, raw: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{_join(where, str(key))}: keys must be strings")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")


def _alias_hint(name: str, aliases: Mapping[str, str], advice: str) -> str:
    """C{" ('name' is an alias of 'id'; <advice>)"} when C{name} is an alias, else ""."""
    if name not in aliases:
        return ""
    return f" ({name!r} is an alias of {aliases[name]!r}; {advice})"


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}
    for kind, name in names.items():
        if isinstance(value, kind):
            return name
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__}"  # e.g. a YAML date


def _mapping(where: str, value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: must be a mapping, not {_type_name(value)}")
    return value


def _bool(where: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: must be true or false, not {_type_name(value)}")
    return value


def _int(where: str, value: object, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where}: must be an integer, not {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum}")
    return value


def _number(where: str, value: object, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: must be a number, not {_type_name(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{where}: must be >= {minimum:g}")
    return float(value)


def _str(where: str, value: object) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a string, not {_type_name(value)}")
    return value


def _str_list(where: str, value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: must be a list of strings, not {_type_name(value)}")
    return [_str(f"{where}[{i}]", item) for i, item in enumerate(value)]


def _choice(where: str, value: object, choices: tuple[str, ...]) -> str:
    text = _str(where, value).lower()
    if text not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}")
    return text
