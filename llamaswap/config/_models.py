# -*- test-case-name: tests.test_config -*-
"""
Reading C{models} and C{filters}: one model's command, port, proxy, health
check, names and body edits, each from its own reader.

A model's settings are expanded with its own macros (the global ones, its
C{macros}, C{MODEL_ID} and C{PORT}) by one L{Expander}; C{${PORT}} is
assigned only to models whose C{cmd} uses it (see L{_Ports}).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from attrs import frozen

from llamaswap.config._memory import GPU_MACRO, read_model_memory
from llamaswap.config._readers import (
    ConfigError,
    _bool,
    _check_keys,
    _int,
    _join,
    _mapping,
    _number,
    _str,
    _str_list,
    _type_name,
)
from llamaswap.config.macros import Expander, _read_macros, command_text, split_command
from llamaswap.config.schema import PROTECTED_PARAMS, Filters, ModelConfig, plain_json

_MODEL_KEYS = (
    "cmd",
    "cmdStop",
    "proxy",
    "aliases",
    "checkEndpoint",
    "ttl",
    "unloadTimeout",
    "env",
    "unlisted",
    "useModelName",
    "name",
    "description",
    "metadata",
    "macros",
    "concurrencyLimit",
    "maxWait",
    "minResidency",
    "filters",
    "sendLoadingState",
    "reuseConnections",
    "memory",
)
_FILTER_KEYS = ("stripParams", "setParams", "setParamsByID")


def _url(where: str, text: str) -> str:
    """An http(s) base URL, without trailing slashes."""
    url = text.strip()
    if not re.match(r"https?://[^/]+", url):
        raise ConfigError(f"{where}: must be an http:// or https:// URL")
    return url.rstrip("/")


# --- models ------------------------------------------------------------------


@frozen
class _ModelDefaults:
    """What a model inherits from the top level."""

    expand: Expander  # the global macros and the environment
    global_ttl: int
    unload_timeout: float
    send_loading_state: bool
    max_wait: float
    min_residency: float


class _Ports:
    """
    The numbers for C{${PORT}}, handed out from C{startPort} up, in the order
    asked. C{kept}: ports a reload keeps for models that had them (so adding a
    model does not move, and so restart, the others); no one else gets those.
    """

    def __init__(self, start: int, kept: Mapping[str, int] | None = None) -> None:
        self._start = start
        self._kept = dict(kept or {})
        self._free = (p for p in range(start, 65536) if p not in self._kept.values())

    def take(self, where: str, model_id: str) -> int:
        port = self._kept.get(model_id)
        if port is None:
            port = next(self._free, None)
        if port is None:
            raise ConfigError(f"{where}: no port left for ${{PORT}} (startPort {self._start})")
        return port


def _read_models(
    raw: Mapping[str, Any],
    defaults: _ModelDefaults,
    start_port: int,
    warnings: list[str],
    kept_ports: Mapping[str, int] | None = None,
) -> dict[str, ModelConfig]:
    """C{models}: at least one; ids and aliases name one model each."""
    if "models" not in raw:
        raise ConfigError("models: required (a mapping of model id to its settings)")
    specs = _mapping("models", raw["models"])
    if not specs:
        raise ConfigError("models: define at least one model")
    for model_id in specs:
        if not isinstance(model_id, str) or not model_id.strip():
            raise ConfigError(f"models.{model_id}: model ids must be non-empty strings")
    # ${PORT} goes to the models whose (expanded) cmd uses it, in sorted id
    # order from startPort, so the numbers do not depend on the file's order.
    kept = {m: p for m, p in (kept_ports or {}).items() if m in specs and p >= start_port}
    ports = _Ports(start_port, kept)
    read = {
        model_id: _read_model(model_id, specs[model_id], defaults, ports, warnings)
        for model_id in sorted(specs)
    }
    models = {model_id: read[model_id][0] for model_id in specs}
    _check_aliases(models, {model_id: read[model_id][1] for model_id in specs})
    return models


def _read_model(
    model_id: str, spec: object, defaults: _ModelDefaults, ports: _Ports, warnings: list[str]
) -> tuple[ModelConfig, list[str]]:
    """Read one model; also return where each of its aliases was declared."""
    where = f"models.{model_id}"
    raw = _mapping(where, spec)
    _check_keys(where, raw, _MODEL_KEYS)
    if "cmd" not in raw:
        raise ConfigError(f"{where}.cmd: required")
    command = _read_command(where, model_id, raw, defaults.expand, ports)
    expand, port = command.expand, command.port
    cmd_stop = _read_cmd_stop(f"{where}.cmdStop", raw.get("cmdStop"), expand)
    proxy = _read_proxy(f"{where}.proxy", raw, expand, port)
    check = _read_check_endpoint(
        f"{where}.checkEndpoint", raw.get("checkEndpoint", "/health"), expand
    )
    ttl = _read_ttl(f"{where}.ttl", raw.get("ttl", -1), defaults.global_ttl)
    unload_timeout = _number(f"{where}.unloadTimeout", raw.get("unloadTimeout", 0), minimum=0)
    env_vars = _read_env(f"{where}.env", raw.get("env"), expand)
    aliases = _read_aliases(f"{where}.aliases", raw.get("aliases"))
    use_model_name = _read_use_model_name(f"{where}.useModelName", raw, expand)
    name = _read_text(f"{where}.name", raw.get("name", ""), expand)
    description = _read_text(f"{where}.description", raw.get("description", ""), expand)
    if len(name) > 128:
        raise ConfigError(f"{where}.name: at most 128 characters")
    metadata = expand.value(f"{where}.metadata", _mapping(f"{where}.metadata", raw.get("metadata")))
    assert isinstance(metadata, Mapping)
    filters = _read_filters(f"{where}.filters", raw.get("filters"), expand, warnings)
    alias_paths = _add_requestable_names(where, model_id, aliases, filters)
    model = ModelConfig(
        id=model_id,
        cmd=command.argv,
        cmd_line=command.line,
        cmd_stop=cmd_stop,
        proxy=proxy,
        aliases=tuple(aliases),
        check_endpoint=check,
        ttl=ttl,
        unload_timeout=unload_timeout or defaults.unload_timeout,
        env=env_vars,
        unlisted=_bool(f"{where}.unlisted", raw.get("unlisted", False)),
        use_model_name=use_model_name,
        name=name,
        description=description,
        metadata=metadata,
        concurrency_limit=_int(
            f"{where}.concurrencyLimit", raw.get("concurrencyLimit", 0), minimum=0
        ),
        max_wait=_number(f"{where}.maxWait", raw.get("maxWait", defaults.max_wait), minimum=0),
        min_residency=_number(
            f"{where}.minResidency", raw.get("minResidency", defaults.min_residency), minimum=0
        ),
        port=port,
        filters=filters,
        send_loading_state=_bool(
            f"{where}.sendLoadingState", raw.get("sendLoadingState", defaults.send_loading_state)
        ),
        reuse_connections=_bool(f"{where}.reuseConnections", raw.get("reuseConnections", True)),
        memory=read_model_memory(f"{where}.memory", raw.get("memory")),
        placed=GPU_MACRO in command.line or any(GPU_MACRO in v for v in env_vars.values()),
    )
    return model, alias_paths


@frozen
class _Command:
    """A model's C{cmd}, read, and the L{Expander} for the model's other settings."""

    argv: tuple[str, ...]
    line: str  # after macro expansion, as shown by /running
    port: int | None  # assigned when cmd uses ${PORT}
    expand: Expander


def _read_command(
    where: str, model_id: str, raw: Mapping[str, Any], inherited: Expander, ports: _Ports
) -> _Command:
    """
    C{macros} and C{cmd}: the model's own macros (and C{MODEL_ID}) over the
    inherited ones; a port if the expanded cmd uses C{${PORT}}, after which
    no other setting may use C{${PORT}} unless cmd does.
    """
    environ = inherited.environ
    macros = _read_macros(f"{where}.macros", raw.get("macros"), environ, inherited.macros)
    macros["MODEL_ID"] = model_id
    path = f"{where}.cmd"
    # Comment lines go before expansion: a macro in a comment is never an error.
    text = command_text(_str(path, raw["cmd"]))
    port = None
    if "${PORT}" in Expander(macros, environ)(path, text, frozenset({"PORT"})):
        port = macros["PORT"] = ports.take(path, model_id)
    expand = Expander(macros, environ, forbid_port=port is None)
    line = expand(path, text)
    return _Command(argv=split_command(path, line), line=line, port=port, expand=expand)


def _read_cmd_stop(where: str, value: object, expand: Expander) -> tuple[str, ...] | None:
    """C{cmdStop}: a command like C{cmd}, with C{${PID}} left for when it runs."""
    if value in (None, ""):
        return None
    text = command_text(_str(where, value))
    return split_command(where, expand(where, text, frozenset({"PID"})))


def _read_proxy(where: str, raw: Mapping[str, Any], expand: Expander, port: int | None) -> str:
    """C{proxy}: the model server's base URL; by default the one C{${PORT}} implies."""
    if "proxy" in raw:
        return _url(where, expand(where, _str(where, raw["proxy"])))
    if port is None:
        raise ConfigError(f"{where}: required when cmd does not use ${{PORT}}")
    return f"http://127.0.0.1:{port}"


def _read_check_endpoint(where: str, value: object, expand: Expander) -> str | None:
    """C{checkEndpoint}: a path polled until it answers 200; C{none}: no health check."""
    check = expand(where, _str(where, value)).strip()
    if check.lower() == "none":
        return None
    if check == "":
        return "/health"
    if not check.startswith("/"):
        raise ConfigError(f"{where}: must start with / or be 'none'")
    return check


def _read_ttl(where: str, value: object, global_ttl: int) -> int:
    """C{ttl}: idle seconds before unloading, 0 for never, -1 (the default) for globalTTL."""
    ttl = _int(where, value)
    if ttl < -1:
        raise ConfigError(f"{where}: must be >= 0 (or -1 to use globalTTL)")
    return global_ttl if ttl == -1 else ttl


def _read_env(where: str, value: object, expand: Expander) -> dict[str, str]:
    """C{env}: C{NAME=value} strings for the model server's environment."""
    env: dict[str, str] = {}
    for i, item in enumerate(_str_list(where, value)):
        key, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{where}[{i}]: must look like NAME=value")
        env[key] = expand(f"{where}[{i}]", text)
    return env


def _read_aliases(where: str, value: object) -> list[str]:
    """C{aliases}: other names for the model, each given once."""
    aliases = _str_list(where, value)
    for i, alias in enumerate(aliases):
        if not alias.strip():
            raise ConfigError(f"{where}[{i}]: must not be empty")
    if len(set(aliases)) != len(aliases):
        raise ConfigError(f"{where}: lists the same alias twice")
    return aliases


def _read_use_model_name(where: str, raw: Mapping[str, Any], expand: Expander) -> str | None:
    """C{useModelName}: the name the model server is sent instead of the requested one."""
    value = raw.get("useModelName")
    if value is None:
        return None
    return expand(where, _str(where, value)) or None


def _read_text(where: str, value: object, expand: Expander) -> str:
    """A display string (C{name}, C{description}), stripped."""
    return expand(where, _str(where, value)).strip()


def _add_requestable_names(
    where: str, model_id: str, aliases: list[str], filters: Filters
) -> list[str]:
    """
    Names in C{setParamsByID} are requestable: add them to C{aliases} (after
    the explicit ones). Return the path that declared each alias.
    """
    paths = [f"{where}.aliases[{i}]" for i in range(len(aliases))]
    for key in filters.set_params_by_id:
        if key != model_id and key not in aliases:
            aliases.append(key)
            paths.append(f"{where}.filters.setParamsByID.{key}")
    return paths


def _check_aliases(models: Mapping[str, ModelConfig], paths: Mapping[str, list[str]]) -> None:
    owner: dict[str, str] = {}
    for model in models.values():
        for alias, where in zip(model.aliases, paths[model.id], strict=True):
            if alias in models:
                raise ConfigError(f"{where}: {alias!r} is already a model id")
            if alias in owner:
                raise ConfigError(f"{where}: {alias!r} is already an alias of {owner[alias]}")
            owner[alias] = model.id


# --- filters -----------------------------------------------------------------


def _read_filters(where: str, value: object, expand: Expander, warnings: list[str]) -> Filters:
    """C{filters}: edits to request bodies (see L{Filters})."""
    raw = _mapping(where, value)
    _check_keys(where, raw, _FILTER_KEYS)
    strip = _read_strip_params(f"{where}.stripParams", raw.get("stripParams", ""), expand, warnings)
    by_id = _read_params_by_id(f"{where}.setParamsByID", raw.get("setParamsByID"), expand)
    return Filters(
        strip_params=strip,
        set_params=_param_map(f"{where}.setParams", raw.get("setParams"), expand),
        set_params_by_id=by_id,
    )


def _read_strip_params(
    where: str, value: object, expand: Expander, warnings: list[str]
) -> tuple[str, ...]:
    """C{stripParams}: a list, or one comma-separated string; sorted, without C{model}."""
    if isinstance(value, list):
        names = _str_list(where, value)
    else:
        names = expand(where, _str(where, value)).split(",")
    strip: set[str] = set()
    for name in (n.strip() for n in names):
        if name in PROTECTED_PARAMS:
            warnings.append(f"{where}: {name!r} is never stripped; ignored")
        elif name:
            strip.add(name)
    return tuple(sorted(strip))


def _read_params_by_id(
    where: str, value: object, expand: Expander
) -> dict[str, Mapping[str, object]]:
    """C{setParamsByID}: params to set, by requested name (macros expanded in the names)."""
    by_id: dict[str, Mapping[str, object]] = {}
    for key, params in _mapping(where, value).items():
        path = f"{where}.{key}"
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{path}: keys must be non-empty strings (requested model names)")
        name = expand(path, key)
        if name in by_id:
            raise ConfigError(f"{path}: the name {name!r} is listed twice")
        by_id[name] = MappingProxyType(_param_map(path, params, expand))
    return by_id


def _param_map(where: str, value: object, expand: Expander) -> dict[str, object]:
    params = {}
    for key, item in _mapping(where, value).items():
        path = _join(where, str(key))
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{path}: keys must be non-empty strings")
        if key in PROTECTED_PARAMS:
            raise ConfigError(f"{path}: {key!r} cannot be set by a filter (see useModelName)")
        params[key] = _json_value(path, item, expand)
    return params


def _json_value(where: str, value: object, expand: Expander) -> object:
    """A filter value: macros expanded (as in metadata), and representable in JSON."""
    expanded = expand.value(where, value)
    try:
        json.dumps(plain_json(expanded), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: not representable in JSON ({_type_name(value)})") from e
    return expanded
