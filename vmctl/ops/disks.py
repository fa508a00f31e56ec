"""Disk hotplug and unplug: the control plane opens the image and passes QEMU the fd.

Hotplug: add-fd (a new fdset) -> blockdev-add protocol node on /dev/fdset/N -> blockdev-add
format node -> device_add. Every step has its undo beside it. Node names derive from the disk
id (:func:`vmctl.spec.disk_node_names`), the fdset is found again by its opaque tag, so a
restarted control plane can unplug what an earlier one plugged.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

import attrs

from vmctl.errors import (
    CommandError,
    HotplugError,
    InvalidArgument,
    QMPError,
)
from vmctl.ops.devices import ensure_controller, remove_device
from vmctl.ops.rollback import Steps
from vmctl.qmp import Monitor
from vmctl.spec import SCSI_CONTROLLER, DiskBus, DiskSpec, disk_node_names

Bus = DiskBus
CacheMode = Literal["writeback", "none", "writethrough", "directsync", "unsafe"]
Aio = Literal["threads", "native", "io_uring"]

_CACHE = {
    # mode: (cache.direct, cache.no-flush, write-cache on the device)
    "writeback": (False, False, True),
    "none": (True, False, True),
    "writethrough": (False, False, False),
    "directsync": (True, False, False),
    "unsafe": (False, True, True),
}


@attrs.frozen(kw_only=True)
class Throttle:
    """I/O limits for a disk (``block_set_io_throttle``); 0 means unlimited."""

    bps: int = 0
    bps_rd: int = 0
    bps_wr: int = 0
    iops: int = 0
    iops_rd: int = 0
    iops_wr: int = 0

    def __attrs_post_init__(self) -> None:
        for name, value in attrs.asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"throttle {name} must be a whole number >= 0, not {value!r}")
        if (self.bps and (self.bps_rd or self.bps_wr)) or (self.iops and (self.iops_rd or self.iops_wr)):
            raise InvalidArgument("a total limit cannot be combined with read/write limits of the same kind")

    def arguments(self) -> dict[str, int]:
        return attrs.asdict(self)


def fdset_tag(disk_id: str, layer: int = 0) -> str:
    return f"vmctl:disk:{disk_id}" + (f":{layer}" if layer else "")


def is_disk_fdset(opaque: object, disk_id: str) -> bool:
    """Whether an fd's opaque tag belongs to this disk (any of its layers)."""
    tag = fdset_tag(disk_id)
    return opaque == tag or (isinstance(opaque, str) and re.fullmatch(re.escape(tag) + r":\d+", opaque) is not None)


def is_disk_node(node_name: str, disk_id: str) -> bool:
    """Whether a block node is one of this disk's layers (see :func:`vmctl.spec.disk_node_names`)."""
    return re.fullmatch(re.escape(disk_id) + r"-(o\d+-)?(file|fmt)", node_name) is not None


@attrs.frozen(kw_only=True)
class Disk:
    """A disk attached to the VM."""

    id: str
    path: str
    format: str
    read_only: bool
    bus: DiskBus
    file_node: str
    format_node: str
    fdset_id: int | None

    def spec(self) -> DiskSpec:
        return DiskSpec(
            id=self.id,
            path=self.path,
            format=self.format,  # type: ignore[arg-type]
            read_only=self.read_only,
            bus=self.bus,
        )


def hotplug_disk(
    qmp: Monitor,
    log: Any,
    *,
    path: str | os.PathLike[str],
    disk_id: str,
    format: str = "qcow2",
    read_only: bool = False,
    bus: Bus = "virtio-blk",
    cache: CacheMode = "writeback",
    aio: Aio = "threads",
    throttle: Throttle | None = None,
    timeout: float = 30.0,
) -> Disk:
    spec = DiskSpec(id=disk_id, path=path, format=format, read_only=read_only, bus=bus)  # type: ignore[arg-type]
    if cache not in _CACHE:
        raise InvalidArgument(f"disk {disk_id}: cache must be one of {', '.join(_CACHE)}, not {cache!r}")
    if aio not in ("threads", "native", "io_uring"):
        raise InvalidArgument(f"disk {disk_id}: aio must be threads, native or io_uring, not {aio!r}")
    direct, no_flush, write_cache = _CACHE[cache]
    if aio == "native" and not direct:
        raise InvalidArgument(f"disk {disk_id}: aio=native needs an O_DIRECT cache mode (none or directsync)")
    file_node, format_node = disk_node_names(disk_id)
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | (os.O_DIRECT if direct else 0)
    try:
        fd = os.open(spec.path, flags)
    except FileNotFoundError:
        raise InvalidArgument(f"disk {disk_id}: image {spec.path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"disk {disk_id}: cannot open {spec.path}: {exc.strerror}") from None
    bound = log.bind(disk=disk_id)
    try:
        with Steps(bound) as steps:
            fdset = steps.run(
                "add-fd",
                lambda: int(qmp.execute("add-fd", {"opaque": fdset_tag(disk_id)}, fds=[fd])["fdset-id"]),
                lambda fdset_id: qmp.execute("remove-fd", {"fdset-id": fdset_id}),
            )
            cache_options = {"direct": direct, "no-flush": no_flush}
            steps.run(
                "blockdev-add protocol",
                lambda: qmp.execute(
                    "blockdev-add",
                    {
                        "driver": "file",
                        "node-name": file_node,
                        "filename": f"/dev/fdset/{fdset}",
                        "read-only": read_only,
                        "aio": aio,
                        "cache": cache_options,
                    },
                    timeout=timeout,
                ),
                lambda _: qmp.execute("blockdev-del", {"node-name": file_node}),
            )
            steps.run(
                "blockdev-add format",
                lambda: qmp.execute(
                    "blockdev-add",
                    {
                        "driver": format,
                        "node-name": format_node,
                        "file": file_node,
                        "read-only": read_only,
                        "cache": cache_options,
                    },
                    timeout=timeout,
                ),
                lambda _: qmp.execute("blockdev-del", {"node-name": format_node}),
            )
            device: dict[str, Any] = {
                "driver": "virtio-blk-pci",
                "id": disk_id,
                "drive": format_node,
                "serial": disk_id,
                "write-cache": "on" if write_cache else "off",
            }
            if bus == "scsi":
                device.update(driver="scsi-hd", bus=f"{SCSI_CONTROLLER}.0")
                ensure_controller(qmp, steps, "virtio-scsi-pci", SCSI_CONTROLLER, timeout)
            steps.run(
                "device_add",
                lambda: qmp.execute("device_add", device, timeout=timeout),
                lambda _: remove_device(qmp, disk_id, timeout),
            )
            if throttle is not None:
                steps.run("throttle", lambda: set_throttle(qmp, disk_id=disk_id, throttle=throttle, bus=bus))
    except QMPError as exc:
        raise HotplugError(
            f"hotplug of disk {disk_id} failed and was rolled back: {exc}", remaining=tuple(steps.leftovers)
        ) from exc
    finally:
        os.close(fd)  # QEMU holds its own copy in the fdset
    bound.info("disk.hotplugged", path=spec.path, format=format, fdset=fdset)
    return Disk(
        id=disk_id,
        path=spec.path,
        format=format,
        read_only=read_only,
        bus=bus,
        file_node=file_node,
        format_node=format_node,
        fdset_id=fdset,
    )


def unplug_disk(qmp: Monitor, log: Any, *, disk_id: str, timeout: float = 30.0) -> None:
    """Remove the device (waiting for the guest to release it), then its nodes and fdset.

    Idempotent: parts already gone are skipped. If the guest does not release the device in
    time, ``HotplugError`` says what remains and a later call finishes the job.
    """
    bound = log.bind(disk=disk_id)
    # QEMU may send DEVICE_DELETED before device_del's reply, so remove_device subscribes first. It
    # first sends one for the virtio backend path (no "device" field), then the one for our id.
    try:
        remove_device(qmp, disk_id, timeout, kind="disk")
    except HotplugError as exc:  # name the nodes too (only looked up when it matters)
        nodes = tuple(f"node {n}" for n in disk_nodes(qmp, disk_id))
        raise HotplugError(str(exc).split(";")[0], remaining=(*exc.remaining, *nodes)) from None
    delete_disk_nodes(qmp, disk_id)
    remove_disk_fdsets(qmp, disk_id)
    bound.info("disk.unplugged")


def disk_nodes(qmp: Monitor, disk_id: str) -> list[str]:
    names = (str(n.get("node-name")) for n in qmp.execute("query-named-block-nodes", {"flat": True}))
    return [name for name in names if is_disk_node(name, disk_id)]


def delete_disk_nodes(qmp: Monitor, disk_id: str, *, only: set[str] | None = None) -> None:
    """blockdev-del this disk's nodes (or just ``only``), users before what they use: a node
    still in use (a backing or protocol node) is retried after the nodes above it are gone."""
    while True:
        remaining = [n for n in disk_nodes(qmp, disk_id) if only is None or n in only]
        if not remaining:
            return
        deleted = False
        for node in remaining:
            try:
                qmp.execute("blockdev-del", {"node-name": node})
                deleted = True
            except CommandError:
                continue  # in use by a node not yet deleted
        if not deleted:
            raise HotplugError(f"cannot delete the block nodes of disk {disk_id}", remaining=tuple(remaining))


def remove_disk_fdsets(qmp: Monitor, disk_id: str, *, layers: set[int] | None = None) -> None:
    """remove-fd the fdsets of this disk's layers (all of them, or just ``layers``)."""
    wanted = {fdset_tag(disk_id, layer) for layer in layers} if layers is not None else None
    for fdset in qmp.execute("query-fdsets"):
        opaques = [fd.get("opaque") for fd in fdset.get("fds", ())]
        if any(o in wanted if wanted is not None else is_disk_fdset(o, disk_id) for o in opaques):
            qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})


def set_throttle(qmp: Monitor, *, disk_id: str, throttle: Throttle, bus: DiskBus = "virtio-blk") -> None:
    # A virtio-blk disk's block backend hangs off the virtio device inside the PCI proxy that
    # carries the id; a SCSI disk holds it itself.
    device_path = f"/machine/peripheral/{disk_id}" + ("/virtio-backend" if bus == "virtio-blk" else "")
    qmp.execute("block_set_io_throttle", {"id": device_path, **throttle.arguments()})


def resize_disk(qmp: Monitor, log: Any, *, disk: DiskSpec, size: int, allow_shrink: bool = False) -> int:
    """Grow the disk's active image to ``size`` bytes (the guest is told); returns the old size."""
    disk_id = disk.id
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512:
        raise InvalidArgument(f"disk {disk_id}: size must be a positive multiple of 512 bytes, not {size!r}")
    format_node = disk.active_node
    nodes = {n["node-name"]: n for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    if format_node not in nodes:
        raise InvalidArgument(f"disk {disk_id} has no block node {format_node} (was it hotplugged by vmctl?)")
    current = int(nodes[format_node]["image"]["virtual-size"])
    if size < current and not allow_shrink:
        raise InvalidArgument(f"disk {disk_id}: {size} bytes would shrink it from {current} (allow_shrink=True)")
    qmp.execute("block_resize", {"node-name": format_node, "size": size})
    log.bind(disk=disk_id).info("disk.resized", old=current, new=size)
    return current
