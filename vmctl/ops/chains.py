"""A disk's backing chain: external snapshots in one transaction, commit, stream and mirror.

Every layer the control plane adds is a file it creates and opens itself, passed to QEMU by fd
(add-fd, /dev/fdset/N) like a hotplugged disk. Jobs write the real paths of backing files into
image headers (``backing-file``), never /dev/fdset names. Each operation returns the disk's new
:class:`~vmctl.model.DiskSpec` for the inventory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Literal

import attrs

from vmctl.errors import (
    AgentError,
    CommandTimeout,
    ConnectionLost,
    HotplugError,
    InvalidArgument,
    OutcomeUnknown,
    QMPError,
    SnapshotError,
)
from vmctl.model import DiskSpec, Overlay
from vmctl.model.names import disk_node_names
from vmctl.model.secret import Secret
from vmctl.ops.blockjobs import Job
from vmctl.ops.disks import add_layer, delete_disk_nodes, remove_disk_fdsets
from vmctl.ops.nodes import block_nodes
from vmctl.ops.queries import ask
from vmctl.ops.rollback import Steps
from vmctl.qmp import QMPMonitor

MirrorSync = Literal["full", "top"]

#: qemu-img dies with the thread that runs it (util-linux's setpriv sets its parent-death
#: signal): an image it finished after a control plane's crash would be a file no journal knows.
_DIES_WITH_US = ("setpriv", "--pdeathsig", "KILL", "--") if shutil.which("setpriv") else ()


def virtual_size(qmp: QMPMonitor, node: str) -> int:
    entry = block_nodes(qmp).get(node)
    if entry is None:
        raise InvalidArgument(f"no block node {node}")
    return int(entry["image"]["virtual-size"])


def staging_path(path: str | os.PathLike[str]) -> str:
    """Where a new image is made before it is renamed into place (see ``create_image``)."""
    final = Path(path)
    return str(final.with_name(f".{final.name}.vmctl-new"))


#: qemu-img create: how often it is tried, and for how long each time.
_CREATE_ATTEMPTS = 8
_CREATE_TIMEOUT = 120.0
_UNTIMED = "Unable to get accurate CPU usage"
#: QEMU's own default for LUKS's key derivation time (``encrypt.iter-time``).
LUKS_KEY_DERIVATION_MS = 2000


def create_image(
    path: str | os.PathLike[str],
    size: int,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str = "",
    encryption: Secret | None = None,
    key_derivation_ms: int = LUKS_KEY_DERIVATION_MS,
) -> None:
    """Make an image of ``size`` bytes with ``qemu-img``: a ``backing`` overlay, or an
    ``encryption``-protected qcow2 (LUKS; the passphrase reaches qemu-img through a memfd, never
    its command line). ``InvalidArgument`` with qemu-img's message if it cannot.

    ``key_derivation_ms`` is how long LUKS's key derivation (PBKDF2) takes on this host: paid
    again at every open of the image, and what a guess at the passphrase costs. QEMU's default
    of 2 s is the floor for real data; a throwaway image opened many times can take less.

    The image is made under a staging name and renamed into place once qemu-img is done: a
    qemu-img that outlives a killed control plane (it may, in the moment before its parent-death
    signal is set) can then finish only the staging file, never the image a journal looks for."""
    command = [*_DIES_WITH_US, "qemu-img", "create", "-q", "-f", fmt]
    if backing is not None:
        # -u: the backing file is in use by QEMU; its size is given, so it need not be opened.
        command += ["-b", backing, "-F", backing_fmt, "-u"]
    passphrase = -1
    if encryption is not None:
        if isinstance(key_derivation_ms, bool) or not isinstance(key_derivation_ms, int) or key_derivation_ms < 1:
            raise InvalidArgument(
                f"key_derivation_ms must be a positive number of milliseconds, not {key_derivation_ms!r}"
            )
        if fmt != "qcow2":
            raise InvalidArgument(f"cannot create {path}: encryption is for qcow2 images, not {fmt}")
        passphrase = os.memfd_create("vmctl-passphrase", os.MFD_CLOEXEC)
        os.write(passphrase, encryption.reveal())
        command += [
            "--object", f"secret,id=vmctl-passphrase,format=raw,file=/proc/self/fd/{passphrase}",
            "-o", f"encrypt.format=luks,encrypt.key-secret=vmctl-passphrase,encrypt.iter-time={key_derivation_ms}",
        ]  # fmt: skip
    staging = staging_path(path)
    try:
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                result = subprocess.run(
                    [*command, staging, str(size)],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=_CREATE_TIMEOUT,
                    pass_fds=(passphrase,) if passphrase >= 0 else (),
                )
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                raise InvalidArgument(f"cannot create {path}: qemu-img took over {_CREATE_TIMEOUT:g}s") from None
            # LUKS times its key derivation on the CPU; on a busy host the measurement can fail
            # (the thread's CPU time reads 0 ms). It failed 3 times in a row with both cores
            # busy: the next try waits a little longer each time for the load to move.
            if result.returncode == 0 or _UNTIMED not in result.stderr or attempt == _CREATE_ATTEMPTS - 1:
                break
            time.sleep(0.1 * (attempt + 1))
    finally:
        if passphrase >= 0:
            os.close(passphrase)
    if result.returncode != 0:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise InvalidArgument(f"cannot create {path}: {result.stderr.strip()}")
    os.rename(staging, path)


def _create_overlay(path: Path, size: int, disk: DiskSpec, below: int) -> None:
    """A new qcow2 on the disk's layer ``below``, encrypted as the disk is."""
    backing, backing_fmt = disk.layer_path(below), disk.layer_format(below)
    create_image(path, size, backing=backing, backing_fmt=backing_fmt, encryption=disk.encryption)


def _add_layer(qmp: QMPMonitor, steps: Steps, disk: DiskSpec, layer: int, *, backing: str | None) -> str:
    """Open ``disk``'s layer ``layer`` (the disk as it is with that layer in its chain) as QEMU
    will open it (QEMU >= 9.1 matches O_DIRECT against the fds of a set) and add it as hotplug
    adds a disk: the layer keeps the disk's cache mode, aio, discard, read-only and encryption.
    Returns the layer's format node."""
    fd = os.open(disk.layer_path(layer), disk.open_flags())
    try:
        add_layer(qmp, steps, disk, layer, fd, backing=backing)
    finally:
        os.close(fd)  # QEMU holds its own copy in the fdset
    return disk_node_names(disk.id, layer)[1]


def snapshot_disks(
    qmp: QMPMonitor,
    log: Any,
    disks: Sequence[DiskSpec],
    overlays: Mapping[str, str | os.PathLike[str]],
    *,
    bitmap: str | None = None,
    bitmap_granularity: int | None = None,
    quiesce: Callable[[], AbstractContextManager[Any]] | None = None,
) -> list[DiskSpec]:
    """External snapshots of ``disks``, switched atomically in one ``transaction``; with
    ``quiesce`` (the guest agent's freeze), inside it: the guest is held only for the switch.

    ``overlays`` maps each disk id to the path of its new qcow2 overlay (created here if missing,
    with the current top image as its backing file). With ``bitmap``, a persistent dirty bitmap
    of that name starts on each overlay in the same transaction. If anything fails, no disk
    changes and every node, fdset and file this call created is removed.
    """
    if not disks:
        raise InvalidArgument("snapshot_disks needs at least one disk")
    missing = [d.id for d in disks if d.id not in overlays]
    if missing:
        raise InvalidArgument(f"no overlay path given for {', '.join(missing)}")
    created: list[Path] = []
    actions: list[dict[str, Any]] = []
    updated: list[DiskSpec] = []
    try:
        with Steps(log) as steps:
            for disk in disks:
                planned = disk.with_overlay(overlays[disk.id])
                layer = planned.layers[-1]
                path = Path(planned.layer_path(layer))
                if not path.exists():
                    top = disk.layers[-1]
                    size = virtual_size(qmp, disk.active_node)
                    _create_overlay(path, size, disk, top)
                    created.append(path)
                # No backing yet: blockdev-snapshot attaches the active layer below it.
                overlay_node = _add_layer(qmp, steps, planned, layer, backing=None)
                actions.append(
                    {"type": "blockdev-snapshot", "data": {"node": disk.active_node, "overlay": overlay_node}}
                )
                if bitmap is not None:
                    data: dict[str, Any] = {"node": overlay_node, "name": bitmap, "persistent": True}
                    if bitmap_granularity is not None:
                        data["granularity"] = bitmap_granularity
                    actions.append({"type": "block-dirty-bitmap-add", "data": data})
                updated.append(planned)

            def switch() -> None:
                with quiesce() if quiesce is not None else contextlib.nullcontext():
                    _switch(qmp, actions, updated)

            steps.run("transaction", switch)
    except (QMPError, InvalidArgument, OSError, AgentError) as exc:
        names = ", ".join(d.id for d in disks)
        if isinstance(exc, (ConnectionLost, OutcomeUnknown)):  # it may have switched: keep every file
            raise SnapshotError(
                f"whether the snapshot of {names} switched is unknown ({exc}); the journal settles it "
                "(vm.leftovers, or the next attach)",
                remaining=(*steps.leftovers, *(f"file {path}" for path in created)),
            ) from exc
        for path in created:
            with contextlib.suppress(OSError):
                path.unlink()
        if isinstance(exc, InvalidArgument):
            raise
        changed = "" if steps.leftovers else "; nothing changed"
        raise SnapshotError(
            f"the snapshot of {names} failed{changed}: {exc}", remaining=tuple(steps.leftovers)
        ) from exc
    log.info("disks.snapshotted", disks=[d.id for d in updated], bitmap=bitmap)
    return updated


def _switch(qmp: QMPMonitor, actions: list[dict[str, Any]], disks: list[DiskSpec]) -> None:
    """Run the snapshot's transaction. It is atomic, so when its reply comes too late, the
    devices tell whether it ran: every disk on its new overlay, or none."""
    try:
        qmp.execute("transaction", {"actions": actions})
    except CommandTimeout as late:
        try:
            switched = all(device_node(qmp, disk.id) == disk.active_node for disk in disks)
        except QMPError as exc:
            raise OutcomeUnknown(f"the snapshot's transaction replied too late, and then: {exc}") from late
        if not switched:
            raise


def device_node(qmp: QMPMonitor, disk_id: str) -> str | None:
    """The format node a disk's device reads and writes now."""
    # QEMU names the device by its id when it has one (a scsi-hd), else by its QOM path (the
    # virtio-blk device inside the PCI proxy that has the id).
    for block in ask(qmp, "query-block"):
        qdev = str(block.get("qdev", ""))
        if qdev in (disk_id, f"/machine/peripheral/{disk_id}") or qdev.startswith(f"/machine/peripheral/{disk_id}/"):
            inserted = block.get("inserted") or {}
            return str(inserted.get("node-name")) if inserted else None
    return None


def start_commit(
    qmp: QMPMonitor, log: Any, disk: DiskSpec, *, top: int | None = None, base: int | None = None
) -> tuple[Job, DiskSpec]:
    """Commit layers ``top`` (default: the active one) down into ``base`` (default: the base image).

    Returns the job and the disk as it will be once the job succeeds. An active commit (top is
    the active layer) reaches READY and pivots on ``job.complete()``; an intermediate one ends
    by itself. The committed layers' nodes and fdsets are removed when the job succeeds.
    """
    layers = disk.layers
    top_layer = layers[-1] if top is None else top
    base_layer = layers[0] if base is None else base
    if top_layer not in layers or base_layer not in layers or layers.index(top_layer) <= layers.index(base_layer):
        raise InvalidArgument(f"disk {disk.id}: cannot commit layer {top_layer} into {base_layer} (layers {layers})")
    dropped = layers[layers.index(base_layer) + 1 : layers.index(top_layer) + 1]
    kept_overlays = tuple(o for o in disk.overlays if o.layer not in dropped)
    result = attrs.evolve(disk, overlays=kept_overlays)
    arguments: dict[str, Any] = {
        "job-id": f"{disk.id}-commit",
        "device": disk.active_node,
        "base-node": disk_node_names(disk.id, base_layer)[1],
    }
    if top_layer != layers[-1]:
        # The layer above ``top`` gets a new backing file: write its real path, not /dev/fdset/N.
        arguments["top-node"] = disk_node_names(disk.id, top_layer)[1]
        arguments["backing-file"] = disk.layer_path(base_layer)
    job = Job.start(qmp, log, "block-commit", arguments, job_type="commit")
    job.on_success(lambda: _drop_layers(qmp, disk, dropped))
    return job, result


def start_stream(qmp: QMPMonitor, log: Any, disk: DiskSpec, *, base: int | None = None) -> tuple[Job, DiskSpec]:
    """Pull the data of the layers below the active one (down to ``base``, exclusive) into it."""
    layers = disk.layers
    if len(layers) < 2:
        raise InvalidArgument(f"disk {disk.id} has no backing layers to stream")
    if base is not None and (base not in layers[:-1]):
        raise InvalidArgument(f"disk {disk.id}: {base} is not a layer below the active one ({layers})")
    top = layers[-1]
    arguments: dict[str, Any] = {"job-id": f"{disk.id}-stream", "device": disk.active_node}
    if base is None:
        dropped = layers[:-1]
        result = attrs.evolve(disk, path=disk.layer_path(top), format="qcow2", base_layer=top, overlays=())
    else:
        dropped = layers[layers.index(base) + 1 : -1]
        arguments["base-node"] = disk_node_names(disk.id, base)[1]
        arguments["backing-file"] = disk.layer_path(base)
        result = attrs.evolve(disk, overlays=tuple(o for o in disk.overlays if o.layer not in dropped))
    job = Job.start(qmp, log, "block-stream", arguments, job_type="stream")
    job.on_success(lambda: _drop_layers(qmp, disk, dropped))
    return job, result


def start_mirror(
    qmp: QMPMonitor,
    log: Any,
    disk: DiskSpec,
    target: str | os.PathLike[str],
    *,
    sync: MirrorSync = "full",
    fmt: Literal["qcow2", "raw"] = "qcow2",
) -> tuple[Job, DiskSpec]:
    """Mirror the disk to a new image at ``target`` while the guest runs.

    ``sync="full"`` copies the whole chain into a standalone image; ``"top"`` copies only the
    active layer onto a qcow2 that keeps the layers below as its backing. Wait for READY, then
    ``job.complete()`` pivots the guest onto the target, or ``job.cancel()`` keeps the source.
    """
    if sync not in ("full", "top"):
        raise InvalidArgument(f"mirror sync must be full or top, not {sync!r}")
    if fmt not in ("qcow2", "raw"):
        raise InvalidArgument(f"mirror format must be qcow2 or raw, not {fmt!r}")
    top_only = sync == "top" and len(disk.layers) > 1
    if top_only and fmt != "qcow2":
        raise InvalidArgument("a top-only mirror needs a qcow2 target (it keeps a backing file)")
    path = Path(target).resolve()
    if path.exists():
        raise InvalidArgument(f"mirror target {path} exists already")
    layer = disk.next_layer()
    below = disk.layers[-2] if top_only else None
    size = virtual_size(qmp, disk.active_node)
    if disk.encryption is not None and fmt != "qcow2":  # a raw copy would hold the guest's data in clear
        raise InvalidArgument(f"disk {disk.id} is encrypted: mirror it to a qcow2 target (encrypted too)")
    if below is not None:
        _create_overlay(path, size, disk, below)
    else:
        create_image(path, size, fmt=fmt, encryption=disk.encryption)
    if top_only:
        result = attrs.evolve(disk, overlays=(*disk.overlays[:-1], Overlay(layer=layer, path=path)))
        replaced = [disk.layers[-1]]
    else:
        result = attrs.evolve(disk, path=str(path), format=fmt, base_layer=layer, overlays=())
        replaced = disk.layers
    try:
        with Steps(log) as steps:
            backing = disk_node_names(disk.id, below)[1] if below is not None else None
            target_node = _add_layer(qmp, steps, result, layer, backing=backing)
            job = steps.run(
                "blockdev-mirror",
                lambda: Job.start(
                    qmp,
                    log,
                    "blockdev-mirror",
                    {"job-id": f"{disk.id}-mirror", "device": disk.active_node, "target": target_node, "sync": sync},
                    job_type="mirror",
                ),
            )
    except QMPError as exc:
        remaining = tuple(steps.leftovers)
        if remaining or isinstance(exc, (ConnectionLost, OutcomeUnknown)):  # a mirror may write to it
            remaining = (*remaining, f"file {path}")
        else:
            with contextlib.suppress(OSError):
                path.unlink()
        raise HotplugError(f"the mirror of disk {disk.id} could not start: {exc}", remaining=remaining) from exc
    job.on_success(lambda: _drop_layers(qmp, disk, replaced))
    job.on_failure(lambda: _drop_layers(qmp, disk, [layer]))
    return job, result


def _drop_layers(qmp: QMPMonitor, disk: DiskSpec, layers: Sequence[int]) -> None:
    """Delete the nodes and fdsets of layers that left the chain."""
    nodes = {name for layer in layers for name in disk_node_names(disk.id, layer)}
    delete_disk_nodes(qmp, disk.id, only=nodes)
    remove_disk_fdsets(qmp, disk.id, layers=set(layers))
