"""Backups under fault on the fake: every command of a full and an incremental backup, failed each
way QEMU fails it (an error, a late reply, a dropped connection).

A backup either completes (its file, its checkpoint, nothing else left) or leaves QEMU and the
directory as they were before it: no job, no target node or fdset, no bitmap copy, no checkpoint
of its own, no file; the earlier checkpoint is whole. After a dropped connection nothing can be
cleaned on that connection: the next attach settles the journal's entry (``journal`` is run here
as an attach runs it) and then the same holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_fault_matrix_fake import FAULTS, LOG, OP_TIMEOUT, World, _stub_image
from vmctl.errors import VmctlError
from vmctl.model import DiskSpec, Inventory
from vmctl.ops import backup as backup_ops
from vmctl.testing.faults import Fault, inject, record
from vmctl.vm import journal
from vmctl.vm.backups import BackupJob
from vmctl.vm.journal import Intent

DISK = DiskSpec(id="vda", path="/images/boot.qcow2")  # the model's boot disk


def _stub_target(path: str | Path, size: int, **options: object) -> None:
    _stub_image(Path(path), size)


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[World]:
    monkeypatch.setattr(backup_ops, "create_image", _stub_target)
    with World(tmp_path / "vm") as world:
        yield world


def backup(world: World, checkpoint: str, since: str | None) -> None:
    backup_ops.check_request(world.monitor, [DISK], world.dir, checkpoint=checkpoint, since=since)
    jobs, files = backup_ops.start_backup(world.monitor, LOG, [DISK], world.dir, checkpoint=checkpoint, since=since)
    BackupJob(
        qmp=world.monitor, log=LOG, jobs=jobs, disks=[DISK], files=files, checkpoint=checkpoint, since=since,
        started=0.0, on_end=lambda: None,
    ).wait(OP_TIMEOUT)  # fmt: skip


def commands_of_a_clean_run(tmp_path: Path, since: str | None) -> int:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backup_ops, "create_image", _stub_target)
        with World(tmp_path / "clean") as world:
            if since is not None:
                backup(world, since, None)
            with record(world.monitor) as clean:
                backup(world, "new", since)
            return len(clean.commands)


@pytest.mark.parametrize("since", [None, "c0"], ids=["full", "incremental"])
def test_a_backup_under_fault_completes_or_leaves_everything_as_it_was(
    world: World, tmp_path: Path, since: str | None
) -> None:
    if since is not None:
        backup(world, since, None)  # the checkpoint the incremental is from, made without faults
    commands = commands_of_a_clean_run(tmp_path, since)
    assert commands >= 8
    for fault in FAULTS:
        for at in range(1, commands + 1):
            before = world.state()
            name = f"{fault.value}{at}"
            with inject(world.monitor, fault, at=at) as injection:
                try:
                    backup(world, name, since)
                    failed: VmctlError | None = None
                except VmctlError as exc:
                    failed = exc
            where = f"{fault.value} at {at} ({injection.failed}): {failed}"
            if fault is Fault.DROP and failed is not None:
                world.reconnect()  # the next control plane's attach settles what the journal holds
                files = (str(backup_ops.target_path(world.dir, DISK, name)),)
                intent = Intent(operation="backup", checkpoint=name, disk_ids=(DISK.id,), files=files)
                journal.settle(world.monitor, intent, Inventory(disks=(DISK,)))
            world.settle()
            after = world.state()
            assert after["jobs"] == () and not [n for n in after["nodes"] if "-o999-" in n], where
            if failed is None:
                assert ("vda-fmt", backup_ops.checkpoint_bitmap(name)) in after["bitmaps"], where
                assert backup_ops.target_path(world.dir, DISK, name).exists(), where
                backup_ops.remove_checkpoint(world.monitor, [DISK], name)  # back to the state before
                backup_ops.target_path(world.dir, DISK, name).unlink()
                after = world.state()
            assert after == before, where
