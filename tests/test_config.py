# -*- test-case-name: tests.test_config -*-
"""
Tests for L{llamaswap.config}: the YAML loader, its defaults, its error
messages, macros, C{${PORT}} assignment, commands, profiles and
name resolution as L{llamaswap.names.Resolver} reads the config.
"""

from __future__ import annotations

import operator
import os
import shlex
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import yaml
from twisted.trial.unittest import SynchronousTestCase

from llamaswap.config import (
    DEFAULT_GROUP_ID,
    DEFAULT_MAX_BODY_SIZE,
    Config,
    ConfigError,
    Filters,
    GroupConfig,
    LogRotation,
    ModelConfig,
    QueueConfig,
    command_text,
    load_config,
    parse_config,
    split_command,
)
from llamaswap.errors import ModelNotFound
from llamaswap.names import PeerTarget, Resolver

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "config.example.yaml"


def parse(text: str, environ: Mapping[str, str] | None = None) -> Config:
    """Parse dedented YAML with a controlled environment."""
    return parse_config(textwrap.dedent(text), environ=environ or {})


def one_model(body: str, environ: Mapping[str, str] | None = None) -> ModelConfig:
    """Parse a config with one model C{m} whose settings are C{body}."""
    text = "models:\n  m:\n" + textwrap.indent(textwrap.dedent(body), "    ")
    return parse_config(text, environ=environ or {}).models["m"]


class ErrorAssertions(SynchronousTestCase):
    def assertConfigError(
        self, text: str, message: str, environ: Mapping[str, str] | None = None
    ) -> None:
        """Parsing C{text} fails with exactly C{message}, on one line."""
        error = self.assertRaises(ConfigError, parse, text, environ)
        self.assertEqual(str(error), message)
        self.assertNotIn("\n", str(error))

    def assertModelError(
        self, body: str, message: str, environ: Mapping[str, str] | None = None
    ) -> None:
        """A config whose only model C{m} has settings C{body} fails with C{message}."""
        error = self.assertRaises(ConfigError, one_model, body, environ)
        self.assertEqual(str(error), message)
        self.assertNotIn("\n", str(error))


MINIMAL = """
    models:
      m:
        cmd: server --port 9000
        proxy: http://127.0.0.1:9000
"""


class DefaultsTests(SynchronousTestCase):
    """Every key has the documented default when left out."""

    def test_top_level_defaults(self) -> None:
        """A config with one model gets every top-level default."""
        config = parse(MINIMAL)
        self.assertEqual(config.health_check_timeout, 120)
        self.assertFalse(config.log_requests)
        self.assertEqual(config.log_level, "info")
        self.assertEqual(config.log_to_stdout, "proxy")
        self.assertEqual(config.log_history_bytes, 100 * 1024)
        self.assertEqual(config.log_rotation, LogRotation(max_bytes=10 * 2**20, keep=5))
        self.assertEqual(config.start_port, 5800)
        self.assertEqual(config.global_ttl, 0)
        self.assertEqual(config.unload_timeout, 10.0)
        self.assertFalse(config.include_aliases_in_list)
        self.assertEqual(config.max_body_size, 256 * 1024 * 1024)
        self.assertEqual(config.max_body_size, DEFAULT_MAX_BODY_SIZE)
        self.assertEqual(config.api_keys, ())
        self.assertEqual(config.preload, ())
        self.assertFalse(config.send_loading_state)
        self.assertEqual(
            [p.pattern for p in config.upstream_ignore_paths],
            [r".*\.(js|json|css|png|gif|jpg|jpeg|ico|txt)$"],
        )
        self.assertEqual(dict(config.profiles), {})
        self.assertEqual(config.warnings, ())
        self.assertEqual(config.source, "<string>")
        self.assertEqual(list(config.models), ["m"])

    def test_model_defaults(self) -> None:
        """A model with only cmd and proxy gets every per-model default."""
        model = parse(MINIMAL).models["m"]
        self.assertEqual(model.id, "m")
        self.assertEqual(model.cmd, ("server", "--port", "9000"))
        self.assertEqual(model.cmd_line, "server --port 9000")
        self.assertEqual(model.proxy, "http://127.0.0.1:9000")
        self.assertIsNone(model.cmd_stop)
        self.assertEqual(model.aliases, ())
        self.assertEqual(model.check_endpoint, "/health")
        self.assertEqual(model.ttl, 0)
        self.assertEqual(model.unload_timeout, 10.0)
        self.assertEqual(dict(model.env), {})
        self.assertFalse(model.unlisted)
        self.assertIsNone(model.use_model_name)
        self.assertEqual(model.name, "")
        self.assertEqual(model.description, "")
        self.assertEqual(dict(model.metadata), {})
        self.assertEqual(model.concurrency_limit, 0)
        self.assertIsNone(model.port)
        self.assertEqual(model.filters, Filters())
        self.assertFalse(model.filters)
        self.assertFalse(model.send_loading_state)

    def test_every_key_set(self) -> None:
        """Every key, set to a non-default value, is read into the right field."""
        config = parse(
            """
            healthCheckTimeout: 300
            logRequests: true
            logLevel: DEBUG
            logToStdout: both
            logHistoryBytes: 4096
            logRotation: {maxBytes: 2MiB, keep: 3}
            startPort: 7000
            globalTTL: 600
            unloadTimeout: 2.5
            includeAliasesInList: true
            maxBodySize: 2048
            apiKeys: [sk-one, sk-two]
            sendLoadingState: true
            upstream:
              ignorePaths: ['^/static/']
            hooks:
              on_startup:
                preload: [fast]
            macros:
              binary: /opt/llama-server
            models:
              qwen:
                cmd: ${binary} --port ${PORT}
                cmdStop: kill -INT ${PID}
                proxy: http://127.0.0.1:${PORT}/base/
                aliases: [gpt-4o, fast]
                checkEndpoint: /ready
                ttl: 30
                unloadTimeout: 4
                env: [CUDA_VISIBLE_DEVICES=0, EMPTY=]
                unlisted: true
                useModelName: qwen2.5-coder
                name: Qwen ${MODEL_ID}
                description: "  Port ${PORT}  "
                metadata: {family: qwen, ctx: 8192}
                macros: {binary: /opt/other-server}
                concurrencyLimit: 4
                sendLoadingState: false
                filters:
                  stripParams: top_k
                  setParams: {temperature: 0.2}
                  setParamsByID: {qwen-creative: {temperature: 1.1}}
            profiles:
              coding: [qwen]
            """
        )
        self.assertEqual(config.health_check_timeout, 300)
        self.assertTrue(config.log_requests)
        self.assertEqual(config.log_level, "debug")
        self.assertEqual(config.log_to_stdout, "both")
        self.assertEqual(config.log_history_bytes, 4096)
        self.assertEqual(config.log_rotation, LogRotation(max_bytes=2 * 2**20, keep=3))
        self.assertEqual(config.start_port, 7000)
        self.assertEqual(config.global_ttl, 600)
        self.assertEqual(config.unload_timeout, 2.5)
        self.assertTrue(config.include_aliases_in_list)
        self.assertEqual(config.max_body_size, 2048)
        self.assertEqual([k.key for k in config.api_keys], ["sk-one", "sk-two"])
        self.assertEqual(config.preload, ("qwen",))
        self.assertEqual(dict(config.profiles), {"coding": ("qwen",)})
        model = config.models["qwen"]
        self.assertEqual(model.cmd, ("/opt/other-server", "--port", "7000"))
        self.assertEqual(model.cmd_stop, ("kill", "-INT", "${PID}"))
        self.assertEqual(model.proxy, "http://127.0.0.1:7000/base")
        self.assertEqual(model.aliases, ("gpt-4o", "fast", "qwen-creative"))
        self.assertEqual(model.check_endpoint, "/ready")
        self.assertEqual(model.ttl, 30)
        self.assertEqual(model.unload_timeout, 4.0)
        self.assertEqual(dict(model.env), {"CUDA_VISIBLE_DEVICES": "0", "EMPTY": ""})
        self.assertTrue(model.unlisted)
        self.assertEqual(model.use_model_name, "qwen2.5-coder")
        self.assertEqual(model.name, "Qwen qwen")
        self.assertEqual(model.description, "Port 7000")
        self.assertEqual(dict(model.metadata), {"family": "qwen", "ctx": 8192})
        self.assertEqual(model.concurrency_limit, 4)
        self.assertEqual(model.port, 7000)
        self.assertTrue(config.send_loading_state)
        self.assertEqual([p.pattern for p in config.upstream_ignore_paths], ["^/static/"])
        self.assertFalse(model.send_loading_state)
        self.assertEqual(model.filters.strip_params, ("top_k",))
        self.assertEqual(dict(model.filters.set_params), {"temperature": 0.2})
        self.assertEqual(
            {k: dict(v) for k, v in model.filters.set_params_by_id.items()},
            {"qwen-creative": {"temperature": 1.1}},
        )

    def test_global_ttl_is_the_model_default(self) -> None:
        """globalTTL applies to models without ttl (or ttl -1); an explicit 0 means never."""
        config = parse(
            """
            globalTTL: 90
            models:
              a: {cmd: a --port 1, proxy: "http://h:1"}
              b: {cmd: b --port 2, proxy: "http://h:2", ttl: -1}
              c: {cmd: c --port 3, proxy: "http://h:3", ttl: 0}
              d: {cmd: d --port 4, proxy: "http://h:4", ttl: 5}
            """
        )
        self.assertEqual([m.ttl for m in config.models.values()], [90, 90, 0, 5])

    def test_unload_timeout_zero_means_default(self) -> None:
        """unloadTimeout 0 means 10 s globally, and the global value per model."""
        config = parse(
            """
            unloadTimeout: 0
            models:
              a: {cmd: a, proxy: "http://h:1"}
            """
        )
        self.assertEqual(config.unload_timeout, 10.0)
        config = parse(
            """
            unloadTimeout: 3
            models:
              a: {cmd: a, proxy: "http://h:1", unloadTimeout: 0}
              b: {cmd: b, proxy: "http://h:2", unloadTimeout: 1}
            """
        )
        self.assertEqual(config.models["a"].unload_timeout, 3.0)
        self.assertEqual(config.models["b"].unload_timeout, 1.0)

    def test_check_endpoint_none_and_empty(self) -> None:
        """checkEndpoint 'none' (any case) skips health checks; '' means /health."""
        self.assertIsNone(
            one_model("cmd: a\nproxy: http://h:1\ncheckEndpoint: none\n").check_endpoint
        )
        self.assertIsNone(
            one_model("cmd: a\nproxy: http://h:1\ncheckEndpoint: None\n").check_endpoint
        )
        self.assertEqual(
            one_model("cmd: a\nproxy: http://h:1\ncheckEndpoint: ''\n").check_endpoint, "/health"
        )

    def test_models_keep_file_order(self) -> None:
        """Config.models lists models in the order the file declares them."""
        config = parse(
            """
            models:
              zeta: {cmd: "z --port ${PORT}"}
              alpha: {cmd: "a --port ${PORT}"}
              mid: {cmd: m, proxy: "http://h:1"}
            """
        )
        self.assertEqual(list(config.models), ["zeta", "alpha", "mid"])

    def test_values_are_frozen(self) -> None:
        """Config, models and their mappings cannot be changed after loading."""
        config = parse(
            """
            models:
              m:
                cmd: a
                proxy: http://h:1
                env: [A=1]
                metadata: {nested: {list: [1, 2]}}
            """
        )
        model = config.models["m"]
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, config, "log_level", "x")
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, model, "ttl", 1)
        self.assertRaises(TypeError, operator.setitem, config.models, "x", model)
        env: Any = model.env
        self.assertRaises(TypeError, operator.setitem, env, "B", "2")
        nested: Any = model.metadata["nested"]
        self.assertRaises(TypeError, operator.setitem, nested, "x", 1)
        self.assertEqual(nested["list"], (1, 2))

    def test_load_config_records_folder_and_source(self) -> None:
        """load_config reads a file and remembers its folder (children run there)."""
        folder = Path(self.mktemp())
        folder.mkdir()
        path = folder / "config.yaml"
        path.write_text(textwrap.dedent(MINIMAL), encoding="utf-8")
        config = load_config(path)
        self.assertEqual(config.base_dir, str(folder.resolve()))
        self.assertEqual(config.source, str(path))
        self.assertEqual(config.models["m"].proxy, "http://127.0.0.1:9000")


class HealthCheckTimeoutTests(SynchronousTestCase):
    """healthCheckTimeout: default 120, values below 15 become 15 with a warning."""

    def test_low_values_are_raised_with_a_warning(self) -> None:
        """5 becomes 15 and the config carries a warning naming the key."""
        config = parse("healthCheckTimeout: 5\n" + textwrap.dedent(MINIMAL))
        self.assertEqual(config.health_check_timeout, 15)
        self.assertEqual(config.warnings, ("healthCheckTimeout: 5 is below the minimum; using 15",))

    def test_zero_is_raised(self) -> None:
        """An explicit 0 also becomes 15."""
        config = parse("healthCheckTimeout: 0\n" + textwrap.dedent(MINIMAL))
        self.assertEqual(config.health_check_timeout, 15)
        self.assertEqual(len(config.warnings), 1)

    def test_minimum_is_accepted_silently(self) -> None:
        """15 itself is fine and produces no warning."""
        config = parse("healthCheckTimeout: 15\n" + textwrap.dedent(MINIMAL))
        self.assertEqual(config.health_check_timeout, 15)
        self.assertEqual(config.warnings, ())


class ValidationTests(ErrorAssertions):
    """Each validation error names the dotted path and the reason, on one line."""

    def test_top_level_shape(self) -> None:
        """The document must be a mapping with a non-empty models mapping."""
        self.assertConfigError("", "<string>: the top level must be a mapping with a 'models' key")
        self.assertConfigError(
            "- a\n- b\n", "<string>: the top level must be a mapping with a 'models' key"
        )
        self.assertConfigError(
            "logLevel: info\n", "models: required (a mapping of model id to its settings)"
        )
        self.assertConfigError("models: {}\n", "models: define at least one model")
        self.assertConfigError("models:\n", "models: define at least one model")
        self.assertConfigError("models: [a, b]\n", "models: must be a mapping, not a list")
        self.assertConfigError(
            "models:\n  m: server\n", "models.m: must be a mapping, not a string"
        )
        self.assertConfigError(
            "models:\n  '': {cmd: a, proxy: 'http://h:1'}\n",
            "models.: model ids must be non-empty strings",
        )
        self.assertConfigError(
            "models:\n  12: {cmd: a, proxy: 'http://h:1'}\n",
            "models.12: model ids must be non-empty strings",
        )

    def test_unknown_keys_are_rejected_with_a_suggestion(self) -> None:
        """A typo fails loudly and suggests the closest real key."""
        self.assertConfigError(
            "healthCheckTimout: 30\n" + textwrap.dedent(MINIMAL),
            "healthCheckTimout: unknown key (did you mean 'healthCheckTimeout'?)",
        )
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\ntll: 60\n",
            "models.m.tll: unknown key (did you mean 'ttl'?)",
        )
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\ncheck_endpoint: /x\n",
            "models.m.check_endpoint: unknown key (did you mean 'checkEndpoint'?)",
        )
        self.assertModelError("cmd: a\nproxy: http://h:1\ngpu: 1\n", "models.m.gpu: unknown key")
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\n7: x\n", "models.m.7: keys must be strings"
        )
        self.assertConfigError(
            textwrap.dedent(MINIMAL) + "hooks:\n  on_start: {}\n",
            "hooks.on_start: unknown key (did you mean 'on_startup'?)",
        )
        self.assertConfigError(
            textwrap.dedent(MINIMAL) + "hooks:\n  on_startup:\n    preloads: [m]\n",
            "hooks.on_startup.preloads: unknown key (did you mean 'preload'?)",
        )

    def test_llama_swap_keys_we_do_not_support_are_unknown(self) -> None:
        """Modern llama-swap keys we do not implement fail instead of being ignored."""
        self.assertConfigError("routing: {}\n" + textwrap.dedent(MINIMAL), "routing: unknown key")
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\ntimeouts: {}\n", "models.m.timeouts: unknown key"
        )

    def test_duplicate_keys_are_rejected(self) -> None:
        """A key given twice in one mapping is an error naming the key and both lines."""
        self.assertConfigError(
            """
            models:
              m:
                cmd: a
                proxy: http://h:1
                ttl: 5
                ttl: 60
            """,
            "models.m.ttl: duplicate key (lines 6 and 7)",
        )
        self.assertConfigError(
            """
            models:
              m: {cmd: a, proxy: "http://h:1"}
              m: {cmd: b, proxy: "http://h:2"}
            """,
            "models.m: duplicate key (lines 3 and 4)",
        )
        self.assertConfigError(
            """
            models:
              m:
                cmd: a
                proxy: http://h:1
                metadata:
                  tags: [{x: 1, x: 2}]
            """,
            "models.m.metadata.tags[0].x: duplicate key (lines 7 and 7)",
        )

    def test_merge_keys_still_work(self) -> None:
        """YAML anchors and `<<` merges work; explicit keys override merged ones."""
        config = parse(
            """
            models:
              a: &base
                cmd: a --port ${PORT}
                ttl: 60
                checkEndpoint: /ready
              b:
                <<: *base
                cmd: b --port ${PORT}
                ttl: 5
            """
        )
        self.assertEqual(config.models["a"].ttl, 60)
        self.assertEqual(config.models["b"].ttl, 5)
        self.assertEqual(config.models["b"].check_endpoint, "/ready")
        self.assertEqual(config.models["b"].cmd, ("b", "--port", "5801"))

    def test_yaml_syntax_errors_name_the_line(self) -> None:
        """Broken YAML is reported as source:line:column and the parser's reason."""
        error = self.assertRaises(
            ConfigError, parse_config, "models:\n  m: {cmd: a\n", source="c.yaml"
        )
        self.assertTrue(str(error).startswith("c.yaml:3:1: "), str(error))
        self.assertNotIn("\n", str(error))
        error = self.assertRaises(
            ConfigError, parse_config, "models:\n  m:\n cmd: x\n   bad: [\n", source="c.yaml"
        )
        self.assertTrue(str(error).startswith("c.yaml:"), str(error))
        self.assertNotIn("\n", str(error))

    def test_unsafe_yaml_tags_are_refused(self) -> None:
        """Only safe YAML is loaded: python object tags are an error, not code."""
        error = self.assertRaises(
            ConfigError, parse_config, "models: !!python/object/apply:os.system ['true']\n"
        )
        self.assertIn("could not determine a constructor", str(error))

    def test_top_level_value_errors(self) -> None:
        """Wrong types and ranges of top-level keys name the key."""
        base = textwrap.dedent(MINIMAL)
        cases = [
            ("healthCheckTimeout: '60'", "healthCheckTimeout: must be an integer, not a string"),
            ("healthCheckTimeout: 1.5", "healthCheckTimeout: must be an integer, not a number"),
            ("logRequests: 'yes please'", "logRequests: must be true or false, not a string"),
            ("logLevel: verbose", "logLevel: must be one of debug, info, warn, error"),
            ("logLevel: 3", "logLevel: must be a string, not an integer"),
            ("logToStdout: all", "logToStdout: must be one of proxy, upstream, both, none"),
            ("logHistoryBytes: 10", "logHistoryBytes: must be >= 1024"),
            ("logRotation: 5", "logRotation: must be a mapping, not an integer"),
            ("logRotation: {keep: 0}", "logRotation.keep: must be >= 1"),
            ("logRotation: {maxBytes: 100}", "logRotation.maxBytes: must be >= 1024"),
            ("logRotation: {maxBytes: 0.5KiB}", "logRotation.maxBytes: must be >= 1024"),
            (
                "logRotation: {maxBytes: lots}",
                "logRotation.maxBytes: must be a size like 24GiB, 512MiB or 1.5G, not 'lots'",
            ),
            ("logRotation: {count: 3}", "logRotation.count: unknown key"),
            ("startPort: 0", "startPort: must be >= 1"),
            ("startPort: 70000", "startPort: must be <= 65535"),
            ("globalTTL: -1", "globalTTL: must be >= 0"),
            ("globalTTL: true", "globalTTL: must be an integer, not a boolean"),
            ("unloadTimeout: -1", "unloadTimeout: must be >= 0"),
            ("unloadTimeout: '5s'", "unloadTimeout: must be a number, not a string"),
            (
                "includeAliasesInList: 1",
                "includeAliasesInList: must be true or false, not an integer",
            ),
            ("maxBodySize: 100", "maxBodySize: must be >= 1024"),
            ("apiKeys: sk-1", "apiKeys: must be a list of strings or mappings"),
            ("apiKeys: ['']", "apiKeys[0]: must be non-empty and contain no spaces"),
            ("apiKeys: [ok, 'has space']", "apiKeys[1]: must be non-empty and contain no spaces"),
            ("apiKeys: [1]", "apiKeys[0]: must be a string, not an integer"),
            ("hooks: [a]", "hooks: must be a mapping, not a list"),
            (
                "hooks: {on_startup: {preload: [nope]}}",
                "hooks.on_startup.preload[0]: unknown model 'nope'",
            ),
            ("macros: [a]", "macros: must be a mapping, not a list"),
            ("profiles: [a]", "profiles: must be a mapping, not a list"),
            ("sendLoadingState: 1", "sendLoadingState: must be true or false, not an integer"),
            ("upstream: [a]", "upstream: must be a mapping, not a list"),
            (
                "upstream: {ignore: []}",
                "upstream.ignore: unknown key (did you mean 'ignorePaths'?)",
            ),
            (
                "upstream: {ignorePaths: '.*'}",
                "upstream.ignorePaths: must be a list of strings, not a string",
            ),
            (
                "upstream: {ignorePaths: ['ok', '(unclosed']}",
                "upstream.ignorePaths[1]: invalid regular expression: "
                "missing ), unterminated subpattern at position 0",
            ),
            (
                "healthCheckTimeout: 2024-01-01",
                "healthCheckTimeout: must be an integer, not a date",
            ),
        ]
        for line, message in cases:
            self.assertConfigError(line + "\n" + base, message)

    def test_model_value_errors(self) -> None:
        """Wrong types and ranges of per-model keys name models.<id>.<key>."""
        ok = "cmd: server\nproxy: http://h:1\n"
        cases = [
            ("proxy: http://h:1\n", "models.m.cmd: required"),
            ("cmd: ''\nproxy: http://h:1\n", "models.m.cmd: must not be empty"),
            ("cmd: '# only a comment'\nproxy: http://h:1\n", "models.m.cmd: must not be empty"),
            ("cmd: [a, b]\nproxy: http://h:1\n", "models.m.cmd: must be a string, not a list"),
            (
                "cmd: server --name 'unclosed\nproxy: http://h:1\n",
                "models.m.cmd: cannot split command: No closing quotation",
            ),
            ("cmd: server\n", "models.m.proxy: required when cmd does not use ${PORT}"),
            (
                "cmd: server\nproxy: 127.0.0.1:8080\n",
                "models.m.proxy: must be an http:// or https:// URL",
            ),
            ("cmd: server\nproxy: 8080\n", "models.m.proxy: must be a string, not an integer"),
            (ok + "cmdStop: [kill]\n", "models.m.cmdStop: must be a string, not a list"),
            (
                ok + "checkEndpoint: health\n",
                "models.m.checkEndpoint: must start with / or be 'none'",
            ),
            (ok + "checkEndpoint: null\n", "models.m.checkEndpoint: must be a string, not null"),
            (ok + "ttl: -2\n", "models.m.ttl: must be >= 0 (or -1 to use globalTTL)"),
            (ok + "ttl: 60s\n", "models.m.ttl: must be an integer, not a string"),
            (ok + "ttl: true\n", "models.m.ttl: must be an integer, not a boolean"),
            (ok + "unloadTimeout: -1\n", "models.m.unloadTimeout: must be >= 0"),
            (ok + "env: {A: 1}\n", "models.m.env: must be a list of strings, not a mapping"),
            (ok + "env: [A=1, 2]\n", "models.m.env[1]: must be a string, not an integer"),
            (ok + "env: [NOVALUE]\n", "models.m.env[0]: must look like NAME=value"),
            (ok + "env: ['1BAD=x']\n", "models.m.env[0]: must look like NAME=value"),
            (ok + "unlisted: maybe\n", "models.m.unlisted: must be true or false, not a string"),
            (ok + "aliases: gpt\n", "models.m.aliases: must be a list of strings, not a string"),
            (ok + "aliases: ['']\n", "models.m.aliases[0]: must not be empty"),
            (ok + "aliases: [a, b, a]\n", "models.m.aliases: lists the same alias twice"),
            (ok + "useModelName: 7\n", "models.m.useModelName: must be a string, not an integer"),
            (ok + "name: " + "x" * 129 + "\n", "models.m.name: at most 128 characters"),
            (ok + "description: [a]\n", "models.m.description: must be a string, not a list"),
            (ok + "metadata: [a]\n", "models.m.metadata: must be a mapping, not a list"),
            (ok + "concurrencyLimit: -1\n", "models.m.concurrencyLimit: must be >= 0"),
            (ok + "maxWait: -1\n", "models.m.maxWait: must be >= 0"),
            (ok + "minResidency: soon\n", "models.m.minResidency: must be a number, not a string"),
            (ok + "macros: [a]\n", "models.m.macros: must be a mapping, not a list"),
            (
                ok + "sendLoadingState: 'no'\n",
                "models.m.sendLoadingState: must be true or false, not a string",
            ),
        ]
        for body, message in cases:
            self.assertModelError(body, message)


class AliasTests(ErrorAssertions):
    """Aliases are unique across models and never shadow a model id."""

    def test_alias_equal_to_a_model_id(self) -> None:
        """An alias that is another model's id is rejected."""
        self.assertConfigError(
            """
            models:
              llama: {cmd: a, proxy: "http://h:1"}
              qwen: {cmd: b, proxy: "http://h:2", aliases: [fast, llama]}
            """,
            "models.qwen.aliases[1]: 'llama' is already a model id",
        )

    def test_alias_equal_to_own_id(self) -> None:
        """A model may not alias itself either."""
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\naliases: [m]\n",
            "models.m.aliases[0]: 'm' is already a model id",
        )

    def test_alias_used_by_two_models(self) -> None:
        """The second model to claim an alias is named, with the first owner."""
        self.assertConfigError(
            """
            models:
              llama: {cmd: a, proxy: "http://h:1", aliases: [gpt-4o-mini]}
              qwen: {cmd: b, proxy: "http://h:2", aliases: [gpt-4o-mini]}
            """,
            "models.qwen.aliases[0]: 'gpt-4o-mini' is already an alias of llama",
        )

    def test_find_model(self) -> None:
        """find_model accepts ids and aliases and returns None for anything else."""
        config = parse(
            """
            models:
              llama: {cmd: a, proxy: "http://h:1", aliases: [gpt-4o-mini, gpt-3.5-turbo]}
            """
        )
        llama = config.models["llama"]
        self.assertIs(Resolver(config).find_model("llama"), llama)
        self.assertIs(Resolver(config).find_model("gpt-3.5-turbo"), llama)
        self.assertIsNone(Resolver(config).find_model("gpt-4"))
        self.assertIsNone(Resolver(config).find_model("LLAMA"))


class MacroTests(ErrorAssertions):
    """${name} macros: global, per model, nested, built-in and ${env.VAR}."""

    def test_global_macro(self) -> None:
        """A global macro is substituted into every model's fields."""
        config = parse(
            """
            macros:
              server: /opt/llama/llama-server
              ctx: 8192
              flash: true
            models:
              a: {cmd: "${server} -c ${ctx} --flash ${flash}", proxy: "http://h:1"}
              b: {cmd: "${server} -m b.gguf", proxy: "http://h:2", name: "B on ${server}"}
            """
        )
        self.assertEqual(
            config.models["a"].cmd, ("/opt/llama/llama-server", "-c", "8192", "--flash", "true")
        )
        self.assertEqual(config.models["b"].cmd[0], "/opt/llama/llama-server")
        self.assertEqual(config.models["b"].name, "B on /opt/llama/llama-server")

    def test_model_macro_overrides_global(self) -> None:
        """A model's own macro wins over a global one of the same name, for that model only."""
        config = parse(
            """
            macros: {ctx: 4096}
            models:
              a: {cmd: "s -c ${ctx}", proxy: "http://h:1", macros: {ctx: 32768}}
              b: {cmd: "s -c ${ctx}", proxy: "http://h:2"}
            """
        )
        self.assertEqual(config.models["a"].cmd, ("s", "-c", "32768"))
        self.assertEqual(config.models["b"].cmd, ("s", "-c", "4096"))

    def test_macro_in_macro(self) -> None:
        """A macro may use macros declared before it, globally and per model."""
        config = parse(
            """
            macros:
              root: /opt/llama
              server: ${root}/bin/llama-server
              base: ${server} --host 127.0.0.1
            models:
              m:
                macros:
                  model: ${root}/models/m.gguf
                  full: ${base} -m ${model}
                cmd: ${full}
                proxy: http://h:1
            """
        )
        self.assertEqual(
            config.models["m"].cmd,
            (
                "/opt/llama/bin/llama-server",
                "--host",
                "127.0.0.1",
                "-m",
                "/opt/llama/models/m.gguf",
            ),
        )

    def test_forward_reference_rejected(self) -> None:
        """A macro may not use a macro declared after it."""
        self.assertConfigError(
            """
            macros:
              first: ${second} -x
              second: server
            models:
              m: {cmd: "${first}", proxy: "http://h:1"}
            """,
            "macros.first: unknown macro ${second}",
        )
        self.assertModelError(
            "cmd: ${a}\nproxy: http://h:1\nmacros:\n  a: ${b}\n  b: x\n",
            "models.m.macros.a: unknown macro ${b}",
        )

    def test_unknown_macro(self) -> None:
        """A ${name} that no macro defines is an error naming the field."""
        self.assertModelError(
            "cmd: server -m ${model}\nproxy: http://h:1\n", "models.m.cmd: unknown macro ${model}"
        )
        self.assertModelError(
            "cmd: server\nproxy: http://h:1\nname: ${nope}\n",
            "models.m.name: unknown macro ${nope}",
        )
        self.assertModelError(
            "cmd: server\nproxy: http://h:1\nmetadata: {a: [x, '${nope}']}\n",
            "models.m.metadata.a[1]: unknown macro ${nope}",
        )

    def test_reserved_names(self) -> None:
        """PORT, MODEL_ID, PID and PYTHON are provided by the loader and cannot be redefined."""
        for name in ("PORT", "MODEL_ID", "PID", "PYTHON"):
            self.assertConfigError(
                f"macros:\n  {name}: x\n" + textwrap.dedent(MINIMAL),
                f"macros.{name}: macro name {name!r} is reserved",
            )
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\nmacros: {PORT: 1}\n",
            "models.m.macros.PORT: macro name 'PORT' is reserved",
        )

    def test_macro_names_and_values(self) -> None:
        """Names use [A-Za-z0-9_-]{1,63}; values are scalars; no self-reference."""
        base = textwrap.dedent(MINIMAL)
        self.assertConfigError(
            "macros:\n  'bad name': x\n" + base,
            "macros.bad name: macro names use letters, digits, _ and - (max 63)",
        )
        self.assertConfigError(
            "macros:\n  " + "a" * 64 + ": x\n" + base,
            "macros." + "a" * 64 + ": macro names use letters, digits, _ and - (max 63)",
        )
        self.assertEqual(parse("macros:\n  " + "a" * 63 + ": x\n" + base).models["m"].id, "m")
        self.assertConfigError(
            "macros:\n  a: [1]\n" + base, "macros.a: macro values must be scalars, not a list"
        )
        self.assertConfigError(
            "macros:\n  a: {b: 1}\n" + base, "macros.a: macro values must be scalars, not a mapping"
        )
        self.assertConfigError(
            "macros:\n  a:\n" + base, "macros.a: macro values must be scalars, not null"
        )
        self.assertConfigError("macros:\n  a: x ${a}\n" + base, "macros.a: macro refers to itself")

    def test_env_macro(self) -> None:
        """${env.VAR} is replaced by the environment's value in macros and model fields."""
        config = parse(
            """
            macros:
              models_dir: ${env.MODELS}/gguf
            apiKeys: ["${env.API_KEY}"]
            models:
              m:
                cmd: server -m ${models_dir}/m.gguf --api-key ${env.API_KEY}
                proxy: http://${env.HOST}:8080
                env: ["HF_HOME=${env.HOME}/.hf"]
            """,
            environ={"MODELS": "/data", "API_KEY": "sk-123", "HOST": "10.0.0.2", "HOME": "/home/u"},
        )
        model = config.models["m"]
        self.assertEqual(model.cmd, ("server", "-m", "/data/gguf/m.gguf", "--api-key", "sk-123"))
        self.assertEqual(model.proxy, "http://10.0.0.2:8080")
        self.assertEqual(dict(model.env), {"HF_HOME": "/home/u/.hf"})
        self.assertEqual([k.key for k in config.api_keys], ["sk-123"])

    def test_env_macro_unset(self) -> None:
        """An unset ${env.VAR} is an error naming the field and the variable."""
        self.assertModelError(
            "cmd: server ${env.NOPE}\nproxy: http://h:1\n",
            "models.m.cmd: environment variable 'NOPE' is not set",
        )
        self.assertConfigError(
            "macros: {a: '${env.NOPE}'}\n" + textwrap.dedent(MINIMAL),
            "macros.a: environment variable 'NOPE' is not set",
        )
        self.assertConfigError(
            "apiKeys: ['${env.NOPE}']\n" + textwrap.dedent(MINIMAL),
            "apiKeys[0]: environment variable 'NOPE' is not set",
        )

    def test_env_macro_reads_os_environ_by_default(self) -> None:
        """Without an explicit environ, the process environment is used."""
        self.patch(os, "environ", {**os.environ, "LLAMASWAP_TEST_VAR": "from-env"})
        config = parse_config(
            "models:\n  m: {cmd: 'a ${env.LLAMASWAP_TEST_VAR}', proxy: 'http://h:1'}\n"
        )
        self.assertEqual(config.models["m"].cmd, ("a", "from-env"))

    def test_model_id_macro(self) -> None:
        """${MODEL_ID} is the model's key, also inside a macro's value."""
        config = parse(
            """
            macros:
              alias: --alias ${MODEL_ID}
            models:
              "org/qwen:7b":
                cmd: server ${alias} --log /tmp/${MODEL_ID}.log
                proxy: http://h:1
                description: "I am ${MODEL_ID}"
            """
        )
        model = config.models["org/qwen:7b"]
        self.assertEqual(
            model.cmd, ("server", "--alias", "org/qwen:7b", "--log", "/tmp/org/qwen:7b.log")
        )
        self.assertEqual(model.description, "I am org/qwen:7b")

    def test_python_macro(self) -> None:
        """${PYTHON} is the interpreter running llamaswap, usable in cmd."""
        model = one_model("cmd: ${PYTHON} -m llamaswap.fakeserver --port ${PORT} --name m\n")
        self.assertEqual(model.cmd[0], sys.executable)
        self.assertEqual(model.cmd[1:3], ("-m", "llamaswap.fakeserver"))
        self.assertTrue(model.cmd_line.startswith(shlex.quote(sys.executable) + " -m "))

    def test_metadata_keeps_macro_types(self) -> None:
        """A metadata value that is exactly ${macro} keeps the macro's type."""
        config = parse(
            """
            macros:
              ctx: 8192
              temp: 0.7
              vision: false
              family: qwen
            models:
              m:
                cmd: server --port ${PORT}
                metadata:
                  ctx: ${ctx}
                  temp: ${temp}
                  vision: ${vision}
                  family: ${family}
                  port: ${PORT}
                  id: ${MODEL_ID}
                  label: "ctx=${ctx} vision=${vision}"
                  nested:
                    list: ["${ctx}", "${family}-x", 3]
                    plain: 1.5
            """
        )
        metadata = config.models["m"].metadata
        self.assertEqual(metadata["ctx"], 8192)
        self.assertIsInstance(metadata["ctx"], int)
        self.assertEqual(metadata["temp"], 0.7)
        self.assertIs(metadata["vision"], False)
        self.assertEqual(metadata["family"], "qwen")
        self.assertEqual(metadata["port"], 5800)
        self.assertIsInstance(metadata["port"], int)
        self.assertEqual(metadata["id"], "m")
        self.assertEqual(metadata["label"], "ctx=8192 vision=false")
        self.assertEqual(metadata["nested"]["list"], (8192, "qwen-x", 3))
        self.assertEqual(metadata["nested"]["plain"], 1.5)

    def test_macros_in_comment_lines_are_ignored(self) -> None:
        """Comment lines of cmd are dropped before expansion, so their macros never fail."""
        model = one_model(
            """
            cmd: |
              server
              # --model ${undefined} --key ${env.UNSET}
              --port 9000
            proxy: http://h:9000
            """
        )
        self.assertEqual(model.cmd, ("server", "--port", "9000"))

    def test_pid_only_in_cmd_stop(self) -> None:
        """${PID} survives into cmdStop (filled at stop time) and is refused elsewhere."""
        model = one_model(
            "cmd: server\nproxy: http://h:1\nmacros: {sig: -INT}\ncmdStop: kill ${sig} ${PID}\n"
        )
        self.assertEqual(model.cmd_stop, ("kill", "-INT", "${PID}"))
        self.assertModelError(
            "cmd: server ${PID}\nproxy: http://h:1\n",
            "models.m.cmd: ${PID} is only available in cmdStop",
        )
        self.assertModelError(
            "cmd: server\nproxy: http://h:1\nname: ${PID}\n",
            "models.m.name: ${PID} is only available in cmdStop",
        )

    def test_macro_values_may_mention_late_macros(self) -> None:
        """A global macro may hold ${PORT}, ${MODEL_ID} or ${PID}; each model fills them in."""
        config = parse(
            """
            macros:
              serve: server --port ${PORT} --alias ${MODEL_ID}
              stop: kill -TERM ${PID}
            models:
              b: {cmd: "${serve} -m b.gguf", cmdStop: "${stop}"}
              a: {cmd: "${serve} -m a.gguf"}
            """
        )
        self.assertEqual(
            config.models["a"].cmd, ("server", "--port", "5800", "--alias", "a", "-m", "a.gguf")
        )
        self.assertEqual(
            config.models["b"].cmd, ("server", "--port", "5801", "--alias", "b", "-m", "b.gguf")
        )
        self.assertEqual(config.models["b"].cmd_stop, ("kill", "-TERM", "${PID}"))
        self.assertEqual(config.models["a"].proxy, "http://127.0.0.1:5800")


class PortTests(ErrorAssertions):
    """${PORT}: assigned per model whose cmd uses it, in sorted id order."""

    def test_sorted_id_order_from_start_port(self) -> None:
        """Ports follow sorted model ids, not file order, and skip models without ${PORT}."""
        config = parse(
            """
            models:
              zeta: {cmd: "z --port ${PORT}"}
              beta: {cmd: "b --port 9999", proxy: "http://127.0.0.1:9999"}
              alpha: {cmd: "a --port ${PORT}"}
              gamma: {cmd: "g --port ${PORT}"}
            """
        )
        ports = {model_id: model.port for model_id, model in config.models.items()}
        self.assertEqual(ports, {"alpha": 5800, "beta": None, "gamma": 5801, "zeta": 5802})
        self.assertEqual(config.models["zeta"].cmd, ("z", "--port", "5802"))

    def test_start_port(self) -> None:
        """startPort moves the first assigned port."""
        config = parse(
            """
            startPort: 10000
            models:
              a: {cmd: "a --port ${PORT}"}
              b: {cmd: "b --port ${PORT}"}
            """
        )
        self.assertEqual([m.port for m in config.models.values()], [10000, 10001])

    def test_proxy_defaults_to_the_port(self) -> None:
        """Without proxy, a model using ${PORT} is reached on 127.0.0.1:<port>."""
        model = one_model("cmd: server --port ${PORT}\n")
        self.assertEqual(model.proxy, "http://127.0.0.1:5800")

    def test_port_everywhere_in_the_model(self) -> None:
        """${PORT} is substituted in proxy, cmdStop, env, name, description and metadata."""
        model = one_model(
            """
            cmd: server --port ${PORT}
            proxy: http://localhost:${PORT}/
            cmdStop: stop --port ${PORT} --pid ${PID}
            env: ["PORT=${PORT}"]
            name: on ${PORT}
            description: port ${PORT}
            checkEndpoint: /health?port=${PORT}
            metadata: {port: "${PORT}"}
            """
        )
        self.assertEqual(model.proxy, "http://localhost:5800")
        self.assertEqual(model.cmd_stop, ("stop", "--port", "5800", "--pid", "${PID}"))
        self.assertEqual(dict(model.env), {"PORT": "5800"})
        self.assertEqual((model.name, model.description), ("on 5800", "port 5800"))
        self.assertEqual(model.check_endpoint, "/health?port=5800")
        self.assertEqual(model.metadata["port"], 5800)

    def test_port_without_cmd_is_an_error(self) -> None:
        """Using ${PORT} anywhere when cmd does not use it is an error naming the field."""
        cases = [
            (
                "cmd: server\nproxy: http://h:${PORT}\n",
                "models.m.proxy: uses ${PORT} but cmd does not",
            ),
            (
                "cmd: server\nproxy: http://h:1\ncmdStop: stop ${PORT}\n",
                "models.m.cmdStop: uses ${PORT} but cmd does not",
            ),
            (
                "cmd: server\nproxy: http://h:1\nenv: ['P=${PORT}']\n",
                "models.m.env[0]: uses ${PORT} but cmd does not",
            ),
            (
                "cmd: server\nproxy: http://h:1\nname: ${PORT}\n",
                "models.m.name: uses ${PORT} but cmd does not",
            ),
            (
                "cmd: server\nproxy: http://h:1\nmetadata: {p: '${PORT}'}\n",
                "models.m.metadata.p: uses ${PORT} but cmd does not",
            ),
            (
                "cmd: server\nproxy: http://h:1\nmacros: {p: '${PORT}'}\nname: ${p}\n",
                "models.m.name: uses ${PORT} but cmd does not",
            ),
        ]
        for body, message in cases:
            self.assertModelError(body, message)

    def test_port_in_a_comment_assigns_nothing(self) -> None:
        """A ${PORT} only in a comment line of cmd does not take a port."""
        model = one_model("cmd: |\n  server\n  # --port ${PORT}\nproxy: http://h:1\n")
        self.assertIsNone(model.port)

    def test_ports_run_out(self) -> None:
        """startPort near 65535 with too many models is an error, not a bad port."""
        self.assertConfigError(
            """
            startPort: 65535
            models:
              a: {cmd: "a --port ${PORT}"}
              b: {cmd: "b --port ${PORT}"}
            """,
            "models.b.cmd: no port left for ${PORT} (startPort 65535)",
        )


class CommandTests(ErrorAssertions):
    """cmd: multi-line, comments, continuations, POSIX splitting without a shell."""

    def test_folded_cmd_with_comments_and_continuations(self) -> None:
        """A folded (>) cmd may hold # comment lines and trailing backslashes."""
        model = one_model(
            """
            cmd: >
              /opt/llama-server
              # the model:
              -m /models/qwen.gguf \\
              --port ${PORT}
                # indented comment
              --ctx-size 8192   \\
              -ngl 99
            """
        )
        self.assertEqual(
            model.cmd,
            (
                "/opt/llama-server",
                "-m",
                "/models/qwen.gguf",
                "--port",
                "5800",
                "--ctx-size",
                "8192",
                "-ngl",
                "99",
            ),
        )
        self.assertEqual(
            model.cmd_line,
            "/opt/llama-server -m /models/qwen.gguf --port 5800 --ctx-size 8192 -ngl 99",
        )

    def test_literal_cmd_with_comments_and_continuations(self) -> None:
        """A literal (|) cmd is joined the same way."""
        model = one_model(
            """
            cmd: |
              # leading comment
              /opt/llama-server \\
                --port ${PORT} \\
                --model "/models/my model.gguf"

              # trailing comment
            """
        )
        self.assertEqual(
            model.cmd, ("/opt/llama-server", "--port", "5800", "--model", "/models/my model.gguf")
        )

    def test_folded_text_elsewhere_stays_folded(self) -> None:
        """Only commands read the lines; a folded description is one line as usual."""
        model = one_model(
            """
            cmd: server
            proxy: http://h:1
            description: >
              A long description
              over two lines.
            """
        )
        self.assertEqual(model.description, "A long description over two lines.")

    def test_no_shell(self) -> None:
        """Splitting follows POSIX quoting but runs no shell: pipes and $VARS stay literal."""
        model = one_model(
            """
            cmd: server a|b 'x y' "q \\"z\\"" $HOME > out.log ; echo `id` --x='1 2'
            proxy: http://h:1
            """
        )
        self.assertEqual(
            model.cmd,
            (
                "server",
                "a|b",
                "x y",
                'q "z"',
                "$HOME",
                ">",
                "out.log",
                ";",
                "echo",
                "`id`",
                "--x=1 2",
            ),
        )

    def test_cmd_stop_is_split_too(self) -> None:
        """cmdStop is split like cmd; an empty cmdStop means 'signal the process'."""
        model = one_model(
            "cmd: s\nproxy: http://h:1\ncmdStop: |\n  docker stop\n  # c\n  ${MODEL_ID}\n"
        )
        self.assertEqual(model.cmd_stop, ("docker", "stop", "m"))
        self.assertIsNone(one_model("cmd: s\nproxy: http://h:1\ncmdStop: ''\n").cmd_stop)

    def test_command_text(self) -> None:
        """command_text drops comment lines and continuations and joins lines."""
        self.assertEqual(command_text("a \\\n  b\n# c\n\n d  \\  \ne"), "a b d e")
        self.assertEqual(command_text("  single  "), "single")
        self.assertEqual(command_text("# only\n"), "")

    def test_split_command(self) -> None:
        """split_command splits like a shell and names the field when it cannot."""
        self.assertEqual(split_command("x", "a 'b c' d"), ("a", "b c", "d"))
        error = self.assertRaises(ConfigError, split_command, "models.q.cmd", 'a "b')
        self.assertEqual(str(error), "models.q.cmd: cannot split command: No closing quotation")
        error = self.assertRaises(ConfigError, split_command, "models.q.cmd", "  ")
        self.assertEqual(str(error), "models.q.cmd: must not be empty")


def resolved(config: Config, name: str) -> tuple[str, str | None, str | None]:
    """(model id, profile, upstream model) of a local name (see L{llamaswap.names})."""
    target = Resolver(config).local(name)
    return target.model_id, target.profile, target.upstream_model


def peer_of(config: Config, name: str) -> PeerTarget | None:
    """The peer model C{name} reaches, or None for a local or unknown name."""
    try:
        target = Resolver(config).resolve(name)
    except ModelNotFound as e:
        if "several peers" in e.message:
            raise
        return None
    return target if isinstance(target, PeerTarget) else None


PROFILES = """
    models:
      llama:
        cmd: llama --port ${PORT}
        aliases: [gpt-4o-mini]
      qwen:
        cmd: qwen --port ${PORT}
        aliases: [coder]
      renamed:
        cmd: r --port ${PORT}
        useModelName: upstream-name
      "qwen2.5:7b":
        cmd: q7 --port ${PORT}
      other:
        cmd: o --port ${PORT}
    profiles:
      coding: [qwen, llama, renamed]
      qwen2.5: [qwen]
"""


class FiltersTests(ErrorAssertions):
    """C{filters}: stripParams, setParams and setParamsByID (auto-aliases)."""

    def test_strip_params(self) -> None:
        """A comma list (or a YAML list), trimmed, de-duplicated and sorted; model is kept."""
        config = parse(
            """
            models:
              m:
                cmd: a
                proxy: http://h:1
                filters: {stripParams: " top_k, model ,temperature,,top_k "}
              n:
                cmd: a
                proxy: http://h:2
                filters: {stripParams: [stream, seed]}
            """
        )
        self.assertEqual(config.models["m"].filters.strip_params, ("temperature", "top_k"))
        self.assertEqual(config.models["n"].filters.strip_params, ("seed", "stream"))
        self.assertEqual(
            config.warnings, ("models.m.filters.stripParams: 'model' is never stripped; ignored",)
        )

    def test_set_params_values(self) -> None:
        """Any JSON value; macros expand as in metadata (an exact ${macro} keeps its type)."""
        model = one_model(
            """
            cmd: a --port ${PORT}
            macros: {ctx: 4096}
            filters:
              setParams:
                n_ctx: ${ctx}
                tag: ${MODEL_ID}-${PORT}
                stop: ["</s>", 2]
                chat_template_kwargs: {enable_thinking: false}
                seed: null
            """
        )
        self.assertEqual(
            {k: v for k, v in model.filters.set_params.items() if k != "stop"},
            {
                "n_ctx": 4096,
                "tag": "m-5800",
                "chat_template_kwargs": {"enable_thinking": False},
                "seed": None,
            },
        )
        self.assertEqual(model.filters.set_params["stop"], ("</s>", 2))
        self.assertTrue(model.filters)

    def test_set_params_by_id_become_aliases(self) -> None:
        """Each name (not the model's own id) is an alias, after the explicit ones."""
        config = parse(
            """
            models:
              qwen:
                cmd: a
                proxy: http://h:1
                aliases: [q, qwen-hot]
                filters:
                  setParams: {temperature: 0.7}
                  setParamsByID:
                    qwen: {temperature: 0.5}
                    qwen-hot: {temperature: 1.0}
                    ${MODEL_ID}-cold: {temperature: 0.1, top_k: 5}
            """
        )
        model = config.models["qwen"]
        self.assertEqual(model.aliases, ("q", "qwen-hot", "qwen-cold"))
        self.assertEqual(Resolver(config).local("qwen-cold").model_id, "qwen")
        self.assertEqual(model.filters.edits_for("qwen"), ((), {"temperature": 0.5}))
        self.assertEqual(
            model.filters.edits_for("qwen-cold"), ((), {"temperature": 0.1, "top_k": 5})
        )
        self.assertEqual(model.filters.edits_for("q"), ((), {"temperature": 0.7}))

    def test_alias_conflicts(self) -> None:
        """A setParamsByID name that is another model's id or alias is an error."""
        base = """
            models:
              a: {cmd: a, proxy: "http://h:1", aliases: [shared]}
              b:
                cmd: b
                proxy: http://h:2
                filters:
                  setParamsByID:
        """
        self.assertConfigError(
            base + "            a: {x: 1}\n",
            "models.b.filters.setParamsByID.a: 'a' is already a model id",
        )
        self.assertConfigError(
            base + "            shared: {x: 1}\n",
            "models.b.filters.setParamsByID.shared: 'shared' is already an alias of a",
        )

    def test_errors(self) -> None:
        """Wrong shapes, protected keys and non-JSON values name their path."""
        ok = "cmd: server\nproxy: http://h:1\n"
        cases = [
            ("filters: [a]", "models.m.filters: must be a mapping, not a list"),
            (
                "filters: {strip_params: a}",
                "models.m.filters.strip_params: unknown key (did you mean 'stripParams'?)",
            ),
            (
                "filters: {stripParams: 3}",
                "models.m.filters.stripParams: must be a string, not an integer",
            ),
            (
                "filters: {setParams: [a]}",
                "models.m.filters.setParams: must be a mapping, not a list",
            ),
            (
                "filters: {setParams: {model: x}}",
                "models.m.filters.setParams.model: 'model' cannot be set by a filter "
                "(see useModelName)",
            ),
            (
                "filters: {setParams: {1: x}}",
                "models.m.filters.setParams.1: keys must be non-empty strings",
            ),
            (
                "filters: {setParams: {when: 2024-01-01}}",
                "models.m.filters.setParams.when: not representable in JSON (a date)",
            ),
            (
                "filters: {setParams: {t: .nan}}",
                "models.m.filters.setParams.t: not representable in JSON (a number)",
            ),
            (
                "filters: {setParams: {t: '${nope}'}}",
                "models.m.filters.setParams.t: unknown macro ${nope}",
            ),
            (
                "filters: {setParamsByID: {x: {model: y}}}",
                "models.m.filters.setParamsByID.x.model: 'model' cannot be set by a filter "
                "(see useModelName)",
            ),
            (
                "filters: {setParamsByID: {x: 1}}",
                "models.m.filters.setParamsByID.x: must be a mapping, not an integer",
            ),
            (
                "filters: {setParamsByID: {'${PORT}': {}}}",
                "models.m.filters.setParamsByID.${PORT}: uses ${PORT} but cmd does not",
            ),
            (
                "filters: {setParamsByID: {'${MODEL_ID}': {a: 1}, m: {a: 2}}}",
                "models.m.filters.setParamsByID.m: the name 'm' is listed twice",
            ),
        ]
        for body, message in cases:
            self.assertModelError(ok + body + "\n", message)


class SendLoadingStateTests(SynchronousTestCase):
    def test_model_overrides_global(self) -> None:
        """Each model takes the global sendLoadingState unless it sets its own."""
        config = parse(
            """
            sendLoadingState: true
            models:
              a: {cmd: a, proxy: "http://h:1"}
              b: {cmd: b, proxy: "http://h:2", sendLoadingState: false}
            """
        )
        self.assertEqual([m.send_loading_state for m in config.models.values()], [True, False])
        self.assertTrue(
            one_model("cmd: a\nproxy: http://h:1\nsendLoadingState: true\n").send_loading_state
        )

    def test_ignore_paths_may_be_empty(self) -> None:
        """C{upstream.ignorePaths: []} turns the check off."""
        config = parse("upstream: {ignorePaths: []}\n" + textwrap.dedent(MINIMAL))
        self.assertEqual(config.upstream_ignore_paths, ())


class ReuseConnectionsTests(ErrorAssertions):
    """C{reuseConnections}: on by default for models and peers, off on request."""

    def test_defaults(self) -> None:
        config = parse(
            """
            models:
              m: {cmd: m, proxy: "http://127.0.0.1:1"}
              k: {cmd: k, proxy: "http://127.0.0.1:2", reuseConnections: false}
            peers:
              p: {proxy: "http://10.0.0.5:8080", models: [a]}
              q: {proxy: "http://10.0.0.6:8080", models: [b], reuseConnections: false}
            """
        )
        self.assertTrue(config.models["m"].reuse_connections)
        self.assertFalse(config.models["k"].reuse_connections)
        self.assertTrue(config.peers["p"].reuse_connections)
        self.assertFalse(config.peers["q"].reuse_connections)

    def test_must_be_a_boolean(self) -> None:
        self.assertModelError(
            "cmd: a\nproxy: http://h:1\nreuseConnections: 'yes'\n",
            "models.m.reuseConnections: must be true or false, not a string",
        )


class ProfileTests(ErrorAssertions):
    """Seed-style profiles, and profile:model names resolved (L{llamaswap.names})."""

    def setUp(self) -> None:
        self.config = parse(PROFILES)

    def test_profiles_are_read(self) -> None:
        """profiles map a name to a tuple of model ids in file order."""
        self.assertEqual(
            dict(self.config.profiles),
            {"coding": ("qwen", "llama", "renamed"), "qwen2.5": ("qwen",)},
        )

    def test_resolve_id(self) -> None:
        """A model id resolves to itself; the upstream keeps the body's model."""
        self.assertEqual(resolved(self.config, "llama"), ("llama", None, None))

    def test_resolve_alias(self) -> None:
        """An alias resolves to its model; the body's model is forwarded unchanged."""
        self.assertEqual(resolved(self.config, "gpt-4o-mini"), ("llama", None, None))

    def test_resolve_use_model_name(self) -> None:
        """useModelName is the name the upstream sees."""
        self.assertEqual(
            resolved(self.config, "renamed"),
            ("renamed", None, "upstream-name"),
        )

    def test_resolve_profile_member(self) -> None:
        """profile:model resolves to the member; the upstream sees the part after ':'."""
        self.assertEqual(
            resolved(self.config, "coding:qwen"),
            ("qwen", "coding", "qwen"),
        )
        self.assertEqual(
            resolved(self.config, "coding:coder"),
            ("qwen", "coding", "coder"),
        )
        self.assertEqual(
            resolved(self.config, "coding:renamed"),
            ("renamed", "coding", "upstream-name"),
        )

    def test_ids_with_colons_resolve_as_ids_first(self) -> None:
        """qwen2.5:7b is a model id, even though a profile named qwen2.5 exists."""
        self.assertEqual(resolved(self.config, "qwen2.5:7b"), ("qwen2.5:7b", None, None))
        self.assertEqual(resolved(self.config, "qwen2.5:qwen")[1], "qwen2.5")

    def test_unknown_names(self) -> None:
        """Unknown models, profiles and non-members are ModelNotFound (404)."""
        cases = {
            "gpt-5": "model not found: gpt-5",
            ":qwen": "model not found: :qwen",
            "nope:qwen": "profile not found: nope",
            "coding:other": "model other is not part of profile coding",
            "coding:missing": "model missing is not part of profile coding",
            "coding:": "model  is not part of profile coding",
        }
        for name, message in cases.items():
            error = self.assertRaises(ModelNotFound, Resolver(self.config).local, name)
            self.assertEqual(error.status, 404)
            self.assertEqual(error.message, message)

    def test_profile_validation(self) -> None:
        """Profile members must be model ids; names may not contain ':'."""
        models = "models:\n  a: {cmd: a, proxy: 'http://h:1', aliases: [al]}\n  b: {cmd: b, proxy: 'http://h:2'}\n"
        cases = [
            ("profiles:\n  p: [a, nope]\n", "profiles.p[1]: unknown model 'nope'"),
            (
                "profiles:\n  p: [al]\n",
                "profiles.p[0]: unknown model 'al' ('al' is an alias of 'a'; list model ids)",
            ),
            ("profiles:\n  p: {a: 1}\n", "profiles.p: must be a list of model ids"),
            ("profiles:\n  p: a\n", "profiles.p: must be a list of strings, not a string"),
            ("profiles:\n  p: [a, b, a]\n", "profiles.p: lists the same model twice"),
            (
                "profiles:\n  'p:q': [a]\n",
                "profiles.p:q: profile names must be non-empty and contain no ':'",
            ),
        ]
        for text, message in cases:
            self.assertConfigError(models + text, message)

    def test_preload_resolves_aliases(self) -> None:
        """hooks.on_startup.preload accepts ids and aliases and stores ids."""
        config = parse(
            textwrap.dedent(PROFILES) + "hooks:\n  on_startup:\n    preload: [coder, llama]\n"
        )
        self.assertEqual(config.preload, ("qwen", "llama"))


GROUPS = """
    models:
      a: {cmd: a, proxy: "http://h:1", aliases: [al]}
      b: {cmd: b, proxy: "http://h:2"}
      c: {cmd: c, proxy: "http://h:3"}
      d: {cmd: d, proxy: "http://h:4"}
    groups:
      duo:
        swap: false
        members: [a, b]
      keep:
        exclusive: false
        persistent: true
        members: [c]
"""


class GroupTests(ErrorAssertions):
    """groups: swap, exclusive, persistent, members; the implicit default group."""

    def test_groups_are_read_with_defaults(self) -> None:
        """Each group keeps its members in order; unset flags are swap/exclusive, not persistent."""
        config = parse(GROUPS + "      solo:\n        members: []\n")
        self.assertEqual(
            dict(config.groups),
            {
                "duo": GroupConfig(id="duo", members=("a", "b"), swap=False),
                "keep": GroupConfig(id="keep", members=("c",), exclusive=False, persistent=True),
                "solo": GroupConfig(id="solo", members=()),
            },
        )
        self.assertEqual(config.warnings, ("groups.solo.members: the group has no members",))

    def test_group_of(self) -> None:
        """Members get their group; the others share the implicit default group."""
        config = parse(GROUPS)
        self.assertEqual(Resolver(config).group_of("a").id, "duo")
        self.assertEqual(Resolver(config).group_of("c").id, "keep")
        self.assertEqual(
            Resolver(config).group_of("d"), GroupConfig(id=DEFAULT_GROUP_ID, members=("d",))
        )

    def test_no_groups(self) -> None:
        """Without groups, every model is in the default group (one at a time)."""
        config = parse(MINIMAL)
        self.assertEqual(dict(config.groups), {})
        self.assertEqual(
            Resolver(config).group_of("m"), GroupConfig(id=DEFAULT_GROUP_ID, members=("m",))
        )

    def test_group_validation(self) -> None:
        """Errors name the dotted path: unknown models, aliases, a model in two groups..."""
        models = textwrap.dedent(GROUPS).split("groups:")[0]
        cases = [
            ("groups: [a]\n", "groups: must be a mapping, not a list"),
            ("groups:\n  g: [a]\n", "groups.g: must be a mapping, not a list"),
            ("groups:\n  g: {}\n", "groups.g.members: required (a list of model ids)"),
            (
                "groups:\n  g: {members: a}\n",
                "groups.g.members: must be a list of strings, not a string",
            ),
            ("groups:\n  g: {members: [a, nope]}\n", "groups.g.members[1]: unknown model 'nope'"),
            (
                "groups:\n  g: {members: [al]}\n",
                "groups.g.members[0]: unknown model 'al' ('al' is an alias of 'a'; list model ids)",
            ),
            ("groups:\n  g: {members: [a, b, a]}\n", "groups.g.members[2]: 'a' is listed twice"),
            (
                "groups:\n  g: {members: [a]}\n  h: {members: [b, a]}\n",
                "groups.h.members[1]: 'a' is already a member of group 'g' "
                "(a model belongs to one group at most)",
            ),
            (
                "groups:\n  g: {members: [a], swap: 'no'}\n",
                "groups.g.swap: must be true or false, not a string",
            ),
            (
                "groups:\n  g: {members: [a], exclusive: 1}\n",
                "groups.g.exclusive: must be true or false, not an integer",
            ),
            (
                "groups:\n  g: {members: [a], persistent: ~}\n",
                "groups.g.persistent: must be true or false, not null",
            ),
            (
                "groups:\n  g: {members: [a], swapp: true}\n",
                "groups.g.swapp: unknown key (did you mean 'swap'?)",
            ),
            (
                "groups:\n  '(default)': {members: [a]}\n",
                "groups.(default): the name is reserved for the models in no group",
            ),
            ("groups:\n  '': {members: [a]}\n", "groups.: group names must be non-empty strings"),
        ]
        for text, message in cases:
            self.assertConfigError(models + text, message)

    def test_groups_and_profiles_coexist(self) -> None:
        """Groups and seed profiles may be used together (see docs/swapping.md)."""
        config = parse(GROUPS + "    profiles:\n      p: [a, d]\n")
        self.assertEqual(config.profiles["p"], ("a", "d"))
        self.assertEqual(Resolver(config).group_of("a").id, "duo")


MATRIX_MODELS = """
    models:
      a: {cmd: a, proxy: "http://h:1", aliases: [al]}
      b: {cmd: b, proxy: "http://h:2"}
      "org/c:7b": {cmd: c, proxy: "http://h:3"}
"""


class MatrixConfigTests(ErrorAssertions):
    """matrix: vars, evict_costs and sets, read into a Matrix (item 87)."""

    def test_matrix_is_read(self) -> None:
        """Sets are expanded; a var gives ids the expression language cannot spell."""
        config = parse(
            MATRIX_MODELS
            + """
    matrix:
      vars: {c: "org/c:7b"}
      evict_costs: {c: 4}
      sets:
        both: "a & b"
        big: "(a | b) & c"
    """
        )
        matrix = config.matrix
        assert matrix is not None
        self.assertEqual(
            [(c.set, sorted(c.models)) for c in matrix.combinations],
            [("both", ["a", "b"]), ("big", ["a", "org/c:7b"]), ("big", ["b", "org/c:7b"])],
        )
        self.assertEqual(dict(matrix.evict_costs), {"org/c:7b": 4})
        self.assertEqual(dict(config.groups), {})

    def test_no_matrix(self) -> None:
        """Without the key (or with an empty value) there is no matrix."""
        self.assertIsNone(parse(MINIMAL).matrix)
        self.assertIsNone(parse(MINIMAL + "    matrix:\n").matrix)

    def test_errors_name_the_path(self) -> None:
        """Validation errors come out as config errors with dotted paths."""
        cases = [
            ("matrix: {}\n", "matrix.sets: required (a mapping of set name to expression)"),
            ("matrix:\n  sets:\n    s: a & x\n", "matrix.sets.s: unknown model 'x'"),
            (
                "matrix:\n  sets:\n    s: al\n",
                "matrix.sets.s: unknown model 'al' "
                "('al' is an alias of 'a'; use model ids or vars)",
            ),
            ("matrix:\n  sets:\n    s: +t\n", "matrix.sets.s: undefined set '+t'"),
            (
                "matrix:\n  sets:\n    s: +t\n    t: +s\n",
                "matrix.sets.s: sets reference each other (s -> t -> s)",
            ),
            ("matrix:\n  sets:\n    s: ''\n", "matrix.sets.s: empty expression"),
            (
                "matrix:\n  sets: {s: a}\n  evict_costs: {b: -1}\n",
                "matrix.evict_costs.b: must be a positive integer",
            ),
            (
                "matrix:\n  sets: {s: a}\n  var: {}\n",
                "matrix.var: unknown key (did you mean 'vars'?)",
            ),
        ]
        models = textwrap.dedent(MATRIX_MODELS)
        for text, message in cases:
            self.assertConfigError(models + text, message)

    def test_groups_and_matrix_are_exclusive(self) -> None:
        """groups and matrix are two answers to one question: only one may be given."""
        self.assertConfigError(
            textwrap.dedent(MATRIX_MODELS)
            + "groups:\n  g: {members: [a]}\nmatrix:\n  sets: {s: a}\n",
            "matrix: cannot be used together with groups (choose one)",
        )


# The example config of the seed README (llama-swap v80), as its users wrote it:
# fixed ports in cmd and an explicit proxy per model, folded multi-line cmds,
# env lists, checkEndpoint none, unlisted test models and a `profiles` list.
SEED_README_EXAMPLE = """\
# Seconds to wait for llama.cpp to load and be ready to serve requests
# Default (and minimum) is 15 seconds
healthCheckTimeout: 60

# Write HTTP logs (useful for troubleshooting), defaults to false
logRequests: true

# define valid model values and the upstream server start
models:
  "llama":
    cmd: llama-server --port 8999 -m Llama-3.2-1B-Instruct-Q4_K_M.gguf

    # where to reach the server started by cmd, make sure the ports match
    proxy: http://127.0.0.1:8999

    # aliases names to use this model for
    aliases:
    - "gpt-4o-mini"
    - "gpt-3.5-turbo"

    # check this path for an HTTP 200 OK before serving requests
    # default: /health to match llama.cpp
    # use "none" to skip endpoint checking, but may cause HTTP errors
    # until the model is ready
    checkEndpoint: /custom-endpoint

    # automatically unload the model after this many seconds
    # ttl values must be a value greater than 0
    # default: 0 = never unload model
    ttl: 60

  "qwen":
    # environment variables to pass to the command
    env:
      - "CUDA_VISIBLE_DEVICES=0"

    # multiline for readability
    cmd: >
      llama-server --port 8999
      --model path/to/Qwen2.5-1.5B-Instruct-Q4_K_M.gguf
    proxy: http://127.0.0.1:8999

  # Embedding example with Nomic
  # https://huggingface.co/nomic-ai/nomic-embed-text-v1.5-GGUF
  "nomic":
    proxy: http://127.0.0.1:9005
    cmd: >
      models/llama-server-osx --port 9005
      -m models/nomic-embed-text-v1.5.Q8_0.gguf
      --ctx-size 8192
      --batch-size 8192
      --rope-scaling yarn
      --rope-freq-scale 0.75
      -ngl 99
      --embeddings

  # Reranking example with bge-reranker
  # https://huggingface.co/gpustack/bge-reranker-v2-m3-GGUF
  "bge-reranker":
    proxy: http://127.0.0.1:9006
    cmd: >
      models/llama-server-osx --port 9006
      -m models/bge-reranker-v2-m3-Q4_K_M.gguf
      --ctx-size 8192
      --reranking

  "simple":
    # example of setting environment variables
    env:
      - CUDA_VISIBLE_DEVICES=0,1
      - env1=hello
    cmd: build/simple-responder --port 8999
    proxy: http://127.0.0.1:8999

    # use "none" to skip check. Caution this may cause some requests to fail
    # until the upstream server is ready for traffic
    checkEndpoint: none

    # hide this model from /v1/models
    unlisted: true

  # don't use this, just for testing if things are broken
  "broken":
    cmd: models/llama-server-osx --port 8999 -m models/doesnotexist.gguf
    proxy: http://127.0.0.1:8999
    unlisted: true

# profiles make it easy to managing multi model (and gpu) configurations.
#
# Tips:
#  - each model must be listening on a unique address and port
#  - the model name is in this format: "profile_name:model", like "coding:qwen"
#  - the profile will load and unload all models in the profile at the same time
profiles:
  coding:
    - "qwen"
    - "llama"
"""


class SeedExampleTests(SynchronousTestCase):
    """The seed README's example config loads as written."""

    def setUp(self) -> None:
        path = Path(self.mktemp())
        path.write_text(SEED_README_EXAMPLE, encoding="utf-8")
        self.config = load_config(path, environ={})

    def test_top_level(self) -> None:
        """healthCheckTimeout, logRequests and the model list are read."""
        self.assertEqual(self.config.health_check_timeout, 60)
        self.assertTrue(self.config.log_requests)
        self.assertEqual(
            list(self.config.models), ["llama", "qwen", "nomic", "bge-reranker", "simple", "broken"]
        )
        self.assertEqual(self.config.warnings, ())

    def test_llama(self) -> None:
        """Explicit proxy, aliases, custom checkEndpoint and ttl."""
        llama = self.config.models["llama"]
        self.assertEqual(
            llama.cmd, ("llama-server", "--port", "8999", "-m", "Llama-3.2-1B-Instruct-Q4_K_M.gguf")
        )
        self.assertEqual(llama.proxy, "http://127.0.0.1:8999")
        self.assertEqual(llama.aliases, ("gpt-4o-mini", "gpt-3.5-turbo"))
        self.assertEqual(llama.check_endpoint, "/custom-endpoint")
        self.assertEqual(llama.ttl, 60)
        self.assertIsNone(llama.port)

    def test_folded_commands(self) -> None:
        """The folded multi-line commands split into the expected argv."""
        self.assertEqual(
            self.config.models["qwen"].cmd,
            (
                "llama-server",
                "--port",
                "8999",
                "--model",
                "path/to/Qwen2.5-1.5B-Instruct-Q4_K_M.gguf",
            ),
        )
        self.assertEqual(dict(self.config.models["qwen"].env), {"CUDA_VISIBLE_DEVICES": "0"})
        self.assertEqual(self.config.models["nomic"].cmd[-1], "--embeddings")
        self.assertEqual(len(self.config.models["nomic"].cmd), 16)
        self.assertEqual(self.config.models["bge-reranker"].cmd[-1], "--reranking")
        self.assertEqual(self.config.models["bge-reranker"].proxy, "http://127.0.0.1:9006")

    def test_simple_and_broken(self) -> None:
        """env list, checkEndpoint none and unlisted."""
        simple = self.config.models["simple"]
        self.assertEqual(dict(simple.env), {"CUDA_VISIBLE_DEVICES": "0,1", "env1": "hello"})
        self.assertIsNone(simple.check_endpoint)
        self.assertTrue(simple.unlisted)
        self.assertTrue(self.config.models["broken"].unlisted)
        self.assertFalse(self.config.models["qwen"].unlisted)

    def test_profiles(self) -> None:
        """profiles.coding lists qwen and llama; coding:qwen resolves."""
        self.assertEqual(dict(self.config.profiles), {"coding": ("qwen", "llama")})
        self.assertEqual(
            resolved(self.config, "coding:qwen"),
            ("qwen", "coding", "qwen"),
        )
        self.assertEqual(resolved(self.config, "gpt-3.5-turbo")[0], "llama")


class QueueConfigTests(SynchronousTestCase):
    """The queue section and the models' scheduler keys."""

    MODELS = (
        "models:\n"
        "  a: {cmd: x, proxy: 'http://h:1'}\n"
        "  b: {cmd: x, proxy: 'http://h:2', maxWait: 5}\n"
    )

    def test_defaults(self) -> None:
        config = parse_config(self.MODELS)
        self.assertEqual(
            config.queue,
            QueueConfig(max_wait=60, min_residency=10, timeout=600, max_length=512),
        )
        self.assertEqual((config.models["a"].max_wait, config.models["a"].min_residency), (60, 10))

    def test_models_inherit_the_queue_settings(self) -> None:
        config = parse_config("queue: {maxWait: 20, minResidency: 2.5}\n" + self.MODELS)
        self.assertEqual((config.models["a"].max_wait, config.models["b"].max_wait), (20, 5))
        self.assertEqual(config.models["b"].min_residency, 2.5)

    def test_errors(self) -> None:
        cases = [
            ("queue: 5\n", "queue: must be a mapping, not an integer"),
            ("queue: {maxwait: 5}\n", "queue.maxwait: unknown key (did you mean 'maxWait'?)"),
            ("queue: {maxWait: -1}\n", "queue.maxWait: must be >= 0"),
            ("queue: {timeout: forever}\n", "queue.timeout: must be a number, not a string"),
            ("queue: {maxLength: 0}\n", "queue.maxLength: must be >= 1"),
            ("queue: {concurrencyLimit: 1.5}\n", "queue.concurrencyLimit: must be an integer"),
        ]
        for top, message in cases:
            with self.assertRaises(ConfigError) as caught:
                parse_config(top + self.MODELS)
            self.assertIn(message, str(caught.exception))


class ExampleConfigTests(SynchronousTestCase):
    """config.example.yaml documents every option and runs out of the box."""

    def setUp(self) -> None:
        self.config = load_config(EXAMPLE)
        self.raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))

    def demo_models(self) -> list[ModelConfig]:
        """Models that run our fake server with this interpreter."""
        return [
            model
            for model in self.config.models.values()
            if model.cmd[0] == sys.executable and "llamaswap.fakeserver" in model.cmd
        ]

    def test_has_two_runnable_demo_models(self) -> None:
        """At least two listed demo models run the fake server on their own ${PORT}."""
        demos = self.demo_models()
        self.assertGreaterEqual(len(demos), 2)
        for model in demos:
            self.assertTrue(os.access(model.cmd[0], os.X_OK))
            self.assertFalse(model.unlisted)
            self.assertIsNotNone(model.port)
            argv = list(model.cmd)
            self.assertEqual(argv[argv.index("--port") + 1], str(model.port))
            self.assertEqual(argv[argv.index("--name") + 1], model.id)
            self.assertEqual(model.proxy, f"http://127.0.0.1:{model.port}")
        self.assertEqual(len({m.port for m in demos}), len(demos))

    def test_every_model_can_start_here(self) -> None:
        """Every active model is a demo (real llama-server entries are commented out)."""
        self.assertEqual(len(self.demo_models()), len(self.config.models))

    def test_documents_every_key(self) -> None:
        """Every top-level key and every per-model key appears in the example."""
        from llamaswap.config import _models, load

        self.assertEqual(set(self.raw), set(load._TOP_KEYS))
        used = set().union(*(spec.keys() for spec in self.raw["models"].values()))
        self.assertEqual(used, set(_models._MODEL_KEYS))
        self.assertIn("preload", self.raw["hooks"]["on_startup"])

    def test_profile_of_demo_models(self) -> None:
        """The example has a profile that groups demo models."""
        self.assertTrue(self.config.profiles)
        for members in self.config.profiles.values():
            for member in members:
                self.assertIn(member, self.config.models)

    def test_no_auth_and_local_only(self) -> None:
        """Out of the box no API key is required (the README's curl works as is)."""
        self.assertEqual(self.config.api_keys, ())
        self.assertEqual(self.config.warnings, ())


PEERS = """
    models:
      local:
        cmd: server --port 9000
        proxy: http://127.0.0.1:9000
        aliases: [shared-alias]
      shared:
        cmd: server --port 9001
        proxy: http://127.0.0.1:9001
    peers:
      gpu:
        proxy: http://10.0.0.5:8080/
        models: [qwen, shared, both, "org/model"]
        apiKey: ${env.GPU_KEY}
        filters:
          stripParams: top_k
          setParams: {temperature: 0.5}
      cpu:
        proxy: https://cpu.example
        models: [both, small]
"""


class PeerTests(ErrorAssertions):
    """C{peers}: validation with dotted paths, and how names resolve to peers."""

    def setUp(self) -> None:
        self.config = parse(PEERS, {"GPU_KEY": "sk-gpu"})

    def test_read(self) -> None:
        """URL without trailing slash, models in order, key from the environment, filters."""
        gpu = self.config.peers["gpu"]
        self.assertEqual(gpu.proxy, "http://10.0.0.5:8080")
        self.assertEqual(gpu.models, ("qwen", "shared", "both", "org/model"))
        self.assertEqual(gpu.api_key, "sk-gpu")
        self.assertEqual(gpu.filters.strip_params, ("top_k",))
        self.assertEqual(dict(gpu.filters.set_params), {"temperature": 0.5})
        self.assertIsNone(self.config.peers["cpu"].api_key)

    def test_resolution_order(self) -> None:
        """Qualified names, unique bare names; local ids and aliases win; ambiguity is a 404."""

        def found(name: str) -> tuple[str, str] | None:
            target = peer_of(self.config, name)
            return None if target is None else (target.fqn, target.model)

        self.assertEqual(found("gpu/qwen"), ("gpu/qwen", "qwen"))
        self.assertEqual(found("qwen"), ("gpu/qwen", "qwen"))
        self.assertEqual(found("gpu/org/model"), ("gpu/org/model", "org/model"))
        self.assertEqual(found("org/model"), ("gpu/org/model", "org/model"))
        self.assertEqual(found("cpu/both"), ("cpu/both", "both"))
        self.assertEqual(found("gpu/shared"), ("gpu/shared", "shared"))
        self.assertIsNone(found("shared"))  # the local model
        self.assertIsNone(found("local"))
        self.assertIsNone(found("gpu/unknown"))
        self.assertIsNone(found("nothing"))
        error = self.assertRaises(ModelNotFound, peer_of, self.config, "both")
        self.assertEqual(
            error.message, "model both is served by several peers; ask for gpu/both, cpu/both"
        )
        # Peers are not local models: the supervisor's resolve knows nothing of them.
        self.assertRaises(ModelNotFound, Resolver(self.config).local, "gpu/qwen")

    def test_profile_reading_before_bare_peer_names(self) -> None:
        """C{profile:model} is read before a bare peer name that looks like it."""
        config = parse(
            """
            models:
              a: {cmd: s, proxy: "http://127.0.0.1:1"}
            profiles:
              p: [a]
            peers:
              far: {proxy: "http://far", models: ["p:a", "x:y"]}
            """
        )
        self.assertIsNone(peer_of(config, "p:a"))
        self.assertEqual(resolved(config, "p:a")[0], "a")
        target = peer_of(config, "x:y")
        assert target is not None
        self.assertEqual(target.fqn, "far/x:y")

    def test_collisions(self) -> None:
        """A qualified peer name may not be a model id or an alias."""
        local = """
            models:
              gpu/qwen: {cmd: s, proxy: "http://127.0.0.1:1"}
              other: {cmd: s, proxy: "http://127.0.0.1:2", aliases: [gpu/llama]}
            peers:
              gpu: {proxy: "http://gpu", models: [%s]}
        """
        self.assertConfigError(
            local % "qwen", "peers.gpu.models[0]: 'gpu/qwen' is already a model id"
        )
        self.assertConfigError(
            local % "mistral, llama",
            "peers.gpu.models[1]: 'gpu/llama' is already an alias of other",
        )

    def test_errors(self) -> None:
        """Every field is checked, and each error names its dotted path."""

        def check(peer: str, message: str) -> None:
            text = textwrap.dedent(MINIMAL) + "peers:\n  " + peer + "\n"
            self.assertConfigError(text, "peers." + message)

        ok = "proxy: 'http://x', models: [a]"
        check("p: {models: [a]}", "p.proxy: required (the peer's base URL)")
        check("p: {proxy: 'ftp://x', models: [a]}", "p.proxy: must be an http:// or https:// URL")
        check("p: {proxy: 'http://x'}", "p.models: required (the names the peer serves)")
        check("p: {proxy: 'http://x', models: []}", "p.models: list at least one model")
        check(
            "p: {proxy: 'http://x', models: a}", "p.models: must be a list of strings, not a string"
        )
        check("p: {proxy: 'http://x', models: [a, '']}", "p.models[1]: must not be empty")
        check("p: {proxy: 'http://x', models: [a, a]}", "p.models: lists the same model twice")
        check(f"a/b: {{{ok}}}", "a/b: peer ids must be non-empty strings without '/'")
        check(f"p: {{{ok}, apiKey: 'a b'}}", "p.apiKey: must be non-empty and contain no spaces")
        check(
            f"p: {{{ok}, apiKey: '${{env.NOPE}}'}}",
            "p.apiKey: environment variable 'NOPE' is not set",
        )
        check(f"p: {{{ok}, timeouts: {{}}}}", "p.timeouts: unknown key")
        check(
            f"p: {{{ok}, filters: {{setParamsByID: {{}}}}}}",
            "p.filters.setParamsByID: not available for peers",
        )
        check(
            f"p: {{{ok}, filters: {{setParams: {{model: x}}}}}}",
            "p.filters.setParams.model: 'model' cannot be set by a filter (see useModelName)",
        )
        check("p: [a]", "p: must be a mapping, not a list")

    def test_preload_skips_peer_models(self) -> None:
        """A peer's model in preload is skipped with a warning (nothing to start)."""
        config = parse(
            PEERS + "    hooks: {on_startup: {preload: [gpu/qwen, small, local]}}\n",
            {"GPU_KEY": "k"},
        )
        self.assertEqual(config.preload, ("local",))
        self.assertEqual(
            config.warnings,
            (
                "hooks.on_startup.preload[0]: 'gpu/qwen' is a peer's model; skipped",
                "hooks.on_startup.preload[1]: 'small' is a peer's model; skipped",
            ),
        )
