# -*- test-case-name: tests.test_fake_gpu -*-
"""
A fake C{nvidia-smi} over the fake GPU of L{llamaswap.testing.fake_gpu}
(the directory C{LLAMASWAP_FAKE_GPU} names):
C{python -m llamaswap.testing.nvidia_smi [args]}.

It answers the queries a memory-aware proxy makes, printing what the real tool
prints::

    --query-gpu=index,uuid,name,memory.total,memory.used,memory.free
    --query-compute-apps=pid,gpu_uuid,used_memory[,process_name]
    --format=csv[,noheader][,nounits]      -i/--id <index|uuid>[,...]      -L

Fields may come in any subset and order (also C{gpu_uuid}, C{gpu_name} and
C{count} for GPUs, C{used_gpu_memory} and C{name} for apps). Values are
comma+space separated, one row per line, sizes in MiB (with a C{ MiB} suffix
unless C{nounits}); no compute app prints nothing under C{noheader}.
C{used_memory} is C{[N/A]} when C{devices.json} says C{per_process: false}.
Without C{LLAMASWAP_FAKE_GPU} or its C{devices.json}, it prints the real tool's
"couldn't communicate with the NVIDIA driver" and exits 9; an unknown field
exits 2, an unknown C{-i} 6. Only the standard library: it must start fast.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import IO

from llamaswap.testing import fake_gpu

NO_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
EXIT_INVALID_ARGUMENT = 2
EXIT_NOT_FOUND = 6
EXIT_NO_DRIVER = 9

_GPU_FIELDS = {
    "index": "index",
    "uuid": "uuid",
    "gpu_uuid": "uuid",
    "name": "name",
    "gpu_name": "name",
    "count": "count",
    "memory.total": "memory.total",
    "memory.used": "memory.used",
    "memory.free": "memory.free",
}
_APP_FIELDS = {
    "pid": "pid",
    "process_name": "process_name",
    "name": "process_name",
    "gpu_uuid": "gpu_uuid",
    "gpu_name": "gpu_name",
    "used_memory": "used_memory",
    "used_gpu_memory": "used_memory",
}
_APP_HEADERS = {"used_memory": "used_gpu_memory"}
_MIB_FIELDS = {"memory.total", "memory.used", "memory.free", "used_memory"}
_NOT_AVAILABLE = "[N/A]"


class _Usage(Exception):
    """Bad command line: the message to print, and the exit status."""

    def __init__(self, message: str, status: int = EXIT_INVALID_ARGUMENT) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class _Request:
    """The parsed command line."""

    def __init__(self) -> None:
        self.query_gpu: list[str] | None = None
        self.query_apps: list[str] | None = None
        self.format: set[str] | None = None
        self.ids: list[str] | None = None
        self.list_gpus = False


_VALUED = {"--query-gpu", "--query-compute-apps", "--format", "--id", "-i"}


def _parse(argv: Sequence[str]) -> _Request:
    request = _Request()
    args = list(argv)
    while args:
        arg = args.pop(0)
        option, eq, value = arg.partition("=")
        if option in _VALUED:
            if not eq:
                if not args:
                    raise _Usage(f'Option "{option}" requires a value.')
                value = args.pop(0)
            _set(request, option, value)
        elif arg in ("-L", "--list-gpus"):
            request.list_gpus = True
        else:
            raise _Usage(
                "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."
            )
    if (request.query_gpu or request.query_apps) and request.format is None:
        raise _Usage('"--format" must be specified with a query option.')
    return request


def _set(request: _Request, option: str, value: str) -> None:
    if option == "--query-gpu":
        request.query_gpu = _fields(value, _GPU_FIELDS)
    elif option == "--query-compute-apps":
        request.query_apps = _fields(value, _APP_FIELDS)
    elif option == "--format":
        tokens = {t.strip() for t in value.split(",") if t.strip()}
        for token in tokens - {"csv", "noheader", "nounits"}:
            raise _Usage(f'"{token}" is not a valid format option.')
        if "csv" not in tokens:
            raise _Usage('"--format" must include "csv".')
        request.format = tokens
    else:
        request.ids = [i.strip() for i in value.split(",") if i.strip()]


def _fields(value: str, known: Mapping[str, str]) -> list[str]:
    fields = [f.strip() for f in value.split(",")]
    for field in fields:
        if field not in known:
            raise _Usage(f'Field "{field}" is not a valid field to query.')
    return fields


def _process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv0 = f.read().split(b"\0")[0]
        if argv0:
            return argv0.decode("utf-8", "replace")
    except OSError:
        pass
    return "[Not Found]"


class _Printer:
    def __init__(self, out: IO[str], tokens: set[str]) -> None:
        self.out = out
        self.header = "noheader" not in tokens
        self.units = "nounits" not in tokens

    def table(
        self,
        fields: Sequence[str],
        headers: Sequence[str],
        rows: Sequence[Callable[[str], str | int]],
    ) -> None:
        if self.header:
            self.out.write(", ".join(headers) + "\n")
        for row in rows:
            self.out.write(", ".join(self._cell(row(field), field) for field in fields) + "\n")

    def _cell(self, value: str | int, field: str) -> str:
        if isinstance(value, int) and field in _MIB_FIELDS and self.units:
            return f"{value} MiB"
        return str(value)


def _header(given: str, canonical: str, renamed: Mapping[str, str]) -> str:
    name = renamed.get(canonical, given)
    return f"{name} [MiB]" if canonical in _MIB_FIELDS else name


def _run(request: _Request, directory: str, out: IO[str]) -> int:
    seen = fake_gpu.snapshot(directory)
    devices = seen.devices
    if devices is None:  # removed since main() looked
        out.write(NO_DRIVER + "\n")
        return EXIT_NO_DRIVER
    chosen = list(devices.devices)
    if request.ids is not None:
        chosen = []
        for key in request.ids:
            device = devices.find(key)
            if device is None:
                out.write("No devices were found\n")
                return EXIT_NOT_FOUND
            chosen.append(device)
    if request.list_gpus:
        for device in chosen:
            out.write(f"GPU {device.index}: {device.name} (UUID: {device.uuid})\n")
    if request.query_gpu is not None:
        assert request.format is not None
        _print_gpus(_Printer(out, request.format), request.query_gpu, chosen, seen.used)
    if request.query_apps is not None:
        assert request.format is not None
        indices = {d.index for d in chosen}
        apps = [p for p in seen.processes if p[1] in indices]
        _print_apps(_Printer(out, request.format), request.query_apps, apps, devices)
    if not (request.list_gpus or request.query_gpu or request.query_apps):
        _print_summary(out, chosen, seen.used, seen.processes, devices.per_process)
    return 0


def _print_gpus(
    printer: _Printer,
    fields: Sequence[str],
    devices: Sequence[fake_gpu.Device],
    used: Mapping[str, int],
) -> None:
    canonical = [_GPU_FIELDS[f] for f in fields]

    def row(device: fake_gpu.Device) -> Callable[[str], str | int]:
        mib = used.get(device.index, 0)
        values: dict[str, str | int] = {
            "index": device.index,
            "uuid": device.uuid,
            "name": device.name,
            "count": len(devices),
            "memory.total": device.total_mib,
            "memory.used": mib,
            "memory.free": max(device.total_mib - mib, 0),
        }
        return values.__getitem__

    printer.table(
        canonical,
        [_header(f, c, {}) for f, c in zip(fields, canonical, strict=True)],
        [row(d) for d in devices],
    )


def _print_apps(
    printer: _Printer,
    fields: Sequence[str],
    apps: Sequence[tuple[int, str, int]],
    devices: fake_gpu.Devices,
) -> None:
    canonical = [_APP_FIELDS[f] for f in fields]

    def row(pid: int, index: str, mib: int) -> Callable[[str], str | int]:
        device = devices.find(index)
        values: dict[str, str | int] = {
            "pid": pid,
            "process_name": _process_name(pid) if "process_name" in canonical else "",
            "gpu_uuid": device.uuid if device is not None else _NOT_AVAILABLE,
            "gpu_name": device.name if device is not None else _NOT_AVAILABLE,
            "used_memory": mib if devices.per_process else _NOT_AVAILABLE,
        }
        return values.__getitem__

    printer.table(
        canonical,
        [_header(f, c, _APP_HEADERS) for f, c in zip(fields, canonical, strict=True)],
        [row(*app) for app in apps],
    )


def _print_summary(
    out: IO[str],
    devices: Sequence[fake_gpu.Device],
    used: Mapping[str, int],
    processes: Sequence[tuple[int, str, int]],
    per_process: bool,
) -> None:
    """Without a query: a plain summary (not the real tool's box drawing)."""
    for device in devices:
        mib = used.get(device.index, 0)
        out.write(
            f"GPU {device.index}: {device.name} ({device.uuid}) {mib}MiB / {device.total_mib}MiB\n"
        )
    for pid, index, mib in processes:
        shown = f"{mib}MiB" if per_process else _NOT_AVAILABLE
        out.write(f"  GPU {index} pid {pid} {_process_name(pid)} {shown}\n")


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    out: IO[str] | None = None,
) -> int:
    """
    Run the fake nvidia-smi: print to C{out} (stdout) and return the exit status.

    @param argv: the arguments (default C{sys.argv[1:]}).
    @param environ: where C{LLAMASWAP_FAKE_GPU} is read (default C{os.environ}).
    """
    argv = sys.argv[1:] if argv is None else argv
    out = sys.stdout if out is None else out
    try:
        request = _parse(argv)
    except _Usage as e:
        out.write(e.message + "\n")
        return e.status
    directory = fake_gpu.fake_gpu_dir(environ)
    if directory is None or not os.path.isfile(os.path.join(directory, fake_gpu.DEVICES_FILE)):
        out.write(NO_DRIVER + "\n")
        return EXIT_NO_DRIVER
    return _run(request, directory, out)


if __name__ == "__main__":
    sys.exit(main())
