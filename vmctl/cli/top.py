"""``vmctl top``: every VM under a root, refreshed live: CPU, disk and network per second.

Each refresh reads every VM's state file and asks its tools monitor for its counters (a
connection per refresh: QEMU serves one client per monitor, and ``vmctl ls`` or a screenshot
may want it in between); the rates are the differences from the refresh before. ``q`` quits.
"""

from __future__ import annotations

import curses
import time
from pathlib import Path

import attrs

from vmctl.cli.listing import duration, run_dirs, tools_monitor
from vmctl.errors import InvalidArgument, QMPError, StaleState, VmctlError
from vmctl.model.stats import VMRates, VMStats
from vmctl.vm.process import QemuProcess
from vmctl.vm.statefile import read_record
from vmctl.vm.stats import take


@attrs.frozen(kw_only=True)
class TopRow:
    name: str
    state: str
    vcpus: int
    rss_mib: int
    rates: VMRates | None


def sample(run_dir: Path) -> tuple[str, str, VMStats | None]:
    """(name, state, stats) of one VM now; no stats when it is gone or its monitor is busy."""
    record = read_record(run_dir)
    name = record.spec.name
    try:
        QemuProcess.adopt(record.pid, record.start_time).close()
    except StaleState:
        return name, "exited", None
    try:
        with tools_monitor(run_dir, timeout=2.0) as monitor:
            state = str(monitor.execute("query-status")["status"])
            stats = take(
                name=name, qmp=monitor, pid=record.pid,
                disk_ids=[d.id for d in record.inventory.disks], nics=record.inventory.nics,
            )  # fmt: skip
    except (QMPError, OSError):
        return name, "unreachable", None
    return name, state, stats


class Top:
    """The rows of each refresh, from the samples of the one before."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._last: dict[Path, VMStats] = {}

    def refresh(self) -> list[TopRow]:
        rows, seen = [], {}
        for run_dir in run_dirs(self.root):
            try:
                name, state, stats = sample(run_dir)
            except VmctlError:
                continue
            before = self._last.get(run_dir)
            rates = stats.rates(before) if stats is not None and before is not None else None
            if stats is not None:
                seen[run_dir] = stats
            rows.append(
                TopRow(
                    name=name,
                    state=state,
                    vcpus=len(stats.vcpus) if stats else 0,
                    rss_mib=stats.memory.rss_bytes >> 20 if stats else 0,
                    rates=rates,
                )
            )
        self._last = seen
        return rows


HEADER = (
    f"{'NAME':20} {'STATE':12} {'VCPUS':>5} {'CPU%':>6} {'RSS MiB':>8} "
    f"{'READ/s':>9} {'WRITE/s':>9} {'RX/s':>9} {'TX/s':>9}"
)


def render(rows: list[TopRow]) -> list[str]:
    lines = [HEADER]
    for row in rows:
        r = row.rates
        figures = (
            f"{r.cpu * 100:6.1f} {row.rss_mib:8} {_bytes(r.read_bytes):>9} {_bytes(r.write_bytes):>9} "
            f"{_bytes(r.rx_bytes):>9} {_bytes(r.tx_bytes):>9}"
            if r is not None
            else f"{'-':>6} {row.rss_mib or '-':>8} {'-':>9} {'-':>9} {'-':>9} {'-':>9}"
        )
        lines.append(f"{row.name[:20]:20} {row.state[:12]:12} {row.vcpus:5} {figures}")
    return lines


def _bytes(per_second: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if per_second < 1024 or unit == "GiB":
            return f"{per_second:.0f}{unit}" if unit == "B" else f"{per_second:.1f}{unit}"
        per_second /= 1024
    raise AssertionError("unreachable")


def run_top(root: Path, *, interval: float = 1.0) -> int:
    if not 0.1 <= interval <= 3600:
        raise InvalidArgument(f"--interval must be 0.1..3600 seconds, not {interval}")
    top = Top(root)

    def loop(screen: curses.window) -> None:
        curses.curs_set(0)
        screen.timeout(int(interval * 1000))
        started = time.monotonic()
        while True:
            rows = top.refresh()
            screen.erase()
            height, width = screen.getmaxyx()
            # What the reader needs first comes first: a long root is what the width cuts off.
            title = f"vmctl top - q quits - {len(rows)} VMs - up {duration(time.monotonic() - started)} - {root}"
            for y, line in enumerate([title, "", *render(rows)][: height - 1]):
                screen.addnstr(y, 0, line, width - 1, curses.A_BOLD if y in (0, 2) else curses.A_NORMAL)
            screen.refresh()
            if screen.getch() in (ord("q"), ord("Q")):
                return

    try:
        curses.wrapper(loop)
    except curses.error as exc:
        raise InvalidArgument(f"vmctl top needs a terminal ({exc}); use vmctl ls --json for a script") from None
    return 0
