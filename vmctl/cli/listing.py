"""What ``vmctl ls`` shows: every VM whose run dir is under a root, from its state file, its
process and its tools monitor (the second QMP monitor vmctl adds at launch, so the listing
works while a control plane holds the first)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Final

import attrs

from vmctl.errors import QMPError, StaleState, VmctlError
from vmctl.model.names import QMP_SOCKET, TOOLS_SOCKET
from vmctl.qmp import Monitor, connect
from vmctl.vm.process import QemuProcess
from vmctl.vm.statefile import STATE_FILE, VMRecord, read_record

#: How deep below a root run dirs are looked for (root/vm, root/host/vm).
DEPTH: Final = 2
_TICKS: Final = os.sysconf("SC_CLK_TCK")


@attrs.frozen(kw_only=True)
class VMRow:
    name: str
    #: QEMU's run state (running, paused, inmigrate...), "exited", or "unreachable" (no monitor answered).
    state: str
    pid: int
    vcpus: int
    memory_mib: int
    disks: tuple[str, ...]
    uptime_s: float | None
    run_dir: Path


def run_dirs(root: Path) -> list[Path]:
    """The run dirs at or below ``root`` (up to ``DEPTH`` levels), sorted."""
    found = []
    for directory, subdirectories, files in os.walk(root):
        depth = len(Path(directory).relative_to(root).parts)
        if STATE_FILE in files:
            found.append(Path(directory))
        if depth >= DEPTH:
            subdirectories.clear()
    return sorted(found)


@contextmanager
def tools_monitor(run_dir: Path, *, timeout: float = 5.0) -> Iterator[Monitor]:
    """The VM's tools monitor (or, for a QEMU launched without one, its first monitor)."""
    path = run_dir / TOOLS_SOCKET
    with connect(str(path if path.exists() else run_dir / QMP_SOCKET), name="tools", timeout=timeout) as monitor:
        yield monitor


def row(run_dir: Path, *, timeout: float = 5.0) -> VMRow:
    record = read_record(run_dir)
    memory = record.spec.memory_mib + sum(m.size_mib for m in record.inventory.memory)

    def made(state: str, vcpus: int, uptime: float | None) -> VMRow:
        return VMRow(
            name=record.spec.name, state=state, pid=record.pid, vcpus=vcpus, memory_mib=memory,
            disks=tuple(d.id for d in record.inventory.disks), uptime_s=uptime, run_dir=run_dir,
        )  # fmt: skip

    vcpus = record.spec.cpus + len(record.inventory.hotplugged_cpus)
    try:
        QemuProcess.adopt(record.pid, record.start_time).close()
    except StaleState:
        return made("exited", vcpus, None)
    uptime = _uptime(record)
    try:
        with tools_monitor(run_dir, timeout=timeout) as monitor:
            state = str(monitor.execute("query-status")["status"])
            vcpus = len(monitor.execute("query-cpus-fast"))
    except (QMPError, OSError):
        state = "unreachable"
    return made(state, vcpus, uptime)


def rows(root: Path, *, timeout: float = 5.0) -> list[VMRow]:
    listed = []
    for run_dir in run_dirs(root):
        try:
            listed.append(row(run_dir, timeout=timeout))
        except VmctlError:  # a state file being rewritten, or one of an unknown format
            continue
    return listed


def run_ls(root: Path, *, as_json: bool) -> int:
    """Print every VM under ``root``: a table, or JSON lines."""
    listed = rows(root)
    if as_json:
        for vm_row in listed:  # (``row`` is this module's function)
            fields = {**attrs.asdict(vm_row), "run_dir": str(vm_row.run_dir), "disks": list(vm_row.disks)}
            print(json.dumps(fields))
    elif listed:
        print(table(listed))
    else:
        print(f"no VM under {root}", file=sys.stderr)
    return 0


def _uptime(record: VMRecord) -> float | None:
    try:
        with open("/proc/uptime") as file:
            since_boot = float(file.read().split()[0])
    except (OSError, ValueError):
        return None
    return max(0.0, since_boot - record.start_time / _TICKS)


def table(listed: Sequence[VMRow]) -> str:
    """The rows as an aligned text table, one VM per line."""
    header = ("NAME", "STATE", "PID", "VCPUS", "MEMORY", "DISKS", "UPTIME")
    lines = [
        (
            r.name,
            r.state,
            str(r.pid),
            str(r.vcpus),
            f"{r.memory_mib} MiB",
            ",".join(r.disks) or "-",
            duration(r.uptime_s) if r.uptime_s is not None else "-",
        )
        for r in listed
    ]
    widths = [max(len(cells[i]) for cells in (header, *lines)) for i in range(len(header))]
    numeric = {2, 3, 4}
    return "\n".join(
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i]) for i, cell in enumerate(cells)
        ).rstrip()
        for cells in (header, *lines)
    )


def duration(seconds: float) -> str:
    """3d4h, 2h05m, 4m07s, 12s."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"
