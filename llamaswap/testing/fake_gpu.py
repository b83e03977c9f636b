# -*- test-case-name: tests.test_fake_gpu -*-
"""
A fake GPU that tests drive without a GPU: a directory, named by the
environment variable C{LLAMASWAP_FAKE_GPU} (an absolute path), that the fake
server (C{--gpu-memory}) allocates in and the fake C{nvidia-smi}
(L{llamaswap.testing.nvidia_smi}) reads.

The directory holds:

- C{devices.json}: C{{"devices": [{"index": "0", "uuid": "GPU-fake-0",
  "name": "Fake GPU", "total_mib": 81920}, ...], "per_process": true}}.
  C{per_process: false} imitates drivers and containers where nvidia-smi
  cannot tell a process's memory (it prints C{[N/A]}).
- C{proc-<pid>.json}, one per allocating process: C{{"pid": 1234,
  "usage_mib": {"0": 12288}, "release_at": null, "started": 5678}}.
  C{release_at} (unix time) is set while the process exits: its memory stays
  used until then, even once the process is gone (a real driver frees a dead
  process's memory a moment after it exits). C{started} (optional) is the
  process's start time from C{/proc/<pid>/stat}, so that a reused pid does not
  count as the original.
- C{lock}: taken with an exclusive C{flock} around every read-modify-write.

A file counts while its pid is live (C{kill(pid, 0)} works and it is no
zombie), or while its C{release_at} is in the future; other files are
deleted. Only the standard library here: C{nvidia-smi} must start fast.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeAlias

ENV_VAR = "LLAMASWAP_FAKE_GPU"
DEVICES_FILE = "devices.json"
LOCK_FILE = "lock"
_PROC_FILE = re.compile(r"proc-(\d+)\.json")

StrPath: TypeAlias = str | os.PathLike[str]


@dataclass(frozen=True)
class Device:
    """One fake device, as C{devices.json} lists it."""

    index: str
    uuid: str
    name: str
    total_mib: int


@dataclass(frozen=True)
class Devices:
    """C{devices.json}: the devices, and whether per-process usage is known."""

    devices: tuple[Device, ...]
    per_process: bool

    def find(self, key: str) -> Device | None:
        """The device whose index or UUID is C{key}, or None."""
        for device in self.devices:
            if key in (device.index, device.uuid):
                return device
        return None


class AllocationError(Exception):
    """An allocation failed; C{str()} is the line a CUDA program would print."""


def fake_gpu_dir(environ: Mapping[str, str] | None = None) -> str | None:
    """The fake GPU directory that C{LLAMASWAP_FAKE_GPU} names, or None if unset/empty."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "")
    return value or None


# -- sizes ---------------------------------------------------------------------

_UNITS = {"": 2**20, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(?:i?b)?|(b))?\s*", re.IGNORECASE)


def parse_size_mib(text: str) -> int:
    """
    A size as people write it, in whole MiB (rounded up): C{12GiB}, C{512MiB},
    C{1.5GiB}, C{24G}, C{100M}. Units B/KiB/MiB/GiB/TiB and K/M/G/T (also KB,
    MB, ...) are all binary; a bare number is MiB.

    @raise ValueError: not a size.
    """
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a size like 12GiB or 512MiB: {text!r}")
    number, prefix, byte = match.groups()
    unit = _UNITS[(prefix or byte or "").lower()]
    return math.ceil(float(number) * unit / 2**20)


def parse_gpu_memory(spec: str, visible_devices: str | None = None) -> dict[str, int]:
    """
    What C{--gpu-memory SPEC} allocates: C{{device: mib}}.

    C{SPEC} is a size (see L{parse_size_mib}), taken on the first entry of
    C{visible_devices} (C{CUDA_VISIBLE_DEVICES}) when that is given, else on
    device C{"0"}; or C{DEV=SIZE,DEV=SIZE} for a server spread over several
    devices (C{DEV}: an index or a UUID, whatever C{CUDA_VISIBLE_DEVICES} says).
    An empty C{visible_devices} hides every device: the key is C{""}, which
    L{allocate} refuses.

    @raise ValueError: a malformed C{SPEC}.
    """
    if "=" not in spec:
        device = "0" if visible_devices is None else visible_devices.split(",")[0].strip()
        return {device: parse_size_mib(spec)}
    usage: dict[str, int] = {}
    for part in spec.split(","):
        device, sep, size = part.partition("=")
        device = device.strip()
        if not sep or not device:
            raise ValueError(f"not DEV=SIZE: {part!r}")
        if device in usage:
            raise ValueError(f"device {device} given twice")
        usage[device] = parse_size_mib(size)
    return usage


# -- files ---------------------------------------------------------------------


@contextmanager
def locked(directory: StrPath) -> Iterator[None]:
    """Hold the fake GPU's exclusive lock (C{directory/lock}, created if missing)."""
    fd = os.open(os.path.join(directory, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_json(path: str, obj: object) -> None:
    """Replace C{path} atomically (a reader never sees half a file)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_devices(
    directory: StrPath,
    devices: Mapping[str, int],
    per_process: bool = True,
    *,
    name: str = "Fake GPU",
) -> None:
    """
    Create the fake GPU in C{directory} (made if missing): one device per
    C{index: total_mib} of C{devices}, with UUID C{GPU-fake-<index>}.
    Allocations already there are kept.
    """
    os.makedirs(directory, exist_ok=True)
    listed = [
        {"index": index, "uuid": f"GPU-fake-{index}", "name": name, "total_mib": int(total)}
        for index, total in devices.items()
    ]
    with locked(directory):
        _write_json(
            os.path.join(directory, DEVICES_FILE),
            {"devices": listed, "per_process": per_process},
        )


def read_devices(directory: StrPath) -> Devices | None:
    """C{devices.json}, or None when there is none (no driver)."""
    try:
        raw = _read_json(os.path.join(directory, DEVICES_FILE))
    except FileNotFoundError:
        return None
    devices = tuple(
        Device(str(d["index"]), str(d["uuid"]), str(d["name"]), int(d["total_mib"]))
        for d in raw["devices"]
    )
    return Devices(devices, bool(raw.get("per_process", True)))


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of C{/proc/<pid>/stat} from the state on (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def start_time(pid: int) -> int | None:
    """The start time of C{pid} (clock ticks after boot), or None if unknown."""
    fields = _stat_fields(pid)
    try:
        return None if fields is None else int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_live(pid: int, started: int | None = None) -> bool:
    """
    Whether C{pid} runs: C{kill(pid, 0)} works, it is not a zombie, and (when
    C{started} is given) it is the process that started then, not a reuse.
    """
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    fields = _stat_fields(pid)
    if fields is None:
        return True  # no /proc: trust kill
    if fields and fields[0] == "Z":
        return False
    return started is None or start_time(pid) in (None, started)


class _Allocation(NamedTuple):
    path: str
    pid: int
    usage: dict[str, int]
    release_at: float | None
    live: bool


def _scan(directory: StrPath, now: float) -> list[_Allocation]:
    """
    The allocations that still count, sorted by pid; the lock is held. Files
    that no longer count are deleted (best effort); unreadable ones skipped.
    """
    found = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    for name in names:
        if _PROC_FILE.fullmatch(name) is None:
            continue
        path = os.path.join(directory, name)
        try:
            raw = _read_json(path)
            pid = int(raw["pid"])
            usage = {str(k): int(v) for k, v in raw["usage_mib"].items()}
            release_at = raw.get("release_at")
            release_at = None if release_at is None else float(release_at)
            started = raw.get("started")
            started = None if started is None else int(started)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
        live = pid_live(pid, started)
        if live or (release_at is not None and release_at > now):
            found.append(_Allocation(path, pid, usage, release_at, live))
        else:
            try:
                os.unlink(path)
            except OSError:
                pass
    found.sort(key=lambda a: a.pid)
    return found


def _sum(allocations: list[_Allocation], devices: Devices | None) -> dict[str, int]:
    used = {d.index: 0 for d in devices.devices} if devices is not None else {}
    for allocation in allocations:
        for key, mib in allocation.usage.items():
            device = devices.find(key) if devices is not None else None
            index = key if device is None else device.index
            used[index] = used.get(index, 0) + mib
    return used


class Snapshot(NamedTuple):
    """What one look at the fake GPU saw, under one lock."""

    devices: Devices | None
    used: dict[str, int]  # device index -> used MiB (every device, 0 included)
    processes: list[tuple[int, str, int]]  # (pid, device index, MiB), live pids only


def snapshot(directory: StrPath, now: float | None = None) -> Snapshot:
    """
    The devices, their usage and the live processes' usage, read together
    (nothing at all when C{directory} does not exist).
    """
    now = time.time() if now is None else now
    if not os.path.isdir(directory):
        return Snapshot(None, {}, [])
    with locked(directory):
        devices = read_devices(directory)
        allocations = _scan(directory, now)
    processes = []
    for allocation in allocations:
        if not allocation.live:
            continue
        for key, mib in allocation.usage.items():
            device = devices.find(key) if devices is not None else None
            processes.append((allocation.pid, key if device is None else device.index, mib))
    return Snapshot(devices, _sum(allocations, devices), processes)


def device_usage(directory: StrPath, now: float | None = None) -> dict[str, int]:
    """
    C{{device index: used MiB}}: the usage of live pids, plus that of exited
    ones whose C{release_at} is still after C{now} (default: the time now).
    Every device of C{devices.json} is there, unused ones with 0.
    """
    return snapshot(directory, now).used


def process_usage(directory: StrPath, now: float | None = None) -> list[tuple[int, str, int]]:
    """C{[(pid, device index, MiB)]} of the live pids, sorted by pid."""
    return snapshot(directory, now).processes


def _proc_path(directory: StrPath, pid: int) -> str:
    return os.path.join(directory, f"proc-{pid}.json")


def allocate(
    directory: StrPath, usage: Mapping[str, int], pid: int | None = None, now: float | None = None
) -> None:
    """
    Take C{usage} (C{{device index or UUID: MiB}}) for C{pid} (default: this
    process), all or nothing, and record it in C{proc-<pid>.json}. What C{pid}
    held before is replaced.

    @raise AllocationError: no C{devices.json}, an unknown device, or a device
        that would exceed its total; its text is CUDA-like
        (C{CUDA error: out of memory (device 0: need X MiB, free Y MiB)}).
    """
    pid = os.getpid() if pid is None else pid
    now = time.time() if now is None else now
    with locked(directory):
        devices = read_devices(directory)
        if devices is None:
            raise AllocationError("CUDA error: no CUDA-capable device is detected")
        resolved: dict[str, int] = {}
        for key, mib in usage.items():
            device = devices.find(key)
            if device is None:
                raise AllocationError(
                    "CUDA error: no CUDA-capable device is detected"
                    if not key
                    else f"CUDA error: invalid device ordinal (device {key})"
                )
            resolved[device.index] = resolved.get(device.index, 0) + mib
        others = [a for a in _scan(directory, now) if a.pid != pid]
        used = _sum(others, devices)
        for index, mib in resolved.items():
            device = devices.find(index)
            assert device is not None
            free = max(device.total_mib - used.get(index, 0), 0)
            if mib > free:
                raise AllocationError(
                    f"CUDA error: out of memory (device {index}: need {mib} MiB, free {free} MiB)"
                )
        record = {"pid": pid, "usage_mib": resolved, "release_at": None, "started": start_time(pid)}
        _write_json(_proc_path(directory, pid), record)


def release(
    directory: StrPath, delay: float = 0.0, pid: int | None = None, now: float | None = None
) -> None:
    """
    Give back what C{pid} (default: this process) holds: at once when C{delay}
    is 0 (its file is deleted), else C{delay} seconds after C{now} (its
    C{release_at}). Nothing happens when it holds nothing.
    """
    pid = os.getpid() if pid is None else pid
    now = time.time() if now is None else now
    path = _proc_path(directory, pid)
    with locked(directory):
        try:
            if delay <= 0:
                os.unlink(path)
                return
            record = _read_json(path)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        record["release_at"] = now + delay
        _write_json(path, record)
