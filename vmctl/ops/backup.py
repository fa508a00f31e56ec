"""Push-mode backups: every disk's state at one instant, copied into a qcow2 file per disk.

One transaction starts it all, so the instant is the same for every disk and for the new
checkpoint: each disk gets the checkpoint's persistent dirty bitmap (it records every write from
this instant on, in the qcow2 image) and a ``blockdev-backup`` job onto its target file. The job
copies before the guest overwrites (copy-before-write), so the file holds the disk exactly as it
was at the instant, whatever the guest writes meanwhile.

An incremental backup ``since`` an earlier checkpoint copies only the clusters that checkpoint's
bitmap marks, through a disabled copy of it made in the same transaction (``sync=bitmap``,
``bitmap-mode=never``): the earlier checkpoint goes on recording, so a backup that fails or is
cancelled loses no change (the next one since the same checkpoint holds them all), and the
failed one's own checkpoint is removed. The target's nodes are the disk's own rendering
(``DiskSpec.layer_nodes``: its cache mode, aio and encryption), on a layer number kept for
backups.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

from vmctl.errors import DeviceExists, InvalidArgument, QMPError
from vmctl.model import DiskSpec
from vmctl.model.backup import check_checkpoint_name
from vmctl.model.names import disk_node_names
from vmctl.ops.bitmaps import bitmaps
from vmctl.ops.blockjobs import Job
from vmctl.ops.chains import create_image, virtual_size
from vmctl.ops.disks import add_layer, delete_disk_nodes, remove_disk_fdsets
from vmctl.ops.rollback import Steps
from vmctl.qmp import QMPMonitor

#: The layer number a backup's target is added under (its node names: ``<disk>-o999-*``).
BACKUP_LAYER: Final = 999
#: A checkpoint is a bitmap of this name on every disk it covers.
CHECKPOINT_PREFIX: Final = "vmctl-ckpt-"
#: The disabled copy of the ``since`` checkpoint an incremental backup reads.
_SINCE_COPY: Final = "vmctl-backup-since"


def checkpoint_bitmap(name: str) -> str:
    return f"{CHECKPOINT_PREFIX}{name}"


def checkpoints(qmp: QMPMonitor, disks: Sequence[DiskSpec]) -> list[str]:
    """The checkpoints every one of ``disks`` has, by name."""
    per_disk = [
        {b.name.removeprefix(CHECKPOINT_PREFIX) for b in bitmaps(qmp, disk) if b.name.startswith(CHECKPOINT_PREFIX)}
        for disk in disks
    ]
    return sorted(set.intersection(*per_disk)) if per_disk else []


def target_path(dest_dir: Path, disk: DiskSpec, checkpoint: str) -> Path:
    return dest_dir / f"{disk.id}.{checkpoint}.qcow2"


def target_node(disk: DiskSpec) -> str:
    return disk_node_names(disk.id, BACKUP_LAYER)[1]


def job_id(disk: DiskSpec) -> str:
    return f"{disk.id}-backup"


def check_request(
    qmp: QMPMonitor, disks: Sequence[DiskSpec], dest_dir: Path, *, checkpoint: str, since: str | None
) -> None:
    """Every refusal before anything is made or sent."""
    check_checkpoint_name(checkpoint)
    if not disks:
        raise InvalidArgument("a backup needs at least one disk")
    if not dest_dir.is_dir():
        raise InvalidArgument(f"backup destination {dest_dir} is not a directory")
    have = checkpoints(qmp, disks)
    for disk in disks:
        if disk.format == "raw" and not disk.overlays:
            raise InvalidArgument(f"disk {disk.id} is raw: its checkpoints need qcow2 (persistent bitmaps)")
        if target_path(dest_dir, disk, checkpoint).exists():
            raise InvalidArgument(f"{target_path(dest_dir, disk, checkpoint)} exists already")
    if checkpoint in have or any(b.name == checkpoint_bitmap(checkpoint) for d in disks for b in bitmaps(qmp, d)):
        raise DeviceExists(f"checkpoint {checkpoint!r} exists already")
    if since is not None and since not in have:
        raise InvalidArgument(
            f"no checkpoint {since!r} on every disk backed up (there are: {', '.join(have) or 'none'})"
        )


def start_backup(
    qmp: QMPMonitor,
    log: Any,
    disks: Sequence[DiskSpec],
    dest_dir: Path,
    *,
    checkpoint: str,
    since: str | None,
    bandwidth: int | None = None,
    frozen: Any = None,
) -> tuple[list[Job], dict[str, str]]:
    """For a request ``check_request`` has passed (its caller journals it in between): make each
    disk's target file, add it, and start every job and the checkpoint in one transaction (inside
    ``frozen``, a context that quiesces the guest, if given). Returns the jobs and the files. On
    failure nothing is left: files, nodes and bitmaps go again."""
    files = {disk.id: str(target_path(dest_dir, disk, checkpoint)) for disk in disks}
    actions: list[dict[str, Any]] = []
    with Steps(log.bind(checkpoint=checkpoint)) as steps:
        for disk in disks:
            _add_target(qmp, steps, disk, files[disk.id])
            actions += _actions(disk, checkpoint=checkpoint, since=since, bandwidth=bandwidth)
        transaction = {"actions": actions}
        with frozen() if frozen is not None else contextlib.nullcontext():
            jobs = steps.run(
                "transaction",
                lambda: Job.all_started_by(
                    qmp, log, "transaction", transaction, [job_id(d) for d in disks], job_type="backup"
                ),
                lambda _: _drop_bitmaps(qmp, disks, checkpoint),
            )
    return jobs, files


def _add_target(qmp: QMPMonitor, steps: Steps, disk: DiskSpec, path: str) -> None:
    """The target file, as big as the disk (encrypted as it is), added as the disk renders a layer."""
    steps.run(
        f"create {path}",
        lambda: create_image(path, virtual_size(qmp, disk.active_node), encryption=disk.encryption),
        lambda _: _unlink(path),
    )
    fd = os.open(path, disk.open_flags())
    try:
        add_layer(qmp, steps, disk, BACKUP_LAYER, fd)
    finally:
        os.close(fd)


def finish(qmp: QMPMonitor, disks: Sequence[DiskSpec], checkpoint: str, *, succeeded: bool) -> None:
    """After the jobs: the since-copy and the target nodes go; a backup that did not succeed takes
    its checkpoint with it (the earlier ones hold every change). Every step is tried, and a step
    that failed once more (each looks before it acts), so that one refused or late command leaves
    nothing behind; what still fails is raised, for the journal to settle."""
    steps: list[Callable[[], None]] = []
    for disk in disks:
        steps.append(functools.partial(_remove_bitmap_if_there, qmp, disk, _SINCE_COPY))
        if not succeeded:
            steps.append(functools.partial(_remove_bitmap_if_there, qmp, disk, checkpoint_bitmap(checkpoint)))
        names = set(disk_node_names(disk.id, BACKUP_LAYER))
        steps.append(functools.partial(delete_disk_nodes, qmp, disk.id, only=names))
        steps.append(functools.partial(remove_disk_fdsets, qmp, disk.id, layers={BACKUP_LAYER}))
    failures: list[QMPError] = []
    for _ in range(2):
        failed, failures = [], []
        for step in steps:
            try:
                step()
            except QMPError as exc:
                failed.append(step)
                failures.append(exc)
        steps = failed
        if not steps:
            return
    raise failures[0]


def remove_checkpoint(qmp: QMPMonitor, disks: Sequence[DiskSpec], name: str) -> None:
    check_checkpoint_name(name)
    if name not in checkpoints(qmp, disks):
        raise InvalidArgument(f"no checkpoint {name!r}")
    for disk in disks:
        _remove_bitmap_if_there(qmp, disk, checkpoint_bitmap(name))


def _actions(disk: DiskSpec, *, checkpoint: str, since: str | None, bandwidth: int | None) -> list[dict[str, Any]]:
    node = disk.active_node
    actions: list[dict[str, Any]] = [
        {
            "type": "block-dirty-bitmap-add",
            "data": {"node": node, "name": checkpoint_bitmap(checkpoint), "persistent": True},
        }
    ]
    backup: dict[str, Any] = {
        "job-id": job_id(disk),
        "device": node,
        "target": target_node(disk),
        "sync": "full",
        "auto-dismiss": False,
    }
    if since is not None:
        copy = {"node": node, "name": _SINCE_COPY, "persistent": False, "disabled": True}
        merge = {"node": node, "target": _SINCE_COPY, "bitmaps": [checkpoint_bitmap(since)]}
        actions += [
            {"type": "block-dirty-bitmap-add", "data": copy},
            {"type": "block-dirty-bitmap-merge", "data": merge},
        ]
        backup.update(sync="bitmap", bitmap=_SINCE_COPY, **{"bitmap-mode": "never"})
    if bandwidth is not None:
        backup["speed"] = bandwidth
    return [*actions, {"type": "blockdev-backup", "data": backup}]


def _drop_bitmaps(qmp: QMPMonitor, disks: Sequence[DiskSpec], checkpoint: str) -> None:
    for disk in disks:
        _remove_bitmap_if_there(qmp, disk, checkpoint_bitmap(checkpoint))
        _remove_bitmap_if_there(qmp, disk, _SINCE_COPY)


def _remove_bitmap_if_there(qmp: QMPMonitor, disk: DiskSpec, name: str) -> None:
    if any(b.name == name for b in bitmaps(qmp, disk)):
        qmp.execute("block-dirty-bitmap-remove", {"node": disk.active_node, "name": name})


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
