# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{llamaswap.tap} options, the C{twistd llamaswap} command line and
the C{llamaswap} console script: every start-up error (a bad config, a taken
port, a bad C{--listen}, a log folder that does not exist) is one line,
reported before daemonizing, with exit status 1 and no pidfile.
"""

from __future__ import annotations

import errno
import re
import signal
import socket
import sys
from pathlib import Path

from twisted.application.service import IServiceMaker
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import CannotListenError
from twisted.internet.utils import getProcessOutputAndValue
from twisted.plugin import getPlugins
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

import llamaswap
from llamaswap.config import DEFAULT_LISTEN, Config
from llamaswap.listen import ListenError
from llamaswap.tap import ConfigUsageError, Options
from tests.proctools import TWISTD, ChildOutput, send_signal, twistd_env

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
NO_CONFIG = (
    "llamaswap: --config is required, e.g. --config config.example.yaml (--help lists the options)"
)


def in_use(port: int) -> str:
    """What a taken port on 127.0.0.1 says."""
    return (
        f"llamaswap: cannot listen on 127.0.0.1:{port}: address already in use (is another "
        "llamaswap running? choose another port with --listen tcp:PORT:interface=127.0.0.1)"
    )


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
        """Without --config, parsing fails with one line saying so, and how."""
        error = self.assertRaises(ConfigUsageError, Options().parseOptions, [])
        self.assertEqual(error.code, NO_CONFIG)

    def test_config_is_parsed_in_post_options(self) -> None:
        """A good config is loaded while options are parsed, before any service exists."""
        options = Options()
        options.parseOptions(["--config", str(write(self.folder, "c.yaml", GOOD))])
        parsed = options["parsed"]
        self.assertIsInstance(parsed, Config)
        self.assertEqual(parsed.models["qwen"].port, 5800)
        self.assertEqual(options["listen"], DEFAULT_LISTEN)
        self.assertEqual(options["endpoint"], DEFAULT_LISTEN)
        self.assertEqual(DEFAULT_LISTEN, "tcp:8080:interface=127.0.0.1")

    def test_short_options_and_listen(self) -> None:
        """-c and -l are short forms; --listen takes a Twisted endpoint string."""
        options = Options()
        path = write(self.folder, "c.yaml", GOOD)
        options.parseOptions(["-c", str(path), "-l", "tcp:0:interface=127.0.0.1"])
        self.assertEqual(options["listen"], "tcp:0:interface=127.0.0.1")
        self.assertEqual(options["endpoint"], "tcp:0:interface=127.0.0.1")
        self.assertEqual(options["config"], str(path))

    def test_llama_swap_listen_forms(self) -> None:
        """
        llama-swap's --listen forms become the endpoint they mean (:8080 is
        every interface, as there); forms that mean nothing get the one to use.
        """
        path = str(write(self.folder, "c.yaml", GOOD))
        cases = {
            ":8080": "tcp:8080:interface=0.0.0.0",
            "localhost:80": "tcp:80:interface=localhost",
        }
        for given, endpoint in cases.items():
            options = Options()
            options.parseOptions(["--config", path, "--listen", given])
            self.assertEqual((options["listen"], options["endpoint"]), (given, endpoint))
        error = self.assertRaises(
            ConfigUsageError, Options().parseOptions, ["--config", path, "--listen", "8080"]
        )
        self.assertEqual(
            error.code,
            "llamaswap: --listen 8080: a port alone is ambiguous: use "
            "tcp:8080:interface=127.0.0.1 (this host only) or :8080 (all interfaces)",
        )

    def test_bad_endpoint_is_one_line(self) -> None:
        """An endpoint string Twisted cannot parse: its reason, then the forms expected."""
        from llamaswap.tap import makeService

        options = Options()
        options.parseOptions(["--config", str(write(self.folder, "c.yaml", GOOD)), "-l", "tcp:x"])
        error = self.assertRaises(ConfigUsageError, makeService, options)
        self.assertEqual(
            error.code,
            "llamaswap: --listen tcp:x: invalid literal for int() with base 10: 'x' (expected a "
            "Twisted endpoint such as tcp:8080:interface=127.0.0.1, or host:port as in llama-swap)",
        )

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


class _TakenEndpoint:
    """An endpoint whose port was taken after makeService checked it."""

    def listen(self, factory: object) -> Deferred[object]:
        error = OSError(errno.EADDRINUSE, "Address already in use")
        return fail(CannotListenError("127.0.0.1", 8080, error))


class HTTPServiceTests(SynchronousTestCase):
    def test_port_taken_after_the_check(self) -> None:
        """
        A port lost between makeService's check and the bind (after a daemon's
        fork) raises a line short enough for twistd's 100-byte report.
        """
        from llamaswap.tap import HTTPService

        service = HTTPService(_TakenEndpoint(), Site(Resource()))  # type: ignore[arg-type]
        error = self.assertRaises(ListenError, service.privilegedStartService)
        self.assertEqual(str(error), "cannot listen on 127.0.0.1:8080: address already in use")
        self.assertIsNone(service.port)


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
        """Forgetting --config says so, and how, in one line, and exits 1."""
        code, lines, _ = await self.run_python(
            *TWISTD[1:], "-n", "--pidfile", str(self.pidfile), "llamaswap"
        )
        self.assertEqual(code, 1)
        self.assertEqual(lines, [NO_CONFIG])
        self.assertFalse(self.pidfile.exists())

    def taken_port(self) -> int:
        """A port of 127.0.0.1 that something else listens on, for this test."""
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port: int = taken.getsockname()[1]
        return port

    async def test_port_in_use(self) -> None:
        """
        A taken port is one line naming the address and what to do, untruncated,
        in the foreground, as a daemon and from the console script, in
        llama-swap's form too; exit 1, and no pidfile or log file is left.
        """
        good = write(self.folder, "good.yaml", GOOD)
        port = self.taken_port()
        logfile = self.folder / "x.log"
        listen = ["--listen", f"tcp:{port}:interface=127.0.0.1"]
        runs = {
            "twistd -n": [*TWISTD[1:], "-n", "--pidfile", str(self.pidfile)],
            "daemon": [*TWISTD[1:], "--pidfile", str(self.pidfile), "--logfile", str(logfile)],
        }
        for name, twistd in runs.items():
            code, lines, _ = await self.run_python(
                *twistd, "llamaswap", "--config", str(good), *listen
            )
            self.assertEqual((code, lines), (1, [in_use(port)]), name)
        for form in (listen, ["--listen", f"127.0.0.1:{port}"]):
            code, lines, _ = await self.run_python(
                "-m", "llamaswap.cli", "--config", str(good), *form
            )
            self.assertEqual((code, lines), (1, [in_use(port)]), form)
        self.assertFalse(self.pidfile.exists())
        self.assertFalse(logfile.exists())
        self.assertFalse((self.folder / "twistd.pid").exists())

    async def test_log_folder_missing(self) -> None:
        """
        --logfile in a folder that does not exist (a traceback from twistd
        itself before) is one line, in the foreground and as a daemon.
        """
        good = write(self.folder, "good.yaml", GOOD)
        logfile = self.folder / "missing" / "x.log"
        line = (
            f"llamaswap: --logfile {logfile}: folder {logfile.parent} does not exist "
            "(create it first)"
        )
        for mode in (["-n"], []):
            code, lines, _ = await self.run_python(
                *TWISTD[1:], *mode, "--pidfile", str(self.pidfile), "--logfile", str(logfile),
                "llamaswap", "--config", str(good), "--listen", "tcp:0:interface=127.0.0.1",
            )  # fmt: skip
            self.assertEqual((code, lines), (1, [line]), mode)
        self.assertFalse(self.pidfile.exists())

    async def test_unreadable_config(self) -> None:
        """A config that cannot be read is one line naming the file and why."""
        missing = self.folder / "nope.yaml"
        code, lines, _ = await self.run_python("-m", "llamaswap.cli", "--config", str(missing))
        self.assertEqual(
            (code, lines), (1, [f"llamaswap: {missing}: cannot read: No such file or directory"])
        )
        code, lines, _ = await self.run_python("-m", "llamaswap.cli", "--config", str(self.folder))
        self.assertEqual(
            (code, lines), (1, [f"llamaswap: {self.folder}: cannot read: Is a directory"])
        )

    async def test_console_script_usage(self) -> None:
        """
        With no arguments the console script shows its own usage (not twistd's)
        on stderr and exits 2; with --help on stdout, exit 0.
        """
        code, lines, err = await self.run_python("-m", "llamaswap.cli")
        self.assertEqual(code, 2)
        self.assertEqual(lines[0], "Usage: llamaswap --config PATH [--listen ENDPOINT]")
        self.assertEqual(err.splitlines(), lines)
        self.assertNotIn("twistd [options]", "\n".join(lines))
        self.assertRegex("\n".join(lines), r"-c, --config= +Path to the YAML configuration")
        code, help_lines, err = await self.run_python("-m", "llamaswap.cli", "--help")
        self.assertEqual((code, help_lines, err), (0, lines, ""))

    async def test_console_script_says_where_it_listens(self) -> None:
        """
        llamaswap --listen 127.0.0.1:0 (llama-swap's form) logs what it made of
        it, then the proxy's and the UI's URLs; it leaves no twistd.pid.
        """
        good = write(self.folder, "good.yaml", GOOD)
        proto = ChildOutput()
        argv = [sys.executable, "-m", "llamaswap.cli", "--config", str(good), "-l", "127.0.0.1:0"]
        reactor.spawnProcess(proto, argv[0], argv, env=twistd_env(), path=str(self.folder))
        self.addCleanup(lambda: proto.done or send_signal(proto.pid, signal.SIGKILL))
        await proto.wait_for(b"/ui/)\n").addTimeout(30, reactor)
        send_signal(proto.pid, signal.SIGTERM)
        await proto.ended()
        text = proto.text()
        self.assertIn("--listen 127.0.0.1:0 is tcp:0:interface=127.0.0.1\n", text)
        self.assertRegex(
            text,
            r"llamaswap listening on http://127\.0\.0\.1:(\d+) "
            r"\(UI: http://127\.0\.0\.1:\1/ui/\)\n",
        )
        self.assertFalse((self.folder / "twistd.pid").exists())


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

    def test_documented_twistd_commands_set_the_pidfile(self) -> None:
        """
        Every twistd command line in the README, docs and contrib that starts
        llamaswap passes --pidfile (empty, or a path): twistd's default
        twistd.pid would refuse a second llamaswap started in the same folder.
        """
        command = re.compile(r"twistd\b[^`\n]*?\bllamaswap\b[^`\n]*--config")
        sources = [SOURCE_ROOT / "README.md", SOURCE_ROOT / "Makefile"]
        sources += sorted((SOURCE_ROOT / "docs").glob("*.md"))
        sources += sorted((SOURCE_ROOT / "contrib").rglob("*.*"))
        found = []
        for source in sources:
            text = source.read_text(encoding="utf-8")
            # A command continued on the next line with a backslash is one command.
            for line in text.replace("\\\n", " ").splitlines():
                for match in command.finditer(line):
                    found.append((source.name, match.group(0)))
        self.assertGreater(len(found), 5)
        self.assertEqual([f for f in found if "--pidfile" not in f[1]], [])


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
