"""What QEMU reports of a VM's use: its vCPU threads, its disks' I/O, its balloon's figures."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from vmctl.errors import CommandError, DeviceNotActive
from vmctl.model.names import BALLOON_DEVICE
from vmctl.model.stats import DiskStats
from vmctl.ops.queries import ask
from vmctl.qmp import QMPMonitor

#: How often the guest's balloon driver reports its memory figures, in seconds (0: never).
BALLOON_STATS_INTERVAL: Final = 2
_PERIPHERAL: Final = "/machine/peripheral/"


def vcpu_threads(qmp: QMPMonitor) -> list[tuple[int, int]]:
    """``(cpu index, host thread id)`` of each vCPU, in index order."""
    return sorted((int(cpu["cpu-index"]), int(cpu["thread-id"])) for cpu in ask(qmp, "query-cpus-fast"))


def disk_stats(qmp: QMPMonitor, disk_ids: Iterable[str]) -> list[DiskStats]:
    """The I/O counters of these disks (by device id), as the guest's device sees them."""
    wanted = set(disk_ids)
    found = []
    for entry in ask(qmp, "query-blockstats"):
        disk_id = _device_id(str(entry.get("qdev", "")))
        if disk_id in wanted:
            found.append(DiskStats.from_qmp(disk_id, entry.get("stats", {})))
    return sorted(found, key=lambda d: d.id)


def _device_id(qdev: str) -> str:
    """``d1`` of ``/machine/peripheral/d1/virtio-backend`` (virtio-blk) or of ``d1`` (scsi-hd)."""
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL) :].split("/", 1)[0]
    return qdev


def balloon_figures(qmp: QMPMonitor) -> tuple[int | None, dict[str, Any]]:
    """What the balloon leaves the guest, and the guest's last reported figures ({} if none);
    ``(None, {})`` without a balloon."""
    try:
        actual = int(qmp.execute("query-balloon")["actual"])
    except DeviceNotActive:
        return None, {}
    try:
        reported = qmp.execute("qom-get", {"path": _PERIPHERAL + BALLOON_DEVICE, "property": "guest-stats"})
    except CommandError:
        return actual, {}
    return actual, dict(reported.get("stats", {})) if reported.get("last-update") else {}


def start_balloon_stats(qmp: QMPMonitor, interval: int = BALLOON_STATS_INTERVAL) -> None:
    """Have the guest's balloon driver report its memory figures every ``interval`` seconds."""
    qmp.execute(
        "qom-set",
        {"path": _PERIPHERAL + BALLOON_DEVICE, "property": "guest-stats-polling-interval", "value": interval},
    )
