# -*- test-case-name: tests.test_preflight -*-
"""
twistd's own paths, checked before twistd uses them.

twistd runs our C{makeService} first, then opens its C{--logfile}, changes to
C{--rundir}, forks into a daemon and writes its C{--pidfile}. A log folder that
does not exist is a traceback from the first step; a pidfile that cannot be
written, a report cut at 100 bytes from the daemon. L{check_twistd_paths}, called
from C{makeService}, finds those first and says which option and what to do in
one line.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from typing import Any


class PathError(Exception):
    """A twistd path option that cannot work; C{str()} is one line for the user."""


def check_twistd_paths(options: Mapping[str, Any]) -> None:
    """
    Check twistd's C{options} (its L{ServerOptions}) the way twistd will use them.

    @raise PathError: the log file or pidfile cannot be created or written, or
        the run folder does not exist.
    """
    nodaemon = bool(options.get("nodaemon")) or bool(options.get("debug"))
    logfile = options.get("logfile")
    if not options.get("syslog") and logfile != "-":
        if logfile:
            _check_writable("--logfile", str(logfile))
        elif not nodaemon:
            # A daemon with no --logfile logs to twistd.log where it was started.
            _check_writable("--logfile", "twistd.log", " (a daemon's default)")
    if options.get("chroot"):
        return  # the rundir and pidfile are inside the new root: not ours to judge
    rundir = options.get("rundir")
    if rundir and not os.path.isdir(rundir):
        raise PathError(f"--rundir {rundir}: no such folder")
    pidfile = options.get("pidfile")
    if pidfile:
        _check_writable("--pidfile", str(pidfile))


def _check_writable(option: str, path: str, note: str = "") -> None:
    """C{path} can be opened for writing, or created in an existing, writable folder."""
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    given = f"{option} {path}{note}"
    if os.path.isdir(full):
        raise PathError(f"{given}: is a folder, not a file")
    if not os.path.isdir(folder):
        raise PathError(f"{given}: folder {folder} does not exist (create it first)")
    if os.path.exists(full):
        if not os.access(full, os.W_OK):
            raise PathError(f"{given}: permission denied ({_user()} cannot write it)")
    elif not os.access(folder, os.W_OK | os.X_OK):
        raise PathError(f"{given}: permission denied ({_user()} cannot create files in {folder})")


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"
