# -*- test-case-name: tests.test_orphans -*-
"""
Exec wrapper that runs a model server in its own session, tied to our life.

Usage (internal): C{python -I -S _session.py GRACE EXE ARGV0 [ARGS...]}.

Twisted has no C{preexec_fn} hook for plain pipes, so this tiny program does,
before exec'ing the real server in place (the pid is kept, so the transport's
pid is the server's pid, and it is also the process group id):

 1. C{setsid()}: a new session and process group, so that one C{killpg}
    reaches shell wrappers and everything they spawned.
 2. C{prctl(PR_SET_PDEATHSIG, SIGTERM)}: the kernel sends SIGTERM to the
    server when llamaswap dies, even by C{kill -9} or the OOM killer. The flag
    survives C{execve} but only covers this one process.
 3. Re-check the parent: if llamaswap died before step 2, exit instead of
    starting an orphan.
 4. Fork a small I{guard} (double fork, so it is never the server's child)
    that blocks reading the stdin pipe llamaswap keeps open. Only llamaswap
    holds the write end, so end-of-file means llamaswap is gone; the guard then
    sends SIGTERM to the whole group, waits GRACE seconds and sends SIGKILL to
    the group, itself included. This covers grandchildren, which the
    parent-death signal does not (C{sh -c "server ..."}: the shell dies, the
    server would live on). The guard ignores SIGTERM so our own graceful stop
    (SIGTERM to the group) leaves it watching, and it exits as soon as the
    server has exited (pidfd), unless llamaswap is dying (L{_dying}).
    It must exit at once then: it holds the stdin pipe too, and Twisted
    reports the server ended only when every reader of that pipe is gone.

Only the standard library is used, and the file runs with C{-I -S} so it starts
fast and ignores C{PYTHON*} variables meant for the server.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import sys

PR_SET_PDEATHSIG = 1
_EXEC_FAILED = 127


def _set_parent_death_signal(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _start_time(pid: int) -> bytes | None:
    """The start time of process C{pid} (from C{/proc}), to tell it from a later one."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _dying(pid: int, started: bytes | None) -> bool:
    """
    Whether llamaswap (C{pid}, started at C{started}) is gone or exiting.

    Its main thread may have exited while other threads still hold our stdin
    pipe open (kill -9 of a process with a thread pool): then the pid is a
    zombie leader (state Z) until the last thread is gone. The parent-death
    signal fires at the main thread's exit, so the server can be gone before
    the pipe closes.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return True
    except OSError:
        return False  # no /proc: only end-of-file tells
    return fields[0] in (b"Z", b"X") or (started is not None and fields[19] != started)


def _guard(server: int, grace: float, llamaswap: int, started: bytes | None) -> None:
    """Kill the server's process group once llamaswap's end of stdin closes."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 1)  # never hold the output pipes: they delay "process ended"
    os.dup2(devnull, 2)
    os.closerange(3, 65536)
    try:
        pidfd: int | None = os.pidfd_open(server)
    except (AttributeError, OSError):
        pidfd = None
    while True:
        watched = [0] if pidfd is None else [0, pidfd]
        ready, _, _ = select.select(watched, [], [], None if pidfd is not None else 1.0)
        if 0 in ready and not os.read(0, 4096):
            break  # EOF: llamaswap died without stopping us
        gone = pidfd in ready if pidfd is not None else not _exists(server)
        if gone:
            # The server is gone. If llamaswap died too (its parent-death signal
            # may be why), act; else it lives and deals with any leftovers.
            if select.select([0], [], [], 0)[0] and not os.read(0, 4096):
                break
            if _dying(llamaswap, started):
                break
            return
    os.killpg(0, signal.SIGTERM)
    if pidfd is not None:
        select.select([pidfd], [], [], grace)
    else:
        select.select([], [], [], grace)
    os.killpg(0, signal.SIGKILL)  # the whole group, this guard included


def _start_guard(server: int, grace: float, llamaswap: int) -> None:
    started = _start_time(llamaswap)
    child = os.fork()
    if child == 0:
        try:
            if os.fork() == 0:
                try:
                    _guard(server, grace, llamaswap, started)
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.waitpid(child, 0)  # reap the intermediate at once; the guard is reparented


def main(argv: list[str]) -> None:
    if len(argv) < 4:
        sys.stderr.write("usage: _session.py GRACE EXE ARGV0 [ARGS...]\n")
        os._exit(2)
    grace = float(argv[1])
    exe, args = argv[2], argv[3:]
    parent = os.getppid()
    os.setsid()
    _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent:
        os._exit(1)  # llamaswap died before the death signal was armed
    try:
        _start_guard(os.getpid(), grace, parent)
    except OSError as e:  # no guard: the death signal still covers the server
        sys.stderr.write(f"llamaswap: cannot start the orphan guard: {e.strerror}\n")
    try:
        os.execv(exe, args)
    except OSError as e:
        sys.stderr.write(f"llamaswap: cannot execute {exe}: {e.strerror}\n")
        sys.stderr.flush()
        os._exit(_EXEC_FAILED)


if __name__ == "__main__":
    main(sys.argv)
