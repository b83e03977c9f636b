# -*- test-case-name: tests.test_config -*-
"""
The loader: a YAML document in, a validated L{Config} out.

L{parse_config} reads one top-level key (or a few scalar ones) per call, in an
order set by what each section needs: the model defaults and macros before the
models, the models before the names that refer to them (profiles, peers,
groups, matrix, preload). Each C{_read_<section>} raises L{ConfigError} with
the dotted path of the first problem it meets, and appends what it only warns
about to C{warnings}.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llamaswap.config._memory import GPU_MACRO, check_memory, read_memory
from llamaswap.config._models import _ModelDefaults, _read_filters, _read_models, _url
from llamaswap.config._readers import (
    ConfigError,
    _alias_hint,
    _bool,
    _check_keys,
    _choice,
    _int,
    _join,
    _mapping,
    _number,
    _str,
    _str_list,
)
from llamaswap.config._security import key_text, read_api_keys, read_security
from llamaswap.config._yaml import _load_yaml
from llamaswap.config.macros import Expander, _read_macros
from llamaswap.config.matrix import Matrix, build_matrix
from llamaswap.config.schema import (
    DEFAULT_GROUP_ID,
    DEFAULT_HEALTH_CHECK_TIMEOUT,
    DEFAULT_IGNORE_PATHS,
    DEFAULT_LOG_HISTORY_BYTES,
    DEFAULT_LOG_KEEP,
    DEFAULT_LOG_ROTATE_BYTES,
    DEFAULT_MAX_BODY_SIZE,
    DEFAULT_MAX_WAIT,
    DEFAULT_MIN_RESIDENCY,
    DEFAULT_QUEUE_LENGTH,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_SHUTDOWN_TIMEOUT,
    DEFAULT_START_PORT,
    DEFAULT_UNLOAD_TIMEOUT,
    LOG_LEVELS,
    LOG_TO_STDOUT,
    MIN_HEALTH_CHECK_TIMEOUT,
    Config,
    GroupConfig,
    LogRotation,
    ModelConfig,
    PeerConfig,
    QueueConfig,
)
from llamaswap.config.sizes import parse_size

_TOP_KEYS = (
    "healthCheckTimeout",
    "logRequests",
    "logLevel",
    "logToStdout",
    "logHistoryBytes",
    "logRotation",
    "startPort",
    "globalTTL",
    "unloadTimeout",
    "shutdownTimeout",
    "macros",
    "models",
    "profiles",
    "includeAliasesInList",
    "maxBodySize",
    "apiKeys",
    "hooks",
    "sendLoadingState",
    "upstream",
    "peers",
    "groups",
    "matrix",
    "queue",
    "memory",
    "security",
)
_PEER_KEYS = ("proxy", "models", "apiKey", "filters", "reuseConnections")
_GROUP_KEYS = ("swap", "exclusive", "persistent", "members")
_QUEUE_KEYS = ("maxWait", "minResidency", "timeout", "maxLength", "concurrencyLimit")


def load_config(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    kept_ports: Mapping[str, int] | None = None,
) -> Config:
    """
    Read and validate the YAML file at C{path}. C{kept_ports}: a reload's
    running models keep their C{${PORT}} (model id -> port).

    @raise ConfigError: one line naming the dotted path and the problem.
    """
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8: {e.reason}") from e
    return parse_config(
        text,
        base_dir=str(file.resolve().parent),
        source=str(path),
        environ=os.environ if environ is None else environ,
        kept_ports=kept_ports,
    )


def parse_config(
    text: str,
    *,
    base_dir: str = ".",
    source: str = "<string>",
    environ: Mapping[str, str] | None = None,
    kept_ports: Mapping[str, int] | None = None,
) -> Config:
    """Parse and validate configuration text (see L{load_config})."""
    env = os.environ if environ is None else environ
    raw = _read_document(text, source)
    warnings: list[str] = []
    hct = _read_health_check_timeout(
        raw.get("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT), warnings
    )
    global_ttl = _int("globalTTL", raw.get("globalTTL", 0), minimum=0)
    unload_timeout = _read_unload_timeout(raw.get("unloadTimeout", 0))
    start_port = _read_start_port(raw.get("startPort", DEFAULT_START_PORT))
    send_loading_state = _bool("sendLoadingState", raw.get("sendLoadingState", False))
    ignore_paths = _read_upstream(raw.get("upstream"))
    queue = _read_queue(raw.get("queue"))
    expand = Expander(_read_macros("macros", raw.get("macros"), env, _builtin_macros()), env)
    defaults = _ModelDefaults(
        expand,
        global_ttl,
        unload_timeout,
        send_loading_state,
        queue.max_wait,
        queue.min_residency,
    )
    models = _read_models(raw, defaults, start_port, warnings, kept_ports)
    aliases = {alias: model.id for model in models.values() for alias in model.aliases}
    profiles = _read_profiles(raw.get("profiles"), models, aliases)
    peers = _read_peers(raw.get("peers"), models, expand, warnings)
    groups = _read_groups(raw.get("groups"), models, aliases, warnings)
    memory = None if raw.get("memory") is None else read_memory(raw["memory"], base_dir)
    check_memory(memory, models)
    return Config(
        models=models,
        profiles=profiles,
        groups=groups,
        matrix=_read_matrix(raw.get("matrix"), models, aliases, groups),
        peers=peers,
        preload=_read_hooks(raw.get("hooks"), models, aliases, peers, warnings),
        api_keys=read_api_keys(raw.get("apiKeys"), env, base_dir),
        security=read_security(raw.get("security")),
        queue=queue,
        memory=memory,
        health_check_timeout=hct,
        log_requests=_bool("logRequests", raw.get("logRequests", False)),
        log_level=_choice("logLevel", raw.get("logLevel", "info"), LOG_LEVELS),
        log_to_stdout=_choice("logToStdout", raw.get("logToStdout", "proxy"), LOG_TO_STDOUT),
        log_history_bytes=_read_size("logHistoryBytes", raw, DEFAULT_LOG_HISTORY_BYTES),
        log_rotation=_read_log_rotation(raw.get("logRotation")),
        start_port=start_port,
        global_ttl=global_ttl,
        unload_timeout=unload_timeout,
        shutdown_timeout=_number(
            "shutdownTimeout", raw.get("shutdownTimeout", DEFAULT_SHUTDOWN_TIMEOUT), minimum=0
        ),
        include_aliases_in_list=_bool(
            "includeAliasesInList", raw.get("includeAliasesInList", False)
        ),
        max_body_size=_read_size("maxBodySize", raw, DEFAULT_MAX_BODY_SIZE),
        send_loading_state=send_loading_state,
        upstream_ignore_paths=ignore_paths,
        base_dir=base_dir,
        source=source,
        warnings=tuple(warnings),  # last: every reader above may add to it
    )


# --- the top level ------------------------------------------------------------


def _read_document(text: str, source: str) -> dict[str, Any]:
    """The top-level mapping, with known keys only."""
    raw = _load_yaml(text, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' key")
    _check_keys("", raw, _TOP_KEYS)
    return raw


def _builtin_macros() -> dict[str, object]:
    """
    The macros every config has: C{${PYTHON}}, this interpreter, quoted for a
    shell, and C{${GPU}}, which stays as it is until a start places the model.
    """
    return {"PYTHON": shlex.quote(sys.executable), "GPU": GPU_MACRO}


def _read_health_check_timeout(value: object, warnings: list[str]) -> int:
    """C{healthCheckTimeout}: seconds; below the minimum is raised to it, with a warning."""
    seconds = _int("healthCheckTimeout", value)
    if seconds < MIN_HEALTH_CHECK_TIMEOUT:
        warnings.append(
            f"healthCheckTimeout: {seconds} is below the minimum; using {MIN_HEALTH_CHECK_TIMEOUT}"
        )
        return MIN_HEALTH_CHECK_TIMEOUT
    return seconds


def _read_unload_timeout(value: object) -> float:
    """C{unloadTimeout}: seconds; 0 means the default."""
    return _number("unloadTimeout", value, minimum=0) or DEFAULT_UNLOAD_TIMEOUT


def _read_start_port(value: object) -> int:
    """C{startPort}: the first port handed out for C{${PORT}}."""
    port = _int("startPort", value, minimum=1)
    if port > 65535:
        raise ConfigError("startPort: must be <= 65535")
    return port


def _read_size(key: str, raw: Mapping[str, Any], default: int) -> int:
    """A size in bytes, at least 1 KiB (C{logHistoryBytes}, C{maxBodySize})."""
    return _int(key, raw.get(key, default), minimum=1024)


def _read_log_rotation(value: object) -> LogRotation:
    """C{logRotation}: twistd's log file rotates at C{maxBytes}, keeping C{keep} old files."""
    raw = _mapping("logRotation", value)
    _check_keys("logRotation", raw, ("maxBytes", "keep"))
    size = raw.get("maxBytes", DEFAULT_LOG_ROTATE_BYTES)
    # Bytes, as the name says; a string may carry a unit (10MiB).
    if isinstance(size, str) and not size.strip().isdigit():
        size = parse_size("logRotation.maxBytes", size)
    elif isinstance(size, str):
        size = int(size)
    return LogRotation(
        max_bytes=_int("logRotation.maxBytes", size, minimum=1024),
        keep=_int("logRotation.keep", raw.get("keep", DEFAULT_LOG_KEEP), minimum=1),
    )


def _read_queue(value: object) -> QueueConfig:
    """C{queue}: the request queue's bounds and the scheduler's defaults (seconds, counts)."""
    raw = _mapping("queue", value)
    _check_keys("queue", raw, _QUEUE_KEYS)
    return QueueConfig(
        max_wait=_number("queue.maxWait", raw.get("maxWait", DEFAULT_MAX_WAIT), minimum=0),
        min_residency=_number(
            "queue.minResidency", raw.get("minResidency", DEFAULT_MIN_RESIDENCY), minimum=0
        ),
        timeout=_number("queue.timeout", raw.get("timeout", DEFAULT_QUEUE_TIMEOUT), minimum=0),
        max_length=_int("queue.maxLength", raw.get("maxLength", DEFAULT_QUEUE_LENGTH), minimum=1),
        concurrency_limit=_int("queue.concurrencyLimit", raw.get("concurrencyLimit", 0), minimum=0),
    )


def _read_upstream(value: object) -> tuple[re.Pattern[str], ...]:
    """C{upstream.ignorePaths}: regular expressions, compiled (default: static files)."""
    upstream = _mapping("upstream", value)
    _check_keys("upstream", upstream, ("ignorePaths",))
    if "ignorePaths" not in upstream:
        return tuple(re.compile(p) for p in DEFAULT_IGNORE_PATHS)
    patterns = []
    for i, text in enumerate(_str_list("upstream.ignorePaths", upstream["ignorePaths"])):
        try:
            patterns.append(re.compile(text))
        except re.error as e:
            raise ConfigError(f"upstream.ignorePaths[{i}]: invalid regular expression: {e}") from e
    return tuple(patterns)


def _check_model_id(
    where: str, name: str, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> None:
    """C{name} must be a model id (not an alias: the hint says whose it is)."""
    if name not in models:
        hint = _alias_hint(name, aliases, "list model ids")
        raise ConfigError(f"{where}: unknown model {name!r}{hint}")


# --- the names that refer to models ----------------------------------------------


def _read_profiles(
    value: object, models: Mapping[str, ModelConfig], aliases: Mapping[str, str]
) -> dict[str, tuple[str, ...]]:
    """C{profiles}: named lists of model ids, requested as C{profile:model}."""
    profiles: dict[str, tuple[str, ...]] = {}
    for name, members in _mapping("profiles", value).items():
        where = f"profiles.{name}"
        if not isinstance(name, str) or not name.strip() or ":" in name:
            raise ConfigError(f"{where}: profile names must be non-empty and contain no ':'")
        if isinstance(members, dict):
            raise ConfigError(f"{where}: must be a list of model ids")
        ids = _str_list(where, members)
        for i, member in enumerate(ids):
            _check_model_id(f"{where}[{i}]", member, models, aliases)
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{where}: lists the same model twice")
        profiles[name] = tuple(ids)
    return profiles


def _read_peers(
    value: object, models: Mapping[str, ModelConfig], expand: Expander, warnings: list[str]
) -> dict[str, PeerConfig]:
    """C{peers}: each peer's URL, model names, API key and filters."""
    taken = _local_names(models)
    return {
        peer_id: _read_peer(peer_id, spec, taken, expand, warnings)
        for peer_id, spec in _mapping("peers", value).items()
    }


def _local_names(models: Mapping[str, ModelConfig]) -> dict[str, str]:
    """The local names a qualified peer model name must not shadow, and what each is."""
    taken = {}
    for model in models.values():
        taken[model.id] = "a model id"
        taken.update((alias, f"an alias of {model.id}") for alias in model.aliases)
    return taken


def _read_peer(
    peer_id: str, spec: object, taken: Mapping[str, str], expand: Expander, warnings: list[str]
) -> PeerConfig:
    where = _join("peers", str(peer_id))
    if not isinstance(peer_id, str) or not peer_id.strip() or "/" in peer_id:
        raise ConfigError(f"{where}: peer ids must be non-empty strings without '/'")
    raw = _mapping(where, spec)
    _check_keys(where, raw, _PEER_KEYS)
    if "proxy" not in raw:
        raise ConfigError(f"{where}.proxy: required (the peer's base URL)")
    proxy = _url(f"{where}.proxy", expand(f"{where}.proxy", _str(f"{where}.proxy", raw["proxy"])))
    names = _read_peer_models(f"{where}.models", peer_id, raw, taken)
    api_key = None
    if raw.get("apiKey") is not None:
        path = f"{where}.apiKey"
        api_key = key_text(path, _str(path, raw["apiKey"]), expand.environ)
    filters_raw = _mapping(f"{where}.filters", raw.get("filters"))
    if "setParamsByID" in filters_raw:
        raise ConfigError(f"{where}.filters.setParamsByID: not available for peers")
    return PeerConfig(
        id=peer_id,
        proxy=proxy,
        models=names,
        api_key=api_key,
        filters=_read_filters(f"{where}.filters", filters_raw, expand, warnings),
        reuse_connections=_bool(f"{where}.reuseConnections", raw.get("reuseConnections", True)),
    )


def _read_peer_models(
    where: str, peer_id: str, raw: Mapping[str, Any], taken: Mapping[str, str]
) -> tuple[str, ...]:
    """A peer's C{models}: at least one, and no C{<peer>/<model>} that is a local name."""
    if "models" not in raw:
        raise ConfigError(f"{where}: required (the names the peer serves)")
    names = _str_list(where, raw["models"])
    if not names:
        raise ConfigError(f"{where}: list at least one model")
    for i, name in enumerate(names):
        if not name.strip():
            raise ConfigError(f"{where}[{i}]: must not be empty")
        fqn = f"{peer_id}/{name}"
        if fqn in taken:
            raise ConfigError(f"{where}[{i}]: {fqn!r} is already {taken[fqn]}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: lists the same model twice")
    return tuple(names)


def _read_groups(
    value: object,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    warnings: list[str],
) -> dict[str, GroupConfig]:
    """C{groups}: members (model ids, each in one group at most) and swap rules."""
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}  # model id -> its group
    for group_id, spec in _mapping("groups", value).items():
        where = f"groups.{group_id}"
        if not isinstance(group_id, str) or not group_id.strip():
            raise ConfigError(f"{where}: group names must be non-empty strings")
        if group_id == DEFAULT_GROUP_ID:
            raise ConfigError(f"{where}: the name is reserved for the models in no group")
        raw = _mapping(where, spec)
        _check_keys(where, raw, _GROUP_KEYS)
        members = _read_members(f"{where}.members", raw, group_id, models, aliases, owner)
        if not members:
            warnings.append(f"{where}.members: the group has no members")
        groups[group_id] = GroupConfig(
            id=group_id,
            members=members,
            swap=_bool(f"{where}.swap", raw.get("swap", True)),
            exclusive=_bool(f"{where}.exclusive", raw.get("exclusive", True)),
            persistent=_bool(f"{where}.persistent", raw.get("persistent", False)),
        )
    return groups


def _read_members(
    where: str,
    raw: Mapping[str, Any],
    group_id: str,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    owner: dict[str, str],
) -> tuple[str, ...]:
    """A group's C{members}: model ids not in another group (recorded in C{owner})."""
    if "members" not in raw:
        raise ConfigError(f"{where}: required (a list of model ids)")
    members = _str_list(where, raw["members"])
    for i, member in enumerate(members):
        path = f"{where}[{i}]"
        _check_model_id(path, member, models, aliases)
        if member in members[:i]:
            raise ConfigError(f"{path}: {member!r} is listed twice")
        if member in owner:
            raise ConfigError(
                f"{path}: {member!r} is already a member of group {owner[member]!r} "
                "(a model belongs to one group at most)"
            )
        owner[member] = group_id
    return tuple(members)


def _read_matrix(
    value: object,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    groups: Mapping[str, GroupConfig],
) -> Matrix | None:
    """C{matrix} (see L{llamaswap.config.matrix}); never together with groups."""
    if value is None:
        return None
    if groups:
        raise ConfigError("matrix: cannot be used together with groups (choose one)")
    return build_matrix(value, tuple(models), aliases)


def _read_hooks(
    value: object,
    models: Mapping[str, ModelConfig],
    aliases: Mapping[str, str],
    peers: Mapping[str, PeerConfig],
    warnings: list[str],
) -> tuple[str, ...]:
    """C{hooks.on_startup.preload}: the model ids to load at start (peers' models skipped)."""
    hooks = _mapping("hooks", value)
    _check_keys("hooks", hooks, ("on_startup",))
    on_startup = _mapping("hooks.on_startup", hooks.get("on_startup"))
    _check_keys("hooks.on_startup", on_startup, ("preload",))
    preload: list[str] = []
    for i, name in enumerate(_str_list("hooks.on_startup.preload", on_startup.get("preload"))):
        model_id = name if name in models else aliases.get(name)
        if model_id is None and _names_peer_model(peers, name):
            warnings.append(f"hooks.on_startup.preload[{i}]: {name!r} is a peer's model; skipped")
        elif model_id is None:
            raise ConfigError(f"hooks.on_startup.preload[{i}]: unknown model {name!r}")
        else:
            preload.append(model_id)
    return tuple(preload)


def _names_peer_model(peers: Mapping[str, PeerConfig], name: str) -> bool:
    peer_id, sep, rest = name.partition("/")
    if sep and peer_id in peers and rest in peers[peer_id].models:
        return True
    return any(name in peer.models for peer in peers.values())
