# -*- test-case-name: tests.test_preflight -*-
"""
Tests for L{llamaswap.preflight}: twistd's log file, pidfile and run folder are
checked as twistd will use them, and a bad one is one line naming the option.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from llamaswap.preflight import PathError, check_twistd_paths


def twistd_options(**options: Any) -> dict[str, Any]:
    """twistd's defaults (a daemon, no log file given, no pidfile), then C{options}."""
    defaults: dict[str, Any] = {
        "nodaemon": False,
        "logfile": None,
        "syslog": False,
        "chroot": None,
        "rundir": ".",
        "pidfile": "",
    }
    return {**defaults, **options}


class TwistdPathTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.folder.mkdir(parents=True)
        self.missing = self.folder / "missing"

    def check(self, **options: Any) -> str:
        """The error line for C{options}."""
        error = self.assertRaises(PathError, check_twistd_paths, twistd_options(**options))
        return str(error)

    def test_log_folder_missing(self) -> None:
        """--logfile in a folder that does not exist names both (the old traceback)."""
        logfile = self.missing / "x.log"
        self.assertEqual(
            self.check(logfile=str(logfile)),
            f"--logfile {logfile}: folder {self.missing} does not exist (create it first)",
        )
        # The same in the foreground: twistd -n --logfile opens it just the same.
        self.assertEqual(
            self.check(logfile=str(logfile), nodaemon=True),
            f"--logfile {logfile}: folder {self.missing} does not exist (create it first)",
        )

    def test_log_file_is_a_folder(self) -> None:
        """A folder given as the log file is named as such."""
        message = self.check(logfile=str(self.folder))
        self.assertEqual(message, f"--logfile {self.folder}: is a folder, not a file")

    def test_pidfile_and_rundir(self) -> None:
        """The pidfile's folder and --rundir must exist (both used after the fork)."""
        logfile = str(self.folder / "x.log")
        pidfile = self.missing / "x.pid"
        self.assertEqual(
            self.check(logfile=logfile, pidfile=str(pidfile)),
            f"--pidfile {pidfile}: folder {self.missing} does not exist (create it first)",
        )
        self.assertEqual(
            self.check(logfile=logfile, rundir=str(self.missing)),
            f"--rundir {self.missing}: no such folder",
        )

    def test_unwritable(self) -> None:
        """A file or folder we may not write to: permission denied, and as whom."""
        locked = self.folder / "locked"
        locked.mkdir()
        (locked / "old.log").write_text("")
        # Tests may run as root, who may write anywhere: deny through os.access.
        self.patch(os, "access", lambda path, mode: not str(path).startswith(str(locked)))
        user = pwd.getpwuid(os.geteuid()).pw_name
        self.assertEqual(
            self.check(logfile=str(locked / "x.log")),
            f"--logfile {locked / 'x.log'}: permission denied ({user} cannot create files "
            f"in {locked})",
        )
        self.assertEqual(
            self.check(logfile=str(self.folder / "x.log"), pidfile=str(locked / "old.log")),
            f"--pidfile {locked / 'old.log'}: permission denied ({user} cannot write it)",
        )

    def test_good_and_unused_paths(self) -> None:
        """
        Good paths pass; paths twistd will not open are not checked: no log file
        in the foreground (stdout), syslog, and the rundir and pidfile under
        --chroot (they are inside the new root).
        """
        check_twistd_paths(
            twistd_options(logfile=str(self.folder / "x.log"), pidfile=str(self.folder / "x.pid"))
        )
        check_twistd_paths(twistd_options(nodaemon=True, pidfile=""))
        check_twistd_paths(twistd_options(nodaemon=True, logfile="-"))
        check_twistd_paths(twistd_options(syslog=True, logfile=str(self.missing / "x.log")))
        check_twistd_paths(
            twistd_options(
                logfile=str(self.folder / "x.log"),
                chroot=str(self.folder),
                rundir=str(self.missing),
                pidfile=str(self.missing / "x.pid"),
            )
        )

    def test_daemon_default_log_file(self) -> None:
        """A daemon without --logfile writes twistd.log in the launching folder: checked."""
        cwd = os.getcwd()
        self.addCleanup(os.chdir, cwd)
        os.chdir(self.folder)
        check_twistd_paths(twistd_options())
        (self.folder / "twistd.log").mkdir()
        self.assertEqual(
            self.check(), "--logfile twistd.log (a daemon's default): is a folder, not a file"
        )
