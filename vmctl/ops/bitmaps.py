"""Dirty bitmaps on a disk's active layer: which blocks changed since a point in time."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from vmctl.errors import CommandTimeout, DeviceExists, InvalidArgument
from vmctl.model import DiskSpec
from vmctl.ops.nodes import block_nodes
from vmctl.ops.queries import barrier, execute_checked, execute_idempotent
from vmctl.qmp import QMPMonitor

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@attrs.frozen(kw_only=True)
class Bitmap:
    name: str
    dirty_bytes: int
    granularity: int
    persistent: bool
    recording: bool

    @classmethod
    def from_qmp(cls, info: Mapping[str, Any]) -> Bitmap:
        return cls(
            name=str(info["name"]),
            dirty_bytes=int(info.get("count", 0)),
            granularity=int(info.get("granularity", 0)),
            persistent=bool(info.get("persistent", False)),
            recording=bool(info.get("recording", True)),
        )


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"bitmap name {name!r} must be 1-64 letters, digits, _ . : -")


def bitmaps(qmp: QMPMonitor, disk: DiskSpec) -> list[Bitmap]:
    node = block_nodes(qmp).get(disk.active_node)
    return [Bitmap.from_qmp(b) for b in node.get("dirty-bitmaps", ())] if node is not None else []


def add_bitmap(
    qmp: QMPMonitor, disk: DiskSpec, name: str, *, persistent: bool = True, granularity: int | None = None
) -> None:
    """Start a bitmap; ``persistent`` ones are stored in the qcow2 image (raw images cannot hold them)."""
    _check_name(name)
    active_is_raw = disk.format == "raw" and not disk.overlays
    if persistent and active_is_raw:
        raise InvalidArgument(f"disk {disk.id} is raw: a persistent bitmap needs qcow2 (use persistent=False)")
    if granularity is not None and (granularity < 512 or granularity & (granularity - 1)):
        raise InvalidArgument(f"bitmap granularity must be a power of two >= 512, not {granularity}")
    if _has(qmp, disk, name):
        raise DeviceExists(f"disk {disk.id} has a bitmap {name} already")
    arguments: dict[str, Any] = {"node": disk.active_node, "name": name, "persistent": persistent}
    if granularity is not None:
        arguments["granularity"] = granularity
    execute_checked(qmp, "block-dirty-bitmap-add", arguments, took=lambda: _has(qmp, disk, name))


def remove_bitmap(qmp: QMPMonitor, disk: DiskSpec, name: str) -> None:
    _check_name(name)
    arguments = {"node": disk.active_node, "name": name}
    execute_checked(qmp, "block-dirty-bitmap-remove", arguments, took=lambda: not _has(qmp, disk, name))


def clear_bitmap(qmp: QMPMonitor, disk: DiskSpec, name: str) -> None:
    """Empty a bitmap. Not sent twice: a second clear would drop what the guest wrote in between
    (an incremental backup would miss it). A late reply is waited out instead."""
    _check_name(name)
    try:
        qmp.execute("block-dirty-bitmap-clear", {"node": disk.active_node, "name": name})
    except CommandTimeout:
        barrier(qmp)


def _has(qmp: QMPMonitor, disk: DiskSpec, name: str) -> bool:
    return any(b.name == name for b in bitmaps(qmp, disk))


def merge_bitmaps(qmp: QMPMonitor, disk: DiskSpec, target: str, sources: Sequence[str]) -> None:
    """Add the dirty blocks of ``sources`` into ``target`` (all on this disk)."""
    for name in (target, *sources):
        _check_name(name)
    if not sources:
        raise InvalidArgument("merge needs at least one source bitmap")
    execute_idempotent(
        qmp, "block-dirty-bitmap-merge", {"node": disk.active_node, "target": target, "bitmaps": list(sources)}
    )
