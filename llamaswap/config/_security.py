# -*- test-case-name: tests.test_security -*-
"""
Reading C{apiKeys} (plain keys, or keys with scopes) and C{security} (the
browser-origin and host allowlists, the slow-client bounds).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from llamaswap.config._readers import (
    ConfigError,
    _bool,
    _check_keys,
    _choice,
    _int,
    _mapping,
    _number,
    _str,
    _str_list,
)
from llamaswap.config.macros import _substitute_env
from llamaswap.config.schema import (
    ACCESS_LEVELS,
    DEFAULT_BODY_TIMEOUT,
    DEFAULT_HEADER_TIMEOUT,
    ApiKey,
    SecurityConfig,
)

_KEY_KEYS = ("key", "keyFile", "name", "models", "load", "access", "concurrencyLimit", "priority")
_SECURITY_KEYS = ("allowedHosts", "allowedOrigins", "headerTimeout", "bodyTimeout")
_ORIGIN = re.compile(r"https?://[^/\s]+")


def read_api_keys(value: object, environ: Mapping[str, str], base_dir: str) -> tuple[ApiKey, ...]:
    """C{apiKeys}: strings (full access) or mappings with scopes; each key once."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ConfigError("apiKeys: must be a list of strings or mappings")
    keys = []
    for i, item in enumerate(value):
        where = f"apiKeys[{i}]"
        if isinstance(item, dict):
            keys.append(_scoped_key(where, item, environ, base_dir))
        else:
            keys.append(ApiKey(key=key_text(where, _str(where, item), environ)))
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key.key in seen:
            raise ConfigError(f"apiKeys[{i}]: the same key is listed twice")
        seen.add(key.key)
    return tuple(keys)


def key_text(where: str, text: str, environ: Mapping[str, str]) -> str:
    key = _substitute_env(where, text, environ).strip()
    if not key or any(c.isspace() for c in key):
        raise ConfigError(f"{where}: must be non-empty and contain no spaces")
    return key


def _scoped_key(
    where: str, raw: dict[str, Any], environ: Mapping[str, str], base_dir: str
) -> ApiKey:
    _check_keys(where, raw, _KEY_KEYS)
    if ("key" in raw) == ("keyFile" in raw):
        raise ConfigError(f"{where}: give either key or keyFile")
    if "key" in raw:
        key = key_text(f"{where}.key", _str(f"{where}.key", raw["key"]), environ)
    else:
        path = os.path.join(base_dir, _str(f"{where}.keyFile", raw["keyFile"]))
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise ConfigError(f"{where}.keyFile: cannot read {path}: {e.strerror}") from e
        key = key_text(f"{where}.keyFile", text, {})
    models = tuple(_str_list(f"{where}.models", raw.get("models", ["*"])))
    if not models:
        raise ConfigError(f"{where}.models: list at least one model (or '*')")
    return ApiKey(
        key=key,
        name=_str(f"{where}.name", raw.get("name", "")),
        models=models,
        load=_bool(f"{where}.load", raw.get("load", True)),
        access=_choice(f"{where}.access", raw.get("access", "inference"), ACCESS_LEVELS),
        concurrency_limit=_int(
            f"{where}.concurrencyLimit", raw.get("concurrencyLimit", 0), minimum=0
        ),
        priority=_int(f"{where}.priority", raw.get("priority", 0)),
    )


def read_security(value: object) -> SecurityConfig:
    raw = _mapping("security", value)
    _check_keys("security", raw, _SECURITY_KEYS)
    hosts = tuple(
        h.strip().lower() for h in _str_list("security.allowedHosts", raw.get("allowedHosts"))
    )
    origins = tuple(
        o.strip().rstrip("/").lower()
        for o in _str_list("security.allowedOrigins", raw.get("allowedOrigins"))
    )
    for i, origin in enumerate(origins):
        if origin not in ("*", "null") and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                f"security.allowedOrigins[{i}]: an origin looks like http://host:port "
                "(or '*' for any)"
            )
    return SecurityConfig(
        allowed_hosts=hosts,
        allowed_origins=origins,
        header_timeout=_number(
            "security.headerTimeout", raw.get("headerTimeout", DEFAULT_HEADER_TIMEOUT), minimum=0
        ),
        body_timeout=_number(
            "security.bodyTimeout", raw.get("bodyTimeout", DEFAULT_BODY_TIMEOUT), minimum=0
        ),
    )
