# -*- test-case-name: tests.test_memory -*-
"""
Readings of device memory: totals once at start-up (synchronously: they set
the budgets, and a failure is a start-up error), usage on demand (without
blocking the reactor) for the memory gate and for measuring a server.

Sources: C{nvidia-smi} (every NVIDIA GPU, and per-process figures where the
driver gives them), C{/proc/meminfo} (CPU-only machines: one device, C{ram},
and each process's resident memory).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred, succeed

from llamaswap.process.oneshot import BriefRuns

MIB = 2**20
RUN_TIMEOUT = 10.0  # seconds an nvidia-smi run may take (a hung driver must not hang a start)
_FORMAT = "--format=csv,noheader,nounits"
GPU_QUERY = "--query-gpu=index,uuid,memory.total,memory.used"
APPS_QUERY = "--query-compute-apps=pid,gpu_uuid,used_memory"


class ProbeError(Exception):
    """A reading failed; C{str()} is one line saying why."""


@frozen
class DeviceReading:
    id: str
    total: int  # bytes
    used: int  # bytes, by anything

    @property
    def free(self) -> int:
        return max(0, self.total - self.used)


@frozen
class Reading:
    """One look at the devices; C{processes} is None where per-process figures are missing."""

    devices: Mapping[str, DeviceReading]
    processes: Mapping[int, Mapping[str, int]] | None  # pid -> device -> bytes


class Probe(Protocol):
    def totals(self) -> dict[str, int]:
        """Each device's memory in bytes. @raise ProbeError: no reading."""

    def read(self, pids: Collection[int] = ()) -> Deferred[Reading]:
        """Usage now, with figures for C{pids} (for all processes, if the source can)."""

    def group(self, pgid: int) -> set[int]:
        """The processes of a server's process group, whose figures add up to its own."""

    def settled(self) -> Deferred[None]:
        """Fire once no reading is under way (a stopping proxy leaves no program behind)."""


def meminfo(text: str) -> dict[str, int]:
    """C{/proc/meminfo} in bytes."""
    values = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return values


def parse_gpus(text: str) -> dict[str, DeviceReading]:
    """C{--query-gpu=index,uuid,memory.total,memory.used}, csv without units, by index."""
    devices = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 4:
            continue
        try:
            total, used = int(float(fields[2])) * MIB, int(float(fields[3])) * MIB
        except ValueError:
            continue
        devices[fields[0]] = DeviceReading(fields[0], total, used)
    return devices


def parse_uuids(text: str) -> dict[str, str]:
    """uuid -> index, from the same query."""
    pairs = [[f.strip() for f in line.split(",")] for line in text.splitlines()]
    return {p[1]: p[0] for p in pairs if len(p) == 4}


def parse_apps(text: str, uuids: Mapping[str, str]) -> dict[int, dict[str, int]] | None:
    """C{--query-compute-apps=pid,gpu_uuid,used_memory}; None if the driver hides the figures."""
    processes: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 3 or not fields[0].isdigit():
            continue
        try:
            used = int(float(fields[2])) * MIB
        except ValueError:
            return None  # "[N/A]", "[Not Supported]"
        device = uuids.get(fields[1], fields[1])
        usage = processes.setdefault(int(fields[0]), {})
        usage[device] = usage.get(device, 0) + used
    return processes


class _ProcGroups:
    def group(self, pgid: int) -> set[int]:
        return group_pids(pgid)

    def settled(self) -> Deferred[None]:
        return succeed(None)


class NvidiaSmi(_ProcGroups):
    """Readings from C{nvidia-smi} (C{command}: its argv, without the query)."""

    def __init__(self, command: tuple[str, ...], reactor: Any) -> None:
        self._command = command
        self._runs = BriefRuns(reactor)

    def settled(self) -> Deferred[None]:
        return self._runs.settled()

    def totals(self) -> dict[str, int]:
        try:
            done = subprocess.run(
                [*self._command, GPU_QUERY, _FORMAT], capture_output=True, text=True, timeout=30
            )
        except OSError as e:
            raise ProbeError(f"cannot run {self._command[0]}: {e.strerror}") from e
        except subprocess.TimeoutExpired as e:
            raise ProbeError(f"{self._command[0]} did not answer within 30 s") from e
        devices = parse_gpus(done.stdout)
        if done.returncode != 0 or not devices:
            why = (done.stdout + done.stderr).strip().splitlines()
            raise ProbeError(
                f"{self._command[0]} failed (exit status {done.returncode}): "
                + (why[0] if why else "no GPU listed")
            )
        return {dev: reading.total for dev, reading in devices.items()}

    def read(self, pids: Collection[int] = ()) -> Deferred[Reading]:
        return Deferred.fromCoroutine(self._read())

    async def _read(self) -> Reading:
        # Two runs, so two moments: processes first. A server that allocates in between
        # is then counted twice (in the device's use, and as not yet holding what it was
        # promised): the memory gate waits a poll longer. The other order would count it
        # nowhere, and let a start run out of memory.
        apps = await self._run(APPS_QUERY)
        gpus = await self._run(GPU_QUERY)
        return Reading(parse_gpus(gpus), parse_apps(apps, parse_uuids(gpus)))

    async def _run(self, query: str) -> str:
        out = await self._runs.run([*self._command, query, _FORMAT], RUN_TIMEOUT)
        if out is None:
            raise ProbeError(f"{self._command[0]} could not start, failed or timed out")
        return out.decode(errors="replace")


class MemInfo(_ProcGroups):
    """System memory as one device, C{ram}: for models that run on the CPU."""

    DEVICE = "ram"

    def __init__(self, proc: str = "/proc") -> None:
        self._proc = proc

    def _meminfo(self) -> dict[str, int]:
        try:
            with open(os.path.join(self._proc, "meminfo")) as f:
                return meminfo(f.read())
        except OSError as e:
            raise ProbeError(f"cannot read /proc/meminfo: {e.strerror}") from e

    def totals(self) -> dict[str, int]:
        return {self.DEVICE: self._meminfo()["MemTotal"]}

    def read(self, pids: Collection[int] = ()) -> Deferred[Reading]:
        info = self._meminfo()
        total = info["MemTotal"]
        used = total - info.get("MemAvailable", info.get("MemFree", 0))
        processes = {pid: {self.DEVICE: rss} for pid in pids if (rss := self._rss(pid))}
        return succeed(Reading({self.DEVICE: DeviceReading(self.DEVICE, total, used)}, processes))

    def _rss(self, pid: int) -> int:
        try:
            with open(os.path.join(self._proc, str(pid), "status")) as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
        return 0


def group_pids(pgid: int, proc: str = "/proc") -> set[int]:
    """The processes of process group C{pgid} (a server and what it spawned)."""
    pids = {pgid}
    try:
        entries = os.listdir(proc)
    except OSError:
        return pids
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(os.path.join(proc, entry, "stat")) as f:
                stat = f.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...: comm may hold spaces and parentheses.
        fields = stat.rpartition(")")[2].split()
        if len(fields) > 2 and fields[2] == str(pgid):
            pids.add(int(entry))
    return pids
