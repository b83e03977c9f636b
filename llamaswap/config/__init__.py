# -*- test-case-name: tests.test_config -*-
"""
The configuration: strict YAML in, frozen attrs values out.
"""

from llamaswap.config.load import (
    DEFAULT_GROUP_ID,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_SIZE,
    PROTECTED_PARAMS,
    Config,
    ConfigError,
    Filters,
    GroupConfig,
    ModelConfig,
    PeerConfig,
    PeerTarget,
    Target,
    command_text,
    load_config,
    parse_config,
    plain_json,
    split_command,
)

__all__ = [
    "DEFAULT_GROUP_ID",
    "DEFAULT_LISTEN",
    "DEFAULT_MAX_BODY_SIZE",
    "PROTECTED_PARAMS",
    "Config",
    "ConfigError",
    "Filters",
    "GroupConfig",
    "ModelConfig",
    "PeerConfig",
    "PeerTarget",
    "Target",
    "command_text",
    "load_config",
    "parse_config",
    "plain_json",
    "split_command",
]
