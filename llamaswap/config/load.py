# -*- test-case-name: tests.test_config -*-
"""
The configuration: strict YAML in, frozen attrs values out.

Loading rejects what a user would want to hear about (duplicate keys, unknown
keys with a suggestion, wrong types, unknown macros), and every error names the
dotted path of the offending key, e.g. C{models.qwen.ttl: must be >= 0}.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml
from attrs import field, frozen

from llamaswap.config.matrix import Matrix, MatrixError, build_matrix
from llamaswap.errors import ModelNotFound

DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_START_PORT = 5800
DEFAULT_LOG_HISTORY_BYTES = 100 * 1024
DEFAULT_MAX_BODY_SIZE = 256 * 1024 * 1024
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
# /upstream/<model>/<path> requests matching these never start a model (llama-swap's default).
DEFAULT_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
# Request body keys filters may neither strip nor set: routing depends on them.
PROTECTED_PARAMS = frozenset({"model"})

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")
# Macros the loader provides itself; users may not redefine them.
RESERVED_MACROS = frozenset({"PID", "PORT", "MODEL_ID", "PYTHON"})
_MACRO_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_MACRO_REF = re.compile(r"\$\{([^}]*)\}")
_ENV_REF = re.compile(r"\$\{env\.([A-Za-z_][A-Za-z0-9_]*)\}")


class ConfigError(Exception):
    """The configuration is invalid; C{str()} is one line naming the path."""


def _mapping_proxy(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


@frozen(kw_only=True)
class Filters:
    """
    Edits applied to the JSON body of a model route before it is relayed.

    C{strip_params} are removed, then C{set_params} are set, then the entry of
    C{set_params_by_id} for the name the client requested. None of them touches
    C{model}. Values are JSON-compatible (lists as tuples, mappings read-only).
    """

    strip_params: tuple[str, ...] = ()
    set_params: Mapping[str, Any] = field(factory=dict, converter=_mapping_proxy)
    set_params_by_id: Mapping[str, Mapping[str, Any]] = field(
        factory=dict, converter=_mapping_proxy
    )

    def __bool__(self) -> bool:
        return bool(self.strip_params or self.set_params or self.set_params_by_id)

    def edits_for(self, requested: str) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The keys to strip and the keys to set for a request naming C{requested}."""
        values = dict(self.set_params)
        values.update(self.set_params_by_id.get(requested, {}))
        return self.strip_params, values


@frozen(kw_only=True)
class ModelConfig:
    """One model: how to start its server and how to reach it."""

    id: str
    cmd: tuple[str, ...]
    cmd_line: str  # the command after macro expansion, as shown by /running
    proxy: str
    cmd_stop: tuple[str, ...] | None = None  # may contain ${PID}
    aliases: tuple[str, ...] = ()
    check_endpoint: str | None = "/health"  # None: `checkEndpoint: none`
    ttl: int = 0  # effective idle seconds before unload; 0 = never
    unload_timeout: float = DEFAULT_UNLOAD_TIMEOUT
    env: Mapping[str, str] = field(factory=dict, converter=_mapping_proxy)
    unlisted: bool = False
    use_model_name: str | None = None
    name: str = ""
    description: str = ""
    metadata: Mapping[str, Any] = field(factory=dict, converter=_mapping_proxy)
    concurrency_limit: int = 0  # 0 = unlimited
    port: int | None = None
    filters: Filters = Filters()
    send_loading_state: bool = False  # the model's own setting, else the global one
    # Keep-alive while requests do not overlap (False: a connection per request;
    # docs/llama-server.md).
    reuse_connections: bool = True


@frozen(kw_only=True)
class PeerConfig:
    """
    Another server (typically another llamaswap or llama-swap) whose models are
    relayed to as they are: no local process, no swap. Its models are requested
    as C{<peer id>/<model>}, or by the bare name when no local model or alias has
    it and no other peer lists it.
    """

    id: str
    proxy: str  # base URL without a trailing slash; the request path is appended
    models: tuple[str, ...]
    api_key: str | None = None  # sent as Authorization: Bearer and x-api-key
    filters: Filters = Filters()
    reuse_connections: bool = True  # keep-alive, as for models


@frozen(kw_only=True)
class PeerTarget:
    """A requested name that resolved to a peer's model."""

    peer: PeerConfig
    model: str  # the name the peer knows it by (the body's "model" upstream)

    @property
    def fqn(self) -> str:
        """The qualified name, C{<peer id>/<model>}."""
        return f"{self.peer.id}/{self.model}"


@frozen(kw_only=True)
class Target:
    """What a requested model name resolves to."""

    model_id: str
    profile: str | None = None
    # The name the upstream should see in the body's "model", or None to keep it.
    upstream_model: str | None = None


DEFAULT_GROUP_ID = "(default)"  # the implicit group of models listed in no group


@frozen(kw_only=True)
class GroupConfig:
    """
    A group of models (llama-swap's C{groups}): which of them may run together.

    Loading a member stops the other members if C{swap}, and the members of
    every other group that is not C{persistent} if C{exclusive}. Models in no
    group form the implicit default group (swap and exclusive: one at a time).
    """

    id: str
    members: tuple[str, ...]
    swap: bool = True
    exclusive: bool = True
    persistent: bool = False


@frozen(kw_only=True)
class Config:
    """The whole validated configuration."""

    models: Mapping[str, ModelConfig] = field(converter=_mapping_proxy)
    profiles: Mapping[str, tuple[str, ...]] = field(factory=dict, converter=_mapping_proxy)
    groups: Mapping[str, GroupConfig] = field(factory=dict, converter=_mapping_proxy)
    matrix: Matrix | None = None  # llama-swap's matrix; never together with groups
    peers: Mapping[str, PeerConfig] = field(factory=dict, converter=_mapping_proxy)
    health_check_timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT
    log_requests: bool = False
    log_level: str = "info"
    log_to_stdout: str = "proxy"
    log_history_bytes: int = DEFAULT_LOG_HISTORY_BYTES
    start_port: int = DEFAULT_START_PORT
    global_ttl: int = 0
    unload_timeout: float = DEFAULT_UNLOAD_TIMEOUT
    include_aliases_in_list: bool = False
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    api_keys: tuple[str, ...] = ()
    preload: tuple[str, ...] = ()
    send_loading_state: bool = False
    upstream_ignore_paths: tuple[re.Pattern[str], ...] = field(
        factory=lambda: tuple(re.compile(p) for p in DEFAULT_IGNORE_PATHS)
    )
    base_dir: str = "."
    source: str = "<string>"
    warnings: tuple[str, ...] = ()

    def group_of(self, model_id: str) -> GroupConfig:
        """The group of model C{model_id}: its own, else the implicit default group."""
        for group in self.groups.values():
            if model_id in group.members:
                return group
        grouped = {m for group in self.groups.values() for m in group.members}
        return GroupConfig(
            id=DEFAULT_GROUP_ID, members=tuple(m for m in self.models if m not in grouped)
        )

    def find_model(self, name: str) -> ModelConfig | None:
        """Return the model whose id or alias is C{name}, if any."""
        model = self.models.get(name)
        if model is not None:
            return model
        for candidate in self.models.values():
            if name in candidate.aliases:
                return candidate
        return None

    def resolve(self, requested: str) -> Target:
        """
        Resolve a requested name: a model id, an alias, or C{profile:model}.

        Exact ids and aliases win over the profile reading, so model ids that
        contain C{:} (C{qwen2.5:7b}) stay requestable.

        @raise ModelNotFound: with a message that names only what was asked.
        """
        model = self.find_model(requested)
        if model is not None:
            return Target(model_id=model.id, upstream_model=model.use_model_name)
        profile, sep, rest = requested.partition(":")
        if sep and profile:
            members = self.profiles.get(profile)
            if members is None:
                raise ModelNotFound(f"profile not found: {profile}")
            model = self.find_model(rest)
            if model is None or model.id not in members:
                raise ModelNotFound(f"model {rest} is not part of profile {profile}")
            return Target(
                model_id=model.id,
                profile=profile,
                upstream_model=model.use_model_name or rest,
            )
        raise ModelNotFound(f"model not found: {requested}")

    def find_peer(self, requested: str) -> PeerTarget | None:
        """
        The peer model C{requested} names, or None if it names none (or a local one).

        Order: local model ids and aliases, then C{<peer>/<model>}, then the
        C{profile:model} reading, then a bare name listed by exactly one peer.

        @raise ModelNotFound: a bare name several peers list (ambiguous).
        """
        if not self.peers or self.find_model(requested) is not None:
            return None
        peer_id, sep, name = requested.partition("/")
        peer = self.peers.get(peer_id) if sep else None
        if peer is not None and name in peer.models:
            return PeerTarget(peer=peer, model=name)
        try:
            self.resolve(requested)
            return None  # a profile:model
        except ModelNotFound:
            pass
        offering = [p for p in self.peers.values() if requested in p.models]
        if len(offering) > 1:
            choices = ", ".join(f"{p.id}/{requested}" for p in offering)
            raise ModelNotFound(f"model {requested} is served by several peers; ask for {choices}")
        return PeerTarget(peer=offering[0], model=requested) if offering else None


# --- YAML ------------------------------------------------------------------


class _Folded(str):
    """
    A folded (C{>}) block scalar that also keeps its original lines.

    Folding joins lines with spaces before we see them, which would turn a
    C{# comment} line or a trailing C{\\} inside C{cmd: >} into arguments;
    L{command_text} reads C{lines} instead.
    """

    lines: str

    def __new__(cls, value: str, lines: str) -> _Folded:
        self = super().__new__(cls, value)
        self.lines = lines
        return self


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader whose folded block scalars remember their lines (see L{_Folded})."""

    def scan_block_scalar(self, style: str) -> yaml.ScalarToken:
        # Only for text held fully in memory: we scan the block twice.
        if style != ">" or self.stream is not None or self.raw_buffer is not None:
            return super().scan_block_scalar(style)
        saved = (self.pointer, self.index, self.line, self.column)
        literal = super().scan_block_scalar("|")
        self.pointer, self.index, self.line, self.column = saved
        token = super().scan_block_scalar(style)
        token.value = _Folded(token.value, literal.value)
        return token


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_duplicates(node: yaml.Node, where: str, visited: set[int]) -> None:
    """Reject duplicate mapping keys (PyYAML keeps the last one silently)."""
    if id(node) in visited:  # anchors/aliases: check each node once
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *base` keys may be overridden
                continue
            path = where
            if isinstance(key_node, yaml.ScalarNode):
                path = _join(where, str(key_node.value))
                line = key_node.start_mark.line + 1
                if key_node.value in lines:
                    raise ConfigError(
                        f"{path}: duplicate key (lines {lines[key_node.value]} and {line})"
                    )
                lines[key_node.value] = line
            _check_duplicates(value_node, path, visited)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{where}[{i}]", visited)


def _load_yaml(text: str, source: str) -> Any:
    """Parse one YAML document safely; errors become one-line L{ConfigError}s."""
    loader = _StrictLoader(text)
    loader.name = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicates(node, "", set())
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        reason = ": ".join(part for part in (e.context, e.problem) if part)
        raise ConfigError(f"{where}: {' '.join(reason.split())}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {' '.join(str(e).split())}") from e
    finally:
        loader.dispose()


# --- small typed readers ------------------------------------------------------

_TOP_KEYS = (
    "healthCheckTimeout",
    "logRequests",
    "logLevel",
    "logToStdout",
    "logHistoryBytes",
    "startPort",
    "globalTTL",
    "unloadTimeout",
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
)
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
    "filters",
    "sendLoadingState",
    "reuseConnections",
)
_FILTER_KEYS = ("stripParams", "setParams", "setParamsByID")


def _check_keys(where: str, raw: Mapping[str, Any], allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    for key in raw:
        if not isinstance(key, str):
            raise ConfigError(f"{_join(where, str(key))}: keys must be strings")
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{_join(where, key)}: unknown key{hint}")


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


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


# --- macros ----------------------------------------------------------------

# Built-in macros filled in per model (PID only when cmdStop runs); a macro value
# may mention them, and they are substituted where that macro is used.
_LATE_MACROS = frozenset({"PID", "PORT", "MODEL_ID"})


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


def _metadata_value(
    where: str, value: object, macros: Mapping[str, object], expand: Callable[[str, str], str]
) -> object:
    """Expand macros in metadata; lists become tuples and mappings read-only."""
    if isinstance(value, str):
        # A value that is exactly "${macro}" keeps the macro's own type (int, bool...).
        match = _MACRO_REF.fullmatch(value)
        if match and not isinstance(macros.get(match.group(1), ""), str):
            return macros[match.group(1)]
        return expand(where, value)
    if isinstance(value, list):
        return tuple(
            _metadata_value(f"{where}[{i}]", v, macros, expand) for i, v in enumerate(value)
        )
    if isinstance(value, dict):
        return MappingProxyType(
            {k: _metadata_value(_join(where, str(k)), v, macros, expand) for k, v in value.items()}
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


# --- loading ---------------------------------------------------------------


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Config:
    """
    Read and validate the YAML file at C{path}.

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
    )


def parse_config(
    text: str,
    *,
    base_dir: str = ".",
    source: str = "<string>",
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Parse and validate configuration text (see L{load_config})."""
    env = os.environ if environ is None else environ
    raw = _load_yaml(text, source)
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'models' key")
    _check_keys("", raw, _TOP_KEYS)
    warnings: list[str] = []

    hct = _int("healthCheckTimeout", raw.get("healthCheckTimeout", DEFAULT_HEALTH_CHECK_TIMEOUT))
    if hct < MIN_HEALTH_CHECK_TIMEOUT:
        warnings.append(
            f"healthCheckTimeout: {hct} is below the minimum; using {MIN_HEALTH_CHECK_TIMEOUT}"
        )
        hct = MIN_HEALTH_CHECK_TIMEOUT
    global_ttl = _int("globalTTL", raw.get("globalTTL", 0), minimum=0)
    unload_timeout = _number("unloadTimeout", raw.get("unloadTimeout", 0), minimum=0)
    unload_timeout = unload_timeout or DEFAULT_UNLOAD_TIMEOUT
    start_port = _int("startPort", raw.get("startPort", DEFAULT_START_PORT), minimum=1)
    if start_port > 65535:
        raise ConfigError("startPort: must be <= 65535")
    send_loading_state = _bool("sendLoadingState", raw.get("sendLoadingState", False))
    ignore_paths = _read_upstream(raw.get("upstream"))
    builtin: dict[str, object] = {"PYTHON": shlex.quote(sys.executable)}
    macros = _read_macros("macros", raw.get("macros"), env, builtin)

    if "models" not in raw:
        raise ConfigError("models: required (a mapping of model id to its settings)")
    raw_models = _mapping("models", raw["models"])
    if not raw_models:
        raise ConfigError("models: define at least one model")
    for model_id in raw_models:
        if not isinstance(model_id, str) or not model_id.strip():
            raise ConfigError(f"models.{model_id}: model ids must be non-empty strings")

    # ${PORT} goes to the models whose (expanded) cmd uses it, in sorted id
    # order from startPort, so the numbers do not depend on the file's order.
    ports = iter(range(start_port, 65536))

    def allocate_port(where: str) -> int:
        port = next(ports, None)
        if port is None:
            raise ConfigError(f"{where}: no port left for ${{PORT}} (startPort {start_port})")
        return port

    read: dict[str, tuple[ModelConfig, list[str]]] = {}
    for model_id in sorted(raw_models):
        read[model_id] = _read_model(
            model_id,
            raw_models[model_id],
            macros=macros,
            environ=env,
            allocate_port=allocate_port,
            global_ttl=global_ttl,
            unload_timeout=unload_timeout,
            send_loading_state=send_loading_state,
            warnings=warnings,
        )
    models = {model_id: read[model_id][0] for model_id in raw_models}
    _check_aliases(models, {model_id: read[model_id][1] for model_id in raw_models})

    profiles: dict[str, tuple[str, ...]] = {}
    for name, members in _mapping("profiles", raw.get("profiles")).items():
        where = f"profiles.{name}"
        if not isinstance(name, str) or not name.strip() or ":" in name:
            raise ConfigError(f"{where}: profile names must be non-empty and contain no ':'")
        if isinstance(members, dict):
            raise ConfigError(f"{where}: must be a list of model ids")
        ids = _str_list(where, members)
        for i, member in enumerate(ids):
            if member not in models:
                found = next((m.id for m in models.values() if member in m.aliases), None)
                hint = f" ({member!r} is an alias of {found!r}; list model ids)" if found else ""
                raise ConfigError(f"{where}[{i}]: unknown model {member!r}{hint}")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"{where}: lists the same model twice")
        profiles[name] = tuple(ids)

    peers = _read_peers(raw.get("peers"), models, macros, env, warnings)
    groups = _read_groups(raw.get("groups"), models, warnings)
    matrix = None
    if raw.get("matrix") is not None:
        if groups:
            raise ConfigError("matrix: cannot be used together with groups (choose one)")
        aliases = {alias: m.id for m in models.values() for alias in m.aliases}
        try:
            matrix = build_matrix(raw["matrix"], tuple(models), aliases)
        except MatrixError as e:
            raise ConfigError(str(e)) from e

    hooks = _mapping("hooks", raw.get("hooks"))
    _check_keys("hooks", hooks, ("on_startup",))
    on_startup = _mapping("hooks.on_startup", hooks.get("on_startup"))
    _check_keys("hooks.on_startup", on_startup, ("preload",))
    preload: list[str] = []
    for i, name in enumerate(_str_list("hooks.on_startup.preload", on_startup.get("preload"))):
        found_model = next((m for m in models.values() if name in (m.id, *m.aliases)), None)
        if found_model is None and _names_peer_model(peers, name):
            warnings.append(f"hooks.on_startup.preload[{i}]: {name!r} is a peer's model; skipped")
            continue
        if found_model is None:
            raise ConfigError(f"hooks.on_startup.preload[{i}]: unknown model {name!r}")
        preload.append(found_model.id)

    api_keys = []
    for i, key in enumerate(_str_list("apiKeys", raw.get("apiKeys"))):
        key = _substitute_env(f"apiKeys[{i}]", key, env)
        if not key or any(c.isspace() for c in key):
            raise ConfigError(f"apiKeys[{i}]: must be non-empty and contain no spaces")
        api_keys.append(key)

    return Config(
        models=models,
        profiles=profiles,
        groups=groups,
        matrix=matrix,
        peers=peers,
        health_check_timeout=hct,
        log_requests=_bool("logRequests", raw.get("logRequests", False)),
        log_level=_choice("logLevel", raw.get("logLevel", "info"), LOG_LEVELS),
        log_to_stdout=_choice("logToStdout", raw.get("logToStdout", "proxy"), LOG_TO_STDOUT),
        log_history_bytes=_int(
            "logHistoryBytes", raw.get("logHistoryBytes", DEFAULT_LOG_HISTORY_BYTES), minimum=1024
        ),
        start_port=start_port,
        global_ttl=global_ttl,
        unload_timeout=unload_timeout,
        include_aliases_in_list=_bool(
            "includeAliasesInList", raw.get("includeAliasesInList", False)
        ),
        max_body_size=_int(
            "maxBodySize", raw.get("maxBodySize", DEFAULT_MAX_BODY_SIZE), minimum=1024
        ),
        api_keys=tuple(api_keys),
        preload=tuple(preload),
        send_loading_state=send_loading_state,
        upstream_ignore_paths=ignore_paths,
        base_dir=base_dir,
        source=source,
        warnings=tuple(warnings),
    )


def _read_model(
    model_id: str,
    spec: object,
    *,
    macros: Mapping[str, object],
    environ: Mapping[str, str],
    allocate_port: Callable[[str], int],
    global_ttl: int,
    unload_timeout: float,
    send_loading_state: bool,
    warnings: list[str],
) -> tuple[ModelConfig, list[str]]:
    """Read one model; also return where each of its aliases was declared."""
    where = f"models.{model_id}"
    raw = _mapping(where, spec)
    _check_keys(where, raw, _MODEL_KEYS)
    if "cmd" not in raw:
        raise ConfigError(f"{where}.cmd: required")

    local = _read_macros(f"{where}.macros", raw.get("macros"), environ, macros)
    local["MODEL_ID"] = model_id

    def expand(path: str, text: str, keep: frozenset[str] = frozenset()) -> str:
        return _expand(path, _substitute_env(path, text, environ), local, keep)

    # Comment lines go before expansion: a macro in a comment is never an error.
    cmd_text = command_text(_str(f"{where}.cmd", raw["cmd"]))
    port: int | None = None
    if "${PORT}" in expand(f"{where}.cmd", cmd_text, frozenset({"PORT"})):
        port = local["PORT"] = allocate_port(f"{where}.cmd")

    def plain(path: str, text: str) -> str:
        if port is None and "${PORT}" in expand(path, text, frozenset({"PORT"})):
            raise ConfigError(f"{path}: uses ${{PORT}} but cmd does not")
        return expand(path, text)

    cmd_line = plain(f"{where}.cmd", cmd_text)
    cmd = split_command(f"{where}.cmd", cmd_line)

    cmd_stop = None
    if raw.get("cmdStop") not in (None, ""):
        stop_text = command_text(_str(f"{where}.cmdStop", raw["cmdStop"]))
        if port is None and "${PORT}" in expand(
            f"{where}.cmdStop", stop_text, frozenset({"PORT", "PID"})
        ):
            raise ConfigError(f"{where}.cmdStop: uses ${{PORT}} but cmd does not")
        stop_line = expand(f"{where}.cmdStop", stop_text, frozenset({"PID"}))
        cmd_stop = split_command(f"{where}.cmdStop", stop_line)

    if "proxy" in raw:
        proxy = plain(f"{where}.proxy", _str(f"{where}.proxy", raw["proxy"])).strip()
    elif port is not None:
        proxy = f"http://127.0.0.1:{port}"
    else:
        raise ConfigError(f"{where}.proxy: required when cmd does not use ${{PORT}}")
    if not re.match(r"https?://[^/]+", proxy):
        raise ConfigError(f"{where}.proxy: must be an http:// or https:// URL")
    proxy = proxy.rstrip("/")

    check = raw.get("checkEndpoint", "/health")
    check = plain(f"{where}.checkEndpoint", _str(f"{where}.checkEndpoint", check)).strip()
    check_endpoint: str | None
    if check.lower() == "none":
        check_endpoint = None
    elif check == "":
        check_endpoint = "/health"
    elif not check.startswith("/"):
        raise ConfigError(f"{where}.checkEndpoint: must start with / or be 'none'")
    else:
        check_endpoint = check

    ttl = _int(f"{where}.ttl", raw.get("ttl", -1))
    if ttl < -1:
        raise ConfigError(f"{where}.ttl: must be >= 0 (or -1 to use globalTTL)")
    if ttl == -1:
        ttl = global_ttl

    model_unload = _number(f"{where}.unloadTimeout", raw.get("unloadTimeout", 0), minimum=0)

    env: dict[str, str] = {}
    for i, item in enumerate(_str_list(f"{where}.env", raw.get("env"))):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{where}.env[{i}]: must look like NAME=value")
        env[key] = plain(f"{where}.env[{i}]", value)

    aliases = _str_list(f"{where}.aliases", raw.get("aliases"))
    for i, alias in enumerate(aliases):
        if not alias.strip():
            raise ConfigError(f"{where}.aliases[{i}]: must not be empty")
    if len(set(aliases)) != len(aliases):
        raise ConfigError(f"{where}.aliases: lists the same alias twice")

    use_model_name = raw.get("useModelName")
    if use_model_name is not None:
        use_model_name = plain(
            f"{where}.useModelName", _str(f"{where}.useModelName", use_model_name)
        )

    name = plain(f"{where}.name", _str(f"{where}.name", raw.get("name", ""))).strip()
    description = plain(
        f"{where}.description", _str(f"{where}.description", raw.get("description", ""))
    ).strip()
    if len(name) > 128:
        raise ConfigError(f"{where}.name: at most 128 characters")
    metadata_raw = _mapping(f"{where}.metadata", raw.get("metadata"))
    metadata = _metadata_value(f"{where}.metadata", metadata_raw, local, plain)
    assert isinstance(metadata, Mapping)

    filters = _read_filters(f"{where}.filters", raw.get("filters"), local, plain, warnings)
    # Names in setParamsByID are requestable: they become aliases (after the explicit ones).
    alias_paths = [f"{where}.aliases[{i}]" for i in range(len(aliases))]
    for key in filters.set_params_by_id:
        if key != model_id and key not in aliases:
            aliases.append(key)
            alias_paths.append(f"{where}.filters.setParamsByID.{key}")

    model = ModelConfig(
        id=model_id,
        cmd=cmd,
        cmd_line=cmd_line,
        cmd_stop=cmd_stop,
        proxy=proxy,
        aliases=tuple(aliases),
        check_endpoint=check_endpoint,
        ttl=ttl,
        unload_timeout=model_unload or unload_timeout,
        env=env,
        unlisted=_bool(f"{where}.unlisted", raw.get("unlisted", False)),
        use_model_name=use_model_name or None,
        name=name,
        description=description,
        metadata=metadata,
        concurrency_limit=_int(
            f"{where}.concurrencyLimit", raw.get("concurrencyLimit", 0), minimum=0
        ),
        port=port,
        filters=filters,
        send_loading_state=_bool(
            f"{where}.sendLoadingState", raw.get("sendLoadingState", send_loading_state)
        ),
        reuse_connections=_bool(f"{where}.reuseConnections", raw.get("reuseConnections", True)),
    )
    return model, alias_paths


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


def _json_value(
    where: str, value: object, macros: Mapping[str, object], expand: Callable[[str, str], str]
) -> object:
    """A filter value: macros expanded (as in metadata), and representable in JSON."""
    expanded = _metadata_value(where, value, macros, expand)
    try:
        json.dumps(plain_json(expanded), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: not representable in JSON ({_type_name(value)})") from e
    return expanded


def _param_map(
    where: str, value: object, macros: Mapping[str, object], expand: Callable[[str, str], str]
) -> dict[str, object]:
    params = {}
    for key, item in _mapping(where, value).items():
        path = _join(where, str(key))
        if not isinstance(key, str) or not key:
            raise ConfigError(f"{path}: keys must be non-empty strings")
        if key in PROTECTED_PARAMS:
            raise ConfigError(f"{path}: {key!r} cannot be set by a filter (see useModelName)")
        params[key] = _json_value(path, item, macros, expand)
    return params


def _read_filters(
    where: str,
    value: object,
    macros: Mapping[str, object],
    expand: Callable[[str, str], str],
    warnings: list[str],
) -> Filters:
    raw = _mapping(where, value)
    _check_keys(where, raw, _FILTER_KEYS)

    strip_raw = raw.get("stripParams", "")
    path = f"{where}.stripParams"
    if isinstance(strip_raw, list):
        names = _str_list(path, strip_raw)
    else:
        names = expand(path, _str(path, strip_raw)).split(",")
    strip: set[str] = set()
    for name in (n.strip() for n in names):
        if name in PROTECTED_PARAMS:
            warnings.append(f"{path}: {name!r} is never stripped; ignored")
        elif name:
            strip.add(name)

    by_id: dict[str, dict[str, object]] = {}
    for key, params in _mapping(f"{where}.setParamsByID", raw.get("setParamsByID")).items():
        path = f"{where}.setParamsByID.{key}"
        if not isinstance(key, str) or not key.strip():
            raise ConfigError(f"{path}: keys must be non-empty strings (requested model names)")
        name = expand(path, key)
        if name in by_id:
            raise ConfigError(f"{path}: the name {name!r} is listed twice")
        by_id[name] = _param_map(path, params, macros, expand)

    return Filters(
        strip_params=tuple(sorted(strip)),
        set_params=_param_map(f"{where}.setParams", raw.get("setParams"), macros, expand),
        set_params_by_id={k: MappingProxyType(v) for k, v in by_id.items()},
    )


def plain_json(value: Any) -> Any:
    """A config value (read-only mappings, tuples) as plain JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value


def _check_aliases(models: Mapping[str, ModelConfig], paths: Mapping[str, list[str]]) -> None:
    owner: dict[str, str] = {}
    for model in models.values():
        for alias, where in zip(model.aliases, paths[model.id], strict=True):
            if alias in models:
                raise ConfigError(f"{where}: {alias!r} is already a model id")
            if alias in owner:
                raise ConfigError(f"{where}: {alias!r} is already an alias of {owner[alias]}")
            owner[alias] = model.id


# --- peers -------------------------------------------------------------------

_PEER_KEYS = ("proxy", "models", "apiKey", "filters", "reuseConnections")


def _names_peer_model(peers: Mapping[str, PeerConfig], name: str) -> bool:
    peer_id, sep, rest = name.partition("/")
    if sep and peer_id in peers and rest in peers[peer_id].models:
        return True
    return any(name in peer.models for peer in peers.values())


def _read_peers(
    value: object,
    models: Mapping[str, ModelConfig],
    macros: Mapping[str, object],
    environ: Mapping[str, str],
    warnings: list[str],
) -> dict[str, PeerConfig]:
    """C{peers}: each peer's URL, model names, API key and filters."""
    taken = {}  # local names a qualified peer model name must not shadow
    for model in models.values():
        taken[model.id] = "a model id"
        taken.update((alias, f"an alias of {model.id}") for alias in model.aliases)

    def expand(path: str, text: str) -> str:
        return _expand(path, _substitute_env(path, text, environ), macros, frozenset())

    peers = {}
    for peer_id, spec in _mapping("peers", value).items():
        where = _join("peers", str(peer_id))
        if not isinstance(peer_id, str) or not peer_id.strip() or "/" in peer_id:
            raise ConfigError(f"{where}: peer ids must be non-empty strings without '/'")
        raw = _mapping(where, spec)
        _check_keys(where, raw, _PEER_KEYS)
        if "proxy" not in raw:
            raise ConfigError(f"{where}.proxy: required (the peer's base URL)")
        proxy = expand(f"{where}.proxy", _str(f"{where}.proxy", raw["proxy"])).strip()
        if not re.match(r"https?://[^/]+", proxy):
            raise ConfigError(f"{where}.proxy: must be an http:// or https:// URL")
        if "models" not in raw:
            raise ConfigError(f"{where}.models: required (the names the peer serves)")
        names = _str_list(f"{where}.models", raw["models"])
        if not names:
            raise ConfigError(f"{where}.models: list at least one model")
        for i, name in enumerate(names):
            if not name.strip():
                raise ConfigError(f"{where}.models[{i}]: must not be empty")
            fqn = f"{peer_id}/{name}"
            if fqn in taken:
                raise ConfigError(f"{where}.models[{i}]: {fqn!r} is already {taken[fqn]}")
        if len(set(names)) != len(names):
            raise ConfigError(f"{where}.models: lists the same model twice")
        api_key = None
        if raw.get("apiKey") is not None:
            path = f"{where}.apiKey"
            api_key = _substitute_env(path, _str(path, raw["apiKey"]), environ)
            if not api_key or any(c.isspace() for c in api_key):
                raise ConfigError(f"{path}: must be non-empty and contain no spaces")
        filters_raw = _mapping(f"{where}.filters", raw.get("filters"))
        if "setParamsByID" in filters_raw:
            raise ConfigError(f"{where}.filters.setParamsByID: not available for peers")
        peers[peer_id] = PeerConfig(
            id=peer_id,
            proxy=proxy.rstrip("/"),
            models=tuple(names),
            api_key=api_key,
            filters=_read_filters(f"{where}.filters", filters_raw, macros, expand, warnings),
            reuse_connections=_bool(f"{where}.reuseConnections", raw.get("reuseConnections", True)),
        )
    return peers


# --- groups ------------------------------------------------------------------

_GROUP_KEYS = ("swap", "exclusive", "persistent", "members")


def _read_groups(
    value: object, models: Mapping[str, ModelConfig], warnings: list[str]
) -> dict[str, GroupConfig]:
    """C{groups}: members (model ids, each in one group at most) and swap rules."""
    groups: dict[str, GroupConfig] = {}
    owner: dict[str, str] = {}
    for group_id, spec in _mapping("groups", value).items():
        where = f"groups.{group_id}"
        if not isinstance(group_id, str) or not group_id.strip():
            raise ConfigError(f"{where}: group names must be non-empty strings")
        if group_id == DEFAULT_GROUP_ID:
            raise ConfigError(f"{where}: the name is reserved for the models in no group")
        raw = _mapping(where, spec)
        _check_keys(where, raw, _GROUP_KEYS)
        if "members" not in raw:
            raise ConfigError(f"{where}.members: required (a list of model ids)")
        members = _str_list(f"{where}.members", raw["members"])
        for i, member in enumerate(members):
            path = f"{where}.members[{i}]"
            if member not in models:
                found = next((m.id for m in models.values() if member in m.aliases), None)
                hint = f" ({member!r} is an alias of {found!r}; list model ids)" if found else ""
                raise ConfigError(f"{path}: unknown model {member!r}{hint}")
            if member in members[:i]:
                raise ConfigError(f"{path}: {member!r} is listed twice")
            if member in owner:
                raise ConfigError(
                    f"{path}: {member!r} is already a member of group {owner[member]!r} "
                    "(a model belongs to one group at most)"
                )
            owner[member] = group_id
        if not members:
            warnings.append(f"{where}.members: the group has no members")
        groups[group_id] = GroupConfig(
            id=group_id,
            members=tuple(members),
            swap=_bool(f"{where}.swap", raw.get("swap", True)),
            exclusive=_bool(f"{where}.exclusive", raw.get("exclusive", True)),
            persistent=_bool(f"{where}.persistent", raw.get("persistent", False)),
        )
    return groups
