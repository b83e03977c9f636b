# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{llamaswap.tap} options and the C{twistd llamaswap} command line:
config errors are one line naming the key, reported before daemonizing.
"""

from __future__ import annotations

import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.python.usage import UsageError
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

import llamaswap
from llamaswap.config import DEFAULT_LISTEN, Config
from llamaswap.tap import ConfigUsageError, Options
from tests.proctools import TWISTD, twistd_env

SOURCE_ROOT = Path(llamaswap.__file__).resolve().parent.parent
EXAMPLE = SOURCE_ROOT / "config.example.yaml"

GOOD = """\
models:
  qwen:
    cmd: server --port ${PORT}
"""
BAD = """\
models:
  qwen:
    cmd: server --port ${PORT}
    ttl: -5
"""
BAD_MESSAGE = "models.qwen.ttl: must be >= 0 (or -1 to use globalTTL)"


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


class OptionsTests(SynchronousTestCase):
    """C{twistd llamaswap} options: --config (required, parsed early) and --listen."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())

    def test_config_is_required(self) -> None:
        """Without --config, parsing fails with a usage error saying so."""
        error = self.assertRaises(UsageError, Options().parseOptions, [])
        self.assertEqual(str(error), "--config is required")

    def test_config_is_parsed_in_post_options(self) -> None:
        """A good config is loaded while options are parsed, before any service exists."""
        options = Options()
        options.parseOptions(["--config", str(write(self.folder, "c.yaml", GOOD))])
        parsed = options["parsed"]
        self.assertIsInstance(parsed, Config)
        self.assertEqual(parsed.models["qwen"].port, 5800)
        self.assertEqual(options["listen"], DEFAULT_LISTEN)
        self.assertEqual(DEFAULT_LISTEN, "tcp:8080:interface=127.0.0.1")

    def test_short_options_and_listen(self) -> None:
        """-c and -l are short forms; --listen takes a Twisted endpoint string."""
        options = Options()
        path = write(self.folder, "c.yaml", GOOD)
        options.parseOptions(["-c", str(path), "-l", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(options["listen"], "tcp:0:interface=127.0.0.1")
        self.assertEqual(options["config"], str(path))

    def test_bad_config_is_one_usage_line(self) -> None:
        """An invalid value stops option parsing with one line naming the key."""
        options = Options()
        path = write(self.folder, "bad.yaml", BAD)
        error = self.assertRaises(ConfigUsageError, options.parseOptions, ["--config", str(path)])
        self.assertEqual(error.message, BAD_MESSAGE)
        self.assertEqual(error.code, f"llamaswap: {BAD_MESSAGE}")

    def test_other_config_errors(self) -> None:
        """Unreadable files, broken YAML and unknown keys are one-line usage errors too."""
        missing = self.folder / "missing.yaml"
        cases = {
            str(missing): f"{missing}: cannot read: No such file or directory",
            str(write(self.folder, "syntax.yaml", "models:\n  m: {cmd: a\n")): "syntax.yaml:3:1",
            str(
                write(self.folder, "typo.yaml", GOOD + "    tll: 5\n")
            ): "models.qwen.tll: unknown key (did you mean 'ttl'?)",
        }
        for path, expected in cases.items():
            error = self.assertRaises(ConfigUsageError, Options().parseOptions, ["--config", path])
            self.assertIn(expected, error.message)
            self.assertNotIn("\n", error.message)

    def test_memory_budget_errors_are_one_usage_line(self) -> None:
        """What only start-up can check (nvidia-smi's budgets) is a one-line error too."""
        from llamaswap.tap import makeService

        cases = {
            "nvidiaSmi: /nonexistent/nvidia-smi": "memory: cannot run /nonexistent/nvidia-smi: "
            "No such file or directory (declare memory.devices, or use source: meminfo or "
            "source: none)",
            "nvidiaSmi: 'false'": "memory: false failed (exit status 1): no GPU listed",
        }
        for memory, expected in cases.items():
            path = write(self.folder, "memory.yaml", f"memory: {{{memory}}}\n" + GOOD)
            options = Options()
            options.parseOptions(["--config", str(path)])
            error = self.assertRaises(ConfigUsageError, makeService, options)
            self.assertTrue(error.message.startswith(expected), error.message)

    def test_example_config(self) -> None:
        """The shipped config.example.yaml passes option parsing."""
        options = Options()
        options.parseOptions(["--config", str(EXAMPLE)])
        self.assertGreaterEqual(len(options["parsed"].models), 2)

    def test_plugin_is_discoverable(self) -> None:
        """twistd finds an IServiceMaker called llamaswap that uses these options."""
        import twisted.plugins

        makers = {maker.tapname: maker for maker in getPlugins(IServiceMaker, twisted.plugins)}
        self.assertIn("llamaswap", makers)
        maker = makers["llamaswap"]
        self.assertIs(maker.options, Options)
        self.assertTrue(maker.description)


class CommandLineTests(TestCase):
    """A broken config stops C{twistd llamaswap} with one line, before it daemonizes."""

    timeout = 60

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.bad = write(self.folder, "bad.yaml", BAD)
        self.pidfile = self.folder / "x.pid"

    async def run_python(self, *args: str) -> tuple[int, list[str], str]:
        """Run this interpreter with C{args} in the temp folder: (status, lines, stderr)."""
        out, err, code = await getProcessOutputAndValue(
            sys.executable, args, env=twistd_env(), path=str(self.folder)
        )
        text = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
        return code, text.splitlines(), err.decode("utf-8", "replace")

    def assertOneErrorLine(self, lines: list[str]) -> None:
        """The whole output is one line naming the bad key (no usage block, no traceback)."""
        self.assertEqual(lines, [f"llamaswap: {BAD_MESSAGE}"])

    async def test_nodaemon(self) -> None:
        """C{twistd -n --pidfile x.pid llamaswap --config bad.yaml}: exit 1, no pidfile."""
        code, lines, _ = await self.run_python(
            *TWISTD[1:], "-n", "--pidfile", str(self.pidfile),
            "llamaswap", "--config", str(self.bad),
        )  # fmt: skip
        self.assertEqual(code, 1)
        self.assertOneErrorLine(lines)
        self.assertFalse(self.pidfile.exists())

    async def test_daemon(self) -> None:
        """Without -n the error still reaches the terminal and nothing is daemonized."""
        logfile = self.folder / "x.log"
        code, lines, _ = await self.run_python(
            *TWISTD[1:], "--pidfile", str(self.pidfile), "--logfile", str(logfile),
            "llamaswap", "--config", str(self.bad),
        )  # fmt: skip
        self.assertEqual(code, 1)
        self.assertOneErrorLine(lines)
        self.assertFalse(self.pidfile.exists())
        self.assertFalse(logfile.exists())
        self.assertFalse((self.folder / "twistd.pid").exists())

    async def test_console_script(self) -> None:
        """The llamaswap console script (twistd -n for the rest of us) reports it the same way."""
        code, lines, _ = await self.run_python("-m", "llamaswap.cli", "--config", str(self.bad))
        self.assertEqual(code, 1)
        self.assertOneErrorLine(lines)
        self.assertFalse((self.folder / "twistd.pid").exists())

    async def test_missing_config_option(self) -> None:
        """Forgetting --config says so and exits 1."""
        code, lines, _ = await self.run_python(
            *TWISTD[1:], "-n", "--pidfile", str(self.pidfile), "llamaswap"
        )
        self.assertEqual(code, 1)
        self.assertEqual(lines[-1], "twistd -n: --config is required")
        self.assertFalse(self.pidfile.exists())


class ReadmeSnippetTests(SynchronousTestCase):
    """The README's first two commands are the Makefile targets that exist."""

    def test_readme_starts_with_make_run_and_make_test(self) -> None:
        """README.md's first code block is exactly `make run` and `make test`."""
        readme = (SOURCE_ROOT / "README.md").read_text(encoding="utf-8")
        block = readme.split("```", 2)[1]
        commands = [line for line in block.splitlines()[1:] if line.strip()]
        self.assertEqual(commands, ["make run", "make test"])
        makefile = (SOURCE_ROOT / "Makefile").read_text(encoding="utf-8")
        self.assertIn("\nrun:", makefile)
        self.assertIn("\ntest:", makefile)
        self.assertIn("config.example.yaml", makefile)


class PackagingTests(SynchronousTestCase):
    """pyproject.toml ships every package and UI file, without setuptools warnings."""

    def setUp(self) -> None:
        import tomllib

        self.pyproject = tomllib.loads((SOURCE_ROOT / "pyproject.toml").read_text("utf-8"))
        self.setuptools = self.pyproject["tool"]["setuptools"]

    def test_every_package_is_shipped(self) -> None:
        """
        Package discovery finds every folder of llamaswap with modules (an
        explicit list once left out llamaswap.memory, so a regular install
        could not start), the UI's folder, and the twistd plugin; not twisted
        itself, nor the tests.
        """
        try:
            from setuptools import find_namespace_packages
        except ImportError:  # venvs of Python >= 3.12 have no setuptools
            raise SkipTest("setuptools is not installed here") from None
        find = self.setuptools["packages"]["find"]
        self.assertTrue(find["namespaces"])
        found = set(find_namespace_packages(where=str(SOURCE_ROOT), include=find["include"]))
        package = SOURCE_ROOT / "llamaswap"
        expected = {"llamaswap.ui", "twisted.plugins"} | {
            ".".join(init.parent.relative_to(SOURCE_ROOT).parts)
            for init in package.rglob("__init__.py")
        }
        self.assertIn("llamaswap.memory", expected)
        self.assertEqual(found, expected)

    def test_ui_files_are_package_data(self) -> None:
        """Every file of the UI matches the package data patterns."""
        patterns = self.setuptools["package-data"]["llamaswap.ui"]
        files = sorted(p.name for p in (SOURCE_ROOT / "llamaswap" / "ui").iterdir())
        self.assertEqual(files, ["app.js", "index.html", "style.css"])
        for name in files:
            self.assertTrue(any(Path(name).match(pattern) for pattern in patterns), name)

    def test_no_deprecated_metadata(self) -> None:
        """
        The license is an SPDX expression (the table form warns on every
        install), and the editable install needs no deprecated compat mode:
        package-dir makes it a plain path entry that twistd's plugin search sees.
        """
        self.assertEqual(self.pyproject["project"]["license"], "MIT")
        self.assertEqual(self.setuptools["package-dir"], {"": "."})
        makefile = (SOURCE_ROOT / "Makefile").read_text(encoding="utf-8")
        self.assertNotIn("editable_mode", makefile)
        self.assertIn("pip -qq", makefile)
