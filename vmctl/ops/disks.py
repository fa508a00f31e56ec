"""Disk hotplug and unplug: the control plane opens the image and passes QEMU the fd.

Hotplug: add-fd (a new fdset) -> blockdev-add protocol node on /dev/fdset/N -> blockdev-add
format node -> device_add (-> I/O limits). Every step has its undo beside it. The nodes and the
device are the disk's own rendering (``DiskSpec.layer_nodes``, ``device_properties``), the same
as at boot; node names and the fdset's tag derive from the disk id (``vmctl.model.names``), so a
restarted control plane can unplug what an earlier one plugged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from typing import Any

from vmctl.errors import CommandError, CommandTimeout, HotplugError, InvalidArgument, QMPError
from vmctl.model import DiskBus, DiskSpec, Throttle
from vmctl.model.names import fdset_tag, is_disk_fdset, is_disk_node, secret_object_id
from vmctl.model.pcie import Controller
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import ensure_controller, object_exists, remove_device, remove_object
from vmctl.ops.nodes import block_nodes
from vmctl.ops.queries import ask, execute_checked
from vmctl.ops.rollback import Steps
from vmctl.qmp import QMPMonitor

#: How long a block node may stay in use after its device is gone.
NODE_RELEASE_TIMEOUT = 5.0


def hotplug_disk(
    qmp: QMPMonitor,
    log: Any,
    disk: DiskSpec,
    *,
    controller: Controller | None = None,
    secret: Mapping[str, Any] | None = None,
    timeout: float | Deadline = 30.0,
) -> DiskSpec:
    """Plug ``disk`` (its image, with its cache, aio and I/O limits) into the running guest. A
    SCSI disk gets the SCSI ``controller`` first unless the VM has one. An encrypted disk's
    passphrase comes as its ``secret`` object (already encrypted with the VM's master key).
    ``timeout`` bounds every command of it (see ``vmctl.ops.deadline``)."""
    limit = Deadline.after(timeout)
    if (secret is None) != (disk.encryption is None):
        raise InvalidArgument(f"disk {disk.id}: an encrypted disk needs its secret object, and only it")
    if disk.overlays:
        raise InvalidArgument(f"disk {disk.id}: hotplug takes a single image, not a chain of {len(disk.layers)}")
    try:
        fd = os.open(disk.path, disk.open_flags())
    except FileNotFoundError:
        raise InvalidArgument(f"disk {disk.id}: image {disk.path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"disk {disk.id}: cannot open {disk.path}: {exc.strerror}") from None
    bound = log.bind(disk=disk.id)
    forward = limit.bind(qmp)  # the steps wait no longer than the deadline; their undos use qmp
    try:
        with Steps(bound) as steps:
            if secret is not None:
                secret_id = str(secret["id"])
                steps.run(
                    f"object-add {secret_id}",
                    lambda: execute_checked(
                        forward, "object-add", secret, took=lambda: object_exists(forward, secret_id)
                    ),
                    lambda _: remove_object(qmp, secret_id),
                )
            fdset = add_layer(qmp, steps, disk, disk.base_layer, fd, limit=limit)
            if disk.bus == "scsi":
                ensure_controller(qmp, steps, controller or Controller.scsi(), limit)
            steps.run(
                "device_add",
                lambda: forward.execute("device_add", disk.device_properties()),
                lambda _: remove_device(qmp, disk.id, limit.timeout),
            )
            if disk.throttle is not None:
                throttle = disk.throttle
                steps.run("throttle", lambda: set_throttle(forward, disk_id=disk.id, throttle=throttle, bus=disk.bus))
    except QMPError as exc:
        raise HotplugError(
            f"hotplug of disk {disk.id} failed and was rolled back: {exc}", remaining=tuple(steps.leftovers)
        ) from exc
    finally:
        os.close(fd)  # QEMU holds its own copy in the fdset
    bound.info("disk.hotplugged", path=disk.path, format=disk.format, cache=disk.cache, fdset=fdset)
    return disk


def add_layer(
    qmp: QMPMonitor,
    steps: Steps,
    disk: DiskSpec,
    layer: int,
    fd: int,
    *,
    backing: str | None = None,
    limit: Deadline | None = None,
) -> int:
    """Pass ``fd``, the opened image of ``disk``'s layer ``layer``, to QEMU (a new fdset) and add
    the layer's protocol and format nodes as the disk renders them, each step with its undo.
    Hotplug adds the base layer this way, a snapshot its overlay, a mirror its target. ``backing``
    names the format node below an overlay; ``limit`` bounds the steps. Returns the fdset's id."""
    forward = qmp if limit is None else limit.bind(qmp)
    fdset = steps.run(
        "add-fd" if layer == 0 else f"add-fd layer {layer}",
        lambda: int(forward.execute("add-fd", {"opaque": fdset_tag(disk.id, layer)}, fds=[fd])["fdset-id"]),
        lambda fdset_id: remove_fdset(qmp, fdset_id, disk.id, layer),
    )
    for node in disk.layer_nodes(layer, f"/dev/fdset/{fdset}", backing=backing):
        _add_node(qmp, forward, steps, disk.id, node)
    return fdset


def _add_node(qmp: QMPMonitor, forward: QMPMonitor, steps: Steps, disk_id: str, node: dict[str, Any]) -> None:
    name = node["node-name"]
    steps.run(
        f"blockdev-add {name}",
        lambda: forward.execute("blockdev-add", node),
        lambda _: delete_disk_nodes(qmp, disk_id, only={name}),
    )


def unplug_disk(
    qmp: QMPMonitor, log: Any, *, disk_id: str, encrypted: bool = False, timeout: float | Deadline = 30.0
) -> None:
    """Remove the device (waiting for the guest to release it), then its nodes and fdset (and
    an ``encrypted`` disk's secret object), all within ``timeout``.

    Idempotent: parts already gone are skipped. If the guest does not release the device in
    time, ``HotplugError`` says what remains and a later call finishes the job.
    """
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    bound = log.bind(disk=disk_id)
    # QEMU may send DEVICE_DELETED before device_del's reply, so remove_device subscribes first. It
    # first sends one for the virtio backend path (no "device" field), then the one for our id.
    try:
        remove_device(qmp, disk_id, limit, kind="disk")
    except HotplugError as exc:  # name the nodes too (only looked up when it matters)
        nodes = tuple(f"node {n}" for n in disk_nodes(qmp, disk_id))
        raise HotplugError(str(exc).split(";")[0], remaining=(*exc.remaining, *nodes)) from None
    delete_disk_nodes(forward, disk_id)
    remove_disk_fdsets(forward, disk_id)
    if encrypted:
        remove_object(forward, secret_object_id(disk_id))
    bound.info("disk.unplugged")


def disk_nodes(qmp: QMPMonitor, disk_id: str) -> list[str]:
    return [name for name in block_nodes(qmp) if is_disk_node(name, disk_id)]


def delete_disk_nodes(qmp: QMPMonitor, disk_id: str, *, only: set[str] | None = None) -> None:
    """blockdev-del this disk's nodes (or just ``only``), users before what they use: a node
    still in use (a backing or protocol node) is retried after the nodes above it are gone. A
    device that has just gone may hold its node a moment longer: that is waited out (bounded)."""
    deadline = time.monotonic() + NODE_RELEASE_TIMEOUT
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
            except CommandTimeout:
                deleted = True  # it may have gone: the next round asks
        if time.monotonic() >= deadline:
            raise HotplugError(f"cannot delete the block nodes of disk {disk_id}", remaining=tuple(remaining))
        if not deleted:
            time.sleep(0.05)


def remove_disk_fdsets(qmp: QMPMonitor, disk_id: str, *, layers: set[int] | None = None) -> None:
    """remove-fd the fdsets of this disk's layers (all of them, or just ``layers``)."""
    wanted = {fdset_tag(disk_id, layer) for layer in layers} if layers is not None else None

    def mine() -> list[int]:
        return [
            int(fdset["fdset-id"])
            for fdset in ask(qmp, "query-fdsets")
            if any(
                o in wanted if wanted is not None else is_disk_fdset(o, disk_id)
                for o in (fd.get("opaque") for fd in fdset.get("fds", ()))
            )
        ]

    for attempt in range(2):  # a remove-fd that failed or whose reply was late: once more
        try:
            for fdset_id in mine():
                qmp.execute("remove-fd", {"fdset-id": fdset_id})
            return
        except (CommandError, CommandTimeout):
            if attempt:
                raise


def remove_fdset(qmp: QMPMonitor, fdset_id: int | None, disk_id: str, layer: int) -> None:
    """Undo an add-fd: the fdset it made, or (when its reply never came) the layer's fdset by tag."""
    if fdset_id is None:
        remove_disk_fdsets(qmp, disk_id, layers={layer})
    else:
        qmp.execute("remove-fd", {"fdset-id": fdset_id})


def set_throttle(qmp: QMPMonitor, *, disk_id: str, throttle: Throttle, bus: DiskBus = "virtio-blk") -> None:
    # A virtio-blk disk's block backend hangs off the virtio device inside the PCI proxy that
    # carries the id; a SCSI disk holds it itself.
    device_path = f"/machine/peripheral/{disk_id}" + ("/virtio-backend" if bus == "virtio-blk" else "")
    qmp.execute("block_set_io_throttle", {"id": device_path, **throttle.arguments()})


def resize_disk(qmp: QMPMonitor, log: Any, *, disk: DiskSpec, size: int, allow_shrink: bool = False) -> int:
    """Grow the disk's active image to ``size`` bytes (the guest is told); returns the old size."""
    disk_id = disk.id
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 512:
        raise InvalidArgument(f"disk {disk_id}: size must be a positive multiple of 512 bytes, not {size!r}")
    format_node = disk.active_node
    nodes = block_nodes(qmp)
    if format_node not in nodes:
        raise InvalidArgument(f"disk {disk_id} has no block node {format_node} (was it hotplugged by vmctl?)")
    current = int(nodes[format_node]["image"]["virtual-size"])
    if size < current and not allow_shrink:
        raise InvalidArgument(f"disk {disk_id}: {size} bytes would shrink it from {current} (allow_shrink=True)")
    execute_checked(
        qmp,
        "block_resize",
        {"node-name": format_node, "size": size},
        took=lambda: int(block_nodes(qmp)[format_node]["image"]["virtual-size"]) == size,
    )
    log.bind(disk=disk_id).info("disk.resized", old=current, new=size)
    return current
