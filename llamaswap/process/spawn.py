# -*- test-case-name: tests.test_process -*-
"""
The command lines a model runs: its server, through the exec wrapper
(L{_session}, which lies beside this module and runs as a script, never
imported: own session, parent-death signal, group guard), and
its C{cmdStop}. Programs are resolved here, so a missing one is a clear
one-line error before anything is spawned.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llamaswap.config import ModelConfig

SESSION_WRAPPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_session.py")


def resolve_executable(name: str, env: Mapping[str, str], base_dir: str) -> str:
    """
    Find the program to run: relative paths (containing C{/}) against the
    config's folder, bare names on the child's C{PATH}.

    @raise FileNotFoundError: with a one-line message.
    """
    if "/" in name:
        candidate = os.path.join(base_dir, name)
        found = shutil.which(candidate)
    else:
        found = shutil.which(name, path=env.get("PATH", os.defpath))
    if found is None:
        raise FileNotFoundError(f"command not found: {name}")
    return os.path.abspath(found)


GPU_MACRO = "${GPU}"


def model_env(
    model: ModelConfig, environ: Mapping[str, str] | None, gpu: str | None = None
) -> dict[str, str]:
    """
    Our environment (or C{environ}) plus the model's C{env}, which wins, with
    C{${GPU}} replaced by the device the start placed the model on. A placed
    model's CUDA devices are numbered as nvidia-smi numbers them
    (C{CUDA_DEVICE_ORDER=PCI_BUS_ID}, unless set), so C{${GPU}} names the
    device that was measured.
    """
    env = {**(os.environ if environ is None else environ), **model.env}
    if gpu is not None:
        env = {k: v.replace(GPU_MACRO, gpu) for k, v in env.items()}
        env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    return env


def server_command(
    model: ModelConfig, env: Mapping[str, str], base_dir: str, grace: float, gpu: str | None = None
) -> list[str]:
    """
    The wrapper's argv, which execs the model's C{cmd} (C{${GPU}} replaced by
    C{gpu}); C{grace} is how long the group guard waits between SIGTERM and
    SIGKILL once we are gone.

    @raise FileNotFoundError: if the program cannot be found.
    """
    cmd = model.cmd if gpu is None else tuple(arg.replace(GPU_MACRO, gpu) for arg in model.cmd)
    exe = resolve_executable(cmd[0], env, base_dir)
    return [sys.executable, "-I", "-S", SESSION_WRAPPER, repr(float(grace)), exe, *cmd]


def stop_command(model: ModelConfig, pid: int) -> list[str]:
    """The model's C{cmdStop} with C{${PID}} replaced by the server's pid."""
    assert model.cmd_stop is not None
    return [arg.replace("${PID}", str(pid)) for arg in model.cmd_stop]
