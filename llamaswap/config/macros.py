# -*- test-case-name: tests.test_config -*-
"""
Macros and commands: C{macros} sections, C{${env.NAME}} and C{${macro}}
expansion, and turning a (possibly multi-line) C{cmd} into an argv.

Declared macros are expanded when read, in the order declared; the built-in
C{PID}, C{PORT}, C{MODEL_ID} and C{GPU} are late: filled in per model (C{PID} only
when C{cmdStop} runs), so a macro value may mention them.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Mapping
from types import MappingProxyType

from attrs import frozen

from llamaswap.config._readers import ConfigError, _join, _mapping, _type_name

# Macros the loader provides itself; users may not redefine them.
RESERVED_MACROS = frozenset({"PID", "PORT", "MODEL_ID", "PYTHON", "GPU"})
_MACRO_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MACRO_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")

# Built-in macros filled in per model (PID only when cmdStop runs, GPU at each start:
# it stays "${GPU}" until then, llamaswap.process.spawn); a macro value
# may mention them, and they are substituted where that macro is used.
_LATE_MACROS = frozenset({"PID", "PORT", "MODEL_ID", "GPU"})


def _substitute_env(where: str, text: str, environ: Mapping[str, str]) -> str:
    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise ConfigError(f"{where}: environment variable {name!r} is not set")
        return environ[name]

    return _ENV_REF.sub(one, text)


def _macro_text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _expand(where: str, text: str, macros: Mapping[str, object], keep: frozenset[str]) -> str:
    """Replace C{${name}} by its macro; names in C{keep} are left for later."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in keep:
            return match.group(0)
        if name not in macros:
            if name == "PID":
                raise ConfigError(f"{where}: ${{PID}} is only available in cmdStop")
            raise ConfigError(f"{where}: unknown macro ${{{name}}}")
        value = _macro_text(macros[name])
        if name not in _LATE_MACROS and "${" in value:
            # Declared macros are expanded when read, except for the late ones.
            late = {k: v for k, v in macros.items() if k in _LATE_MACROS}
            value = _expand(where, value, late, keep | (_LATE_MACROS - late.keys()))
        return value

    return _MACRO_REF.sub(one, text)


def _read_macros(
    where: str, raw: object, environ: Mapping[str, str], inherited: Mapping[str, object]
) -> dict[str, object]:
    """Read a macros mapping; a macro may use macros declared before it."""
    result = dict(inherited)
    for name, value in _mapping(where, raw).items():
        path = _join(where, str(name))
        if not isinstance(name, str) or not _MACRO_NAME.fullmatch(name):
            raise ConfigError(f"{path}: macro names use letters, digits, _ and - (max 63)")
        if name in RESERVED_MACROS:
            raise ConfigError(f"{path}: macro name {name!r} is reserved")
        if isinstance(value, str):
            if f"${{{name}}}" in value:
                raise ConfigError(f"{path}: macro refers to itself")
            value = _expand(path, _substitute_env(path, value, environ), result, _LATE_MACROS)
        elif value is None or isinstance(value, (list, dict)):
            raise ConfigError(f"{path}: macro values must be scalars, not {_type_name(value)}")
        result[name] = value
    return result


@frozen
class Expander:
    """
    Expands C{${env.NAME}}, then C{${macro}}, in one setting's text, with one
    set of C{macros}: a model's own, or the global ones (for peers).

    C{forbid_port}: the model's cmd does not use C{${PORT}}, so no other of
    its settings may either (no port was assigned).
    """

    macros: Mapping[str, object]
    environ: Mapping[str, str]
    forbid_port: bool = False

    def __call__(self, where: str, text: str, keep: frozenset[str] = frozenset()) -> str:
        """C{text} expanded; macros named in C{keep} are left for later."""
        if self.forbid_port and "${PORT}" in self._expand(where, text, keep | {"PORT"}):
            raise ConfigError(f"{where}: uses ${{PORT}} but cmd does not")
        return self._expand(where, text, keep)

    def _expand(self, where: str, text: str, keep: frozenset[str]) -> str:
        return _expand(where, _substitute_env(where, text, self.environ), self.macros, keep)

    def value(self, where: str, value: object) -> object:
        """
        Expand macros in a structured value (metadata, filter params): lists
        become tuples and mappings read-only.
        """
        if isinstance(value, str):
            # A value that is exactly "${macro}" keeps the macro's own type (int, bool...).
            match = _MACRO_REF.fullmatch(value)
            if match and not isinstance(self.macros.get(match.group(1), ""), str):
                return self.macros[match.group(1)]
            return self(where, value)
        if isinstance(value, list):
            return tuple(self.value(f"{where}[{i}]", v) for i, v in enumerate(value))
        if isinstance(value, dict):
            return MappingProxyType(
                {k: self.value(_join(where, str(k)), v) for k, v in value.items()}
            )
        return value


# --- commands --------------------------------------------------------------


def command_text(text: str) -> str:
    """
    Turn a multi-line C{cmd} into one line: drop C{#} comment lines, treat a
    trailing backslash as a continuation, and join the lines with spaces.
    """
    lines = []
    for line in getattr(text, "lines", text).splitlines():
        line = line.strip()
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            line = line[:-1].rstrip()
        if line:
            lines.append(line)
    return " ".join(lines)


def split_command(where: str, text: str) -> tuple[str, ...]:
    """Split a command like a POSIX shell would, without running one."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as e:
        raise ConfigError(f"{where}: cannot split command: {e}") from e
    if not argv:
        raise ConfigError(f"{where}: must not be empty")
    return argv
