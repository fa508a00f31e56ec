"""A VM's use, at one moment (``vm.stats()``): QEMU's counters and the host's.

Three QMP commands (vCPU threads, block stats, the balloon's two) and a few small reads of
``/proc`` for QEMU's process: its vCPU threads' run time (``schedstat``), its resident memory
(``statm``); and its taps' counters.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Final

from vmctl.model import NicSpec
from vmctl.model.stats import MemoryStats, NicStats, VcpuStats, VMStats
from vmctl.ops import stats as stats_ops
from vmctl.qmp import QMPMonitor
from vmctl.vm.process import stat_fields

_PAGE: Final = os.sysconf("SC_PAGE_SIZE")
_TICK_NS: Final = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def take(*, name: str, qmp: QMPMonitor, pid: int, disk_ids: Iterable[str], nics: Iterable[NicSpec]) -> VMStats:
    proc = f"/proc/{pid}"
    vcpus = tuple(
        VcpuStats(index=index, thread_id=thread, cpu_ns=_thread_cpu_ns(proc, thread))
        for index, thread in stats_ops.vcpu_threads(qmp)
    )
    disks = tuple(stats_ops.disk_stats(qmp, disk_ids))
    balloon, figures = stats_ops.balloon_figures(qmp)
    memory = MemoryStats(rss_bytes=_rss_bytes(proc), balloon_bytes=balloon, **MemoryStats.guest_figures(figures))
    return VMStats(
        name=name,
        time=time.time(),
        monotonic=time.monotonic(),
        qemu_cpu_ns=_process_cpu_ns(proc),
        vcpus=vcpus,
        disks=disks,
        nics=_nic_stats(proc, nics),
        memory=memory,
    )


def _read(path: str) -> str:
    with open(path) as file:
        return file.read()


def _thread_cpu_ns(proc: str, thread: int) -> int:
    try:
        return int(_read(f"{proc}/task/{thread}/schedstat").split()[0])
    except (OSError, ValueError, IndexError):  # no schedstats in this kernel: clock ticks then
        try:
            return _ticks_ns(_read(f"{proc}/task/{thread}/stat"))
        except (OSError, ValueError, IndexError):
            return 0  # the thread went (a vCPU unplugged just now)


def _process_cpu_ns(proc: str) -> int:
    return _ticks_ns(_read(f"{proc}/stat"))


def _ticks_ns(stat: str) -> int:
    fields = stat_fields(stat)  # utime and stime are fields 14 and 15: here 11 and 12
    return (int(fields[11]) + int(fields[12])) * _TICK_NS


def _rss_bytes(proc: str) -> int:
    return int(_read(f"{proc}/statm").split()[1]) * _PAGE


def _nic_stats(proc: str, nics: Iterable[NicSpec]) -> tuple[NicStats, ...]:
    """Each tap NIC's counters, from where its tap is: vmctl's network namespace (vmctl opens
    the taps of hotplugged NICs), else QEMU's (a tap QEMU opened at boot). A tap in neither
    (moved into another namespace) is left out."""
    taps = {nic.tap: nic.id for nic in nics if nic.tap is not None}
    if not taps:
        return ()
    counters: dict[str, list[int]] = {}
    for tap in taps:
        try:
            base = f"/sys/class/net/{tap}/statistics/"
            counters[tap] = [int(_read(base + name)) for name in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")]
        except (OSError, ValueError):
            continue
    if len(counters) < len(taps):
        for line in _read(f"{proc}/net/dev").splitlines()[2:]:
            interface, _, values = line.partition(":")
            tap = interface.strip()
            if tap in taps and tap not in counters:
                fields = [int(v) for v in values.split()]
                counters[tap] = [fields[0], fields[1], fields[8], fields[9]]
    # The tap's receive side is what the guest sent, and its transmit side what it received.
    found = [
        NicStats(
            id=taps[tap], tap=tap, rx_bytes=tap_tx, rx_packets=tap_tx_pkts, tx_bytes=tap_rx, tx_packets=tap_rx_pkts
        )
        for tap, (tap_rx, tap_rx_pkts, tap_tx, tap_tx_pkts) in counters.items()
    ]
    return tuple(sorted(found, key=lambda n: n.id))
