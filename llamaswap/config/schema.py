# -*- test-case-name: tests.test_config -*-
"""
The configuration's values: frozen attrs classes, their defaults and the
constants the loader and the rest of llamaswap share. Nothing here reads YAML.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from attrs import field, frozen

from llamaswap.config.matrix import Matrix

DEFAULT_HEALTH_CHECK_TIMEOUT = 120
MIN_HEALTH_CHECK_TIMEOUT = 15
DEFAULT_UNLOAD_TIMEOUT = 10
DEFAULT_START_PORT = 5800
DEFAULT_LOG_HISTORY_BYTES = 100 * 1024
# twistd's --logfile: rotated at this size, this many rotated files kept (at most 60 MiB in all).
DEFAULT_LOG_ROTATE_BYTES = 10 * 2**20
DEFAULT_LOG_KEEP = 5
DEFAULT_MAX_BODY_SIZE = 256 * 1024 * 1024
DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
# A graceful stop waits this long for requests in flight: with unloadTimeout's 10 s
# and a margin it fits systemd's default stop timeout (90 s) and our unit's.
DEFAULT_SHUTDOWN_TIMEOUT = 60.0
# The scheduler's defaults (docs/swapping.md, "Fairness"): seconds, and queued requests.
DEFAULT_MAX_WAIT = 60.0
DEFAULT_MIN_RESIDENCY = 10.0
DEFAULT_QUEUE_TIMEOUT = 600.0
DEFAULT_QUEUE_LENGTH = 512
# Memory admission (docs/swapping.md, "Memory"): what is kept free on each device, how long
# a start waits for a stopped server's memory to come back, where measured figures are kept.
DEFAULT_MEMORY_RESERVE = 2**30
DEFAULT_RELEASE_TIMEOUT = 30.0
DEFAULT_MEMORY_STATE_FILE = "llamaswap-memory.json"
MEMORY_SOURCES = ("nvidia-smi", "meminfo", "none")
ANY_DEVICE = "*"  # a model's one memory figure: on the device it is placed on, or the first
# /upstream/<model>/<path> requests matching these never start a model (llama-swap's default).
DEFAULT_IGNORE_PATHS = (r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$",)
# Request body keys filters may neither strip nor set: routing depends on them.
PROTECTED_PARAMS = frozenset({"model"})

LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_TO_STDOUT = ("proxy", "upstream", "both", "none")


def _mapping_proxy(value: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(value))


def _optional_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    return None if value is None else _mapping_proxy(value)


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
    concurrency_limit: int = 0  # in flight at once, 0 = unlimited; more requests queue
    # The scheduler (docs/swapping.md): after max_wait seconds in the queue a request goes
    # first; a model that became ready keeps taking new requests for min_residency seconds.
    max_wait: float = DEFAULT_MAX_WAIT
    min_residency: float = DEFAULT_MIN_RESIDENCY
    port: int | None = None
    filters: Filters = Filters()
    send_loading_state: bool = False  # the model's own setting, else the global one
    # Keep-alive while requests do not overlap (False: a connection per request;
    # docs/llama-server.md).
    reuse_connections: bool = True
    # Declared memory in bytes by device (ANY_DEVICE: one figure), None: not declared.
    memory: Mapping[str, int] | None = field(default=None, converter=_optional_mapping)
    placed: bool = False  # cmd or env uses ${GPU}: started on whichever device has room


@frozen(kw_only=True)
class MemoryConfig:
    """
    Memory admission (C{memory:}): models run together while they fit in each
    device's budget (its memory less C{reserve}); docs/swapping.md, "Memory".
    """

    source: str = "nvidia-smi"  # where device totals and usage come from: MEMORY_SOURCES
    devices: Mapping[str, int] = field(factory=dict, converter=_mapping_proxy)  # declared totals
    reserve: int = DEFAULT_MEMORY_RESERVE  # bytes kept free on every device
    release_timeout: float = DEFAULT_RELEASE_TIMEOUT  # 0: do not wait for memory to come back
    state_file: str = DEFAULT_MEMORY_STATE_FILE  # measured figures; absolute once loaded
    nvidia_smi: tuple[str, ...] = ("nvidia-smi",)  # the command, for tests and odd installs


@frozen(kw_only=True)
class QueueConfig:
    """
    The request queue (C{queue:}): its bounds, and the defaults of the models'
    C{maxWait} and C{minResidency}.
    """

    max_wait: float = DEFAULT_MAX_WAIT
    min_residency: float = DEFAULT_MIN_RESIDENCY
    timeout: float = DEFAULT_QUEUE_TIMEOUT  # a queued request fails (503) after this; 0 = never
    max_length: int = DEFAULT_QUEUE_LENGTH  # queued requests at most; more are refused (429)
    concurrency_limit: int = 0  # requests in flight across all models; 0 = unlimited


@frozen(kw_only=True)
class LogRotation:
    """
    How twistd's C{--logfile} rotates (C{logRotation:}): when it reaches
    C{max_bytes}, and how many rotated files (C{x.log.1} ...) are kept.
    """

    max_bytes: int = DEFAULT_LOG_ROTATE_BYTES
    keep: int = DEFAULT_LOG_KEEP


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


DEFAULT_GROUP_ID = "(default)"  # the implicit group of models listed in no group

# What a key may do besides inference (docs/api.md, "API keys"): "inference" (model
# routes and the model list), "read" (+ /running), "admin" (everything).
ACCESS_LEVELS = ("inference", "read", "admin")
DEFAULT_HEADER_TIMEOUT = 30.0  # seconds to receive a request's whole head
DEFAULT_BODY_TIMEOUT = 60.0  # seconds a body upload may go without a byte


def _api_key(value: ApiKey | str) -> ApiKey:
    return ApiKey(key=value) if isinstance(value, str) else value


def _api_keys(values: tuple[ApiKey | str, ...]) -> tuple[ApiKey, ...]:
    return tuple(_api_key(v) for v in values)


@frozen(kw_only=True)
class ApiKey:
    """
    One API key and what it may do. A key given as a plain string may do
    everything (as before scopes existed).
    """

    key: str = field(repr=False)  # never in a repr, a log line or an error
    name: str = ""  # what logs and errors call it
    models: tuple[str, ...] = ("*",)  # model ids/aliases and <peer>/<model> names (globs)
    load: bool = True  # may start a model that is not loaded (and so stop others)
    access: str = "admin"
    concurrency_limit: int = 0  # its requests in flight at once; more wait (0: no limit)
    priority: int = 0  # higher goes first among queued requests that are not due

    @property
    def label(self) -> str:
        return self.name or "a key"


@frozen(kw_only=True)
class SecurityConfig:
    """
    C{security}: what protects a proxy on a workstation from web pages and slow
    clients (docs/deployment.md, "Security").
    """

    allowed_hosts: tuple[str, ...] = ()  # beyond localhost names and IP addresses; "*": any
    allowed_origins: tuple[str, ...] = ()  # browser origins besides our own; "*": any
    header_timeout: float = DEFAULT_HEADER_TIMEOUT  # 0: no bound
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # 0: no bound


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
    queue: QueueConfig = QueueConfig()
    memory: MemoryConfig | None = None  # None: no memory admission (the default)
    health_check_timeout: int = DEFAULT_HEALTH_CHECK_TIMEOUT
    log_requests: bool = False
    log_level: str = "info"
    log_to_stdout: str = "proxy"
    log_history_bytes: int = DEFAULT_LOG_HISTORY_BYTES
    log_rotation: LogRotation = LogRotation()
    start_port: int = DEFAULT_START_PORT
    global_ttl: int = 0
    unload_timeout: float = DEFAULT_UNLOAD_TIMEOUT
    shutdown_timeout: float = DEFAULT_SHUTDOWN_TIMEOUT
    include_aliases_in_list: bool = False
    max_body_size: int = DEFAULT_MAX_BODY_SIZE
    api_keys: tuple[ApiKey, ...] = field(default=(), converter=_api_keys)
    security: SecurityConfig = SecurityConfig()
    preload: tuple[str, ...] = ()
    send_loading_state: bool = False
    upstream_ignore_paths: tuple[re.Pattern[str], ...] = field(
        factory=lambda: tuple(re.compile(p) for p in DEFAULT_IGNORE_PATHS)
    )
    base_dir: str = "."
    source: str = "<string>"
    warnings: tuple[str, ...] = ()


def plain_json(value: Any) -> Any:
    """A config value (read-only mappings, tuples) as plain JSON-ready dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): plain_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_json(v) for v in value]
    return value
