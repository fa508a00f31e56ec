"""What a VM uses, at one moment: per-vCPU time, per-disk I/O, per-NIC traffic, memory.

Counters only grow (while the QEMU lives): a rate is the difference of two ``VMStats`` over
the difference of their ``monotonic`` times (``VMStats.rates``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen(kw_only=True)
class VcpuStats:
    index: int
    thread_id: int
    #: Time the vCPU's host thread ran, in nanoseconds.
    cpu_ns: int


@attrs.frozen(kw_only=True)
class DiskStats:
    id: str
    read_bytes: int
    write_bytes: int
    read_ops: int
    write_ops: int
    flush_ops: int
    #: Time the guest's requests took in all, in nanoseconds.
    read_ns: int
    write_ns: int
    flush_ns: int

    @classmethod
    def from_qmp(cls, disk_id: str, stats: Mapping[str, Any]) -> DiskStats:
        return cls(
            id=disk_id,
            read_bytes=int(stats.get("rd_bytes", 0)),
            write_bytes=int(stats.get("wr_bytes", 0)),
            read_ops=int(stats.get("rd_operations", 0)),
            write_ops=int(stats.get("wr_operations", 0)),
            flush_ops=int(stats.get("flush_operations", 0)),
            read_ns=int(stats.get("rd_total_time_ns", 0)),
            write_ns=int(stats.get("wr_total_time_ns", 0)),
            flush_ns=int(stats.get("flush_total_time_ns", 0)),
        )


@attrs.frozen(kw_only=True)
class NicStats:
    """A NIC's traffic from the guest's side: what it received and sent (its tap's tx and rx)."""

    id: str
    tap: str
    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


@attrs.frozen(kw_only=True)
class MemoryStats:
    #: QEMU's resident memory on the host.
    rss_bytes: int
    #: What the balloon leaves the guest (None: no balloon).
    balloon_bytes: int | None = None
    #: The guest's own figures, from the balloon driver's statistics (None: not reported yet).
    guest_total_bytes: int | None = None
    guest_free_bytes: int | None = None
    guest_available_bytes: int | None = None

    @staticmethod
    def guest_figures(stats: Mapping[str, Any]) -> dict[str, int | None]:
        """The balloon's ``guest-stats`` as fields (QEMU reports -1 for what the guest did not say)."""

        def figure(name: str) -> int | None:
            value = stats.get(name, -1)
            return int(value) if isinstance(value, int) and value >= 0 else None

        return {
            "guest_total_bytes": figure("stat-total-memory"),
            "guest_free_bytes": figure("stat-free-memory"),
            "guest_available_bytes": figure("stat-available-memory"),
        }


@attrs.frozen(kw_only=True)
class VMStats:
    name: str
    #: When it was taken: wall clock (seconds since the epoch) and monotonic (for rates).
    time: float
    monotonic: float
    #: Time all of QEMU's threads ran (vCPUs, I/O, the main loop), in nanoseconds.
    qemu_cpu_ns: int
    vcpus: tuple[VcpuStats, ...]
    disks: tuple[DiskStats, ...]
    nics: tuple[NicStats, ...]
    memory: MemoryStats

    def rates(self, earlier: VMStats) -> VMRates:
        """Per-second use between ``earlier`` and this (the same VM)."""
        seconds = max(self.monotonic - earlier.monotonic, 1e-9)

        def per_second(now: int, then: int) -> float:
            return max(0, now - then) / seconds

        before_disks = {d.id: d for d in earlier.disks}
        before_nics = {n.id: n for n in earlier.nics}
        disks = [(d, before_disks[d.id]) for d in self.disks if d.id in before_disks]
        nics = [(n, before_nics[n.id]) for n in self.nics if n.id in before_nics]
        return VMRates(
            seconds=seconds,
            cpu=per_second(self.qemu_cpu_ns, earlier.qemu_cpu_ns) / 1e9,
            read_bytes=sum(per_second(d.read_bytes, b.read_bytes) for d, b in disks),
            write_bytes=sum(per_second(d.write_bytes, b.write_bytes) for d, b in disks),
            rx_bytes=sum(per_second(n.rx_bytes, b.rx_bytes) for n, b in nics),
            tx_bytes=sum(per_second(n.tx_bytes, b.tx_bytes) for n, b in nics),
        )


@attrs.frozen(kw_only=True)
class VMRates:
    """A VM's use per second over ``seconds``: ``cpu`` in host CPUs (1.0: one core all the
    time), bytes per second over all its disks and NICs."""

    seconds: float
    cpu: float
    read_bytes: float
    write_bytes: float
    rx_bytes: float
    tx_bytes: float
