# -*- test-case-name: tests.test_config -*-
"""
The configuration: strict YAML in, frozen attrs values out.

Loading rejects what a user would want to hear about (duplicate keys, unknown
keys with a suggestion, wrong types, unknown macros), and every error names the
dotted path of the offending key, e.g. C{models.qwen.ttl: must be >= 0}.

    - L{schema}: the frozen values (L{Config}, L{ModelConfig}...), defaults, constants
    - L{load}: L{load_config} and L{parse_config}, one reader per top-level key
    - L{macros}: C{macros}, C{${...}} and C{${env.NAME}} expansion, commands
    - L{matrix}: llama-swap's C{matrix} language and its solver
    - C{_yaml}, C{_readers}: strict YAML, and typed readers with dotted-path errors

The rest of llamaswap imports from this package, not from its modules.
"""

from llamaswap.config._readers import ConfigError
from llamaswap.config.load import load_config, parse_config
from llamaswap.config.macros import command_text, split_command
from llamaswap.config.schema import (
    DEFAULT_GROUP_ID,
    DEFAULT_LISTEN,
    DEFAULT_MAX_BODY_SIZE,
    PROTECTED_PARAMS,
    Config,
    Filters,
    GroupConfig,
    LogRotation,
    MemoryConfig,
    ModelConfig,
    PeerConfig,
    QueueConfig,
    plain_json,
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
    "LogRotation",
    "MemoryConfig",
    "ModelConfig",
    "PeerConfig",
    "QueueConfig",
    "command_text",
    "load_config",
    "parse_config",
    "plain_json",
    "split_command",
]
