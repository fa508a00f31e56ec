"""Disk hotplug and unplug: the control plane opens the image and passes QEMU the fd.

Hotplug: add-fd (a new fdset) -> blockdev-add protocol node on /dev/fdset/N -> blockdev-add
format node -> device_add. Every step has its undo beside it. Node names derive from the disk
id (:func:`vmctl.spec.disk_node_names`), the fdset is found again by its opaque tag, so a
restarted control plane can unplug what an earlier one plugged.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import attrs

from vmctl.errors import (
    CommandError,
    DeviceNotFound,
    EventTimeout,
    HotplugError,
    InvalidArgument,
    QMPError,
)
from vmctl.ops.rollback import Steps
from vmctl.qmp import Monitor
from vmctl.spec import DiskSpec, disk_node_names

Bus = Literal["virtio-blk"]
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


def fdset_tag(disk_id: str) -> str:
    return f"vmctl:disk:{disk_id}"


@attrs.frozen(kw_only=True)
class Disk:
    """A disk attached to the VM."""

    id: str
    path: str
    format: str
    read_only: bool
    file_node: str
    format_node: str
    fdset_id: int | None

    def spec(self) -> DiskSpec:
        return DiskSpec(id=self.id, path=self.path, format=self.format, read_only=self.read_only)  # type: ignore[arg-type]


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
    timeout: float = 30.0,
) -> Disk:
    spec = DiskSpec(id=disk_id, path=path, format=format, read_only=read_only)  # type: ignore[arg-type]
    if bus != "virtio-blk":
        raise InvalidArgument(f"disk {disk_id}: bus {bus!r} is not supported (virtio-blk)")
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
            steps.run(
                "device_add",
                lambda: qmp.execute(
                    "device_add",
                    {
                        "driver": "virtio-blk-pci",
                        "id": disk_id,
                        "drive": format_node,
                        "serial": disk_id,
                        "write-cache": "on" if write_cache else "off",
                    },
                    timeout=timeout,
                ),
            )
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
    file_node, format_node = disk_node_names(disk_id)
    if device_present(qmp, disk_id):
        # Subscribe first: QEMU may send DEVICE_DELETED before device_del's reply. It first sends
        # one for the virtio backend path (no "device" field), then the one for our id.
        with qmp.events("DEVICE_DELETED", match={"device": disk_id}) as deleted:
            try:
                qmp.execute("device_del", {"id": disk_id})
            except DeviceNotFound:
                pass  # gone between the check and the command
            except CommandError as exc:
                if "in the process of unplug" not in exc.desc and "already" not in exc.desc:
                    raise
            try:
                deleted.get(timeout)
            except EventTimeout:
                if device_present(qmp, disk_id):
                    remaining = (f"device {disk_id}", f"node {format_node}", f"node {file_node}")
                    raise HotplugError(
                        f"the guest did not release disk {disk_id} within {timeout:g}s", remaining=remaining
                    ) from None
    nodes = {str(n.get("node-name")) for n in qmp.execute("query-named-block-nodes", {"flat": True})}
    for node in (format_node, file_node):
        if node in nodes:
            qmp.execute("blockdev-del", {"node-name": node})
    for fdset in qmp.execute("query-fdsets"):
        if any(fd.get("opaque") == fdset_tag(disk_id) for fd in fdset.get("fds", ())):
            qmp.execute("remove-fd", {"fdset-id": fdset["fdset-id"]})
    bound.info("disk.unplugged")


def device_present(qmp: Monitor, device_id: str) -> bool:
    """Whether a device with this id is in QEMU's device tree (under /machine/peripheral)."""
    children = qmp.execute("qom-list", {"path": "/machine/peripheral"})
    return any(child.get("name") == device_id for child in children)
