"""Backups on real QEMU with real data: full and incremental, restored byte for byte, at one instant."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import VMFactory, make_image
from integration.versions import BACKUP
from vmctl import VM, Backup, DiskSpec, restore_disk
from vmctl.errors import BlockJobError
from vmctl.testing import GuestShell

pytestmark = pytest.mark.versioned(BACKUP)

MIB = 1 << 20
SIZE = 32 * MIB


@pytest.fixture
def out(tmp_path: Path) -> Path:
    """Where the backups go."""
    path = tmp_path / "backups"
    path.mkdir()
    return path


@pytest.fixture
def vm(vms: VMFactory, tmp_path: Path) -> Iterator[VM]:
    image = make_image(tmp_path / "data.qcow2", "qcow2", "32M")
    yield vms.launch(vms.spec(disks=[DiskSpec(id="d1", path=image)]))


def write_random(shell: GuestShell, mib: int, *, seek: int = 0) -> None:
    """The guest writes ``mib`` MiB of random data to its disk from MiB ``seek`` on, to the disk itself."""
    shell.run(f"head -c {mib * MIB} /dev/urandom | dd of=/dev/vda bs=1M seek={seek} conv=fsync 2>/dev/null", check=True)


def device_sum(shell: GuestShell) -> str:
    return shell.run("sha256sum /dev/vda").output.split()[0]


def file_sum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def restored_sum(chain: list[Backup], tmp_path: Path) -> str:
    """The sha256 of disk d1 rebuilt from a full backup and the incrementals after it."""
    restored = tmp_path / "restored.raw"
    restore_disk([backup.files["d1"] for backup in chain], restored, format="raw")
    try:
        return file_sum(restored)
    finally:
        restored.unlink()


def allocated(path: Path) -> int:
    """Bytes of guest data the image holds itself (``qemu-img map``), not reading through."""
    done = subprocess.run(["qemu-img", "map", "--output=json", str(path)], capture_output=True, text=True, check=True)
    return sum(e["length"] for e in json.loads(done.stdout) if e["data"] and e.get("depth", 0) == 0)


def test_a_full_and_an_incremental_backup_restore_the_disk_exactly(vm: VM, out: Path, tmp_path: Path) -> None:
    with GuestShell(vm) as shell:
        write_random(shell, 32)
        full = vm.backup(out, checkpoint="c1").wait(120)
        assert (full.since, set(full.files)) == (None, {"d1"})
        assert vm.checkpoints() == ["c1"]
        write_random(shell, 4, seek=8)
        incremental = vm.backup(out, since="c1", checkpoint="c2").wait(120)
        expected = device_sum(shell)
    assert incremental.since == "c1" and vm.checkpoints() == ["c1", "c2"]
    changed = allocated(Path(incremental.files["d1"]))
    assert 4 * MIB <= changed <= 4 * MIB + 2 * 65536, changed  # the rewritten clusters, not the disk
    assert restored_sum([full, incremental], tmp_path) == expected


def test_a_backup_holds_the_disk_as_it_was_when_it_began(vm: VM, out: Path, tmp_path: Path) -> None:
    with GuestShell(vm) as shell:
        shell.run("head -c 33554432 /dev/zero | tr '\\0' A | dd of=/dev/vda bs=1M conv=fsync 2>/dev/null", check=True)
        job = vm.backup(out, checkpoint="c1", bandwidth=MIB)  # 32 s at the least
        write_random(shell, 32)
        progress = job.progress()
        assert progress and progress[0].status == "running", "the backup ended before the guest overwrote the disk"
        job.set_bandwidth(0)
        backup = job.wait(120)
    restored = tmp_path / "restored.raw"
    restore_disk([backup.files["d1"]], restored, format="raw")
    assert restored.read_bytes() == b"A" * SIZE


def test_a_failed_incremental_loses_no_change_and_leaves_no_checkpoint(vm: VM, out: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        with GuestShell(vm) as shell:
            write_random(shell, 32)
            full = vm.backup(out, checkpoint="c1").wait(120)
            write_random(shell, 8, seek=4)
            with pytest.raises(BlockJobError):
                vm.backup(small, since="c1", checkpoint="failed").wait(120)  # 8 MiB into 2 MiB
            assert vm.checkpoints() == ["c1"] and list(small.iterdir()) == []
            write_random(shell, 1, seek=20)
            incremental = vm.backup(out, since="c1", checkpoint="c2").wait(120)
            expected = device_sum(shell)
    finally:
        subprocess.run(["umount", str(small)], check=True)
    assert restored_sum([full, incremental], tmp_path) == expected


def test_checkpoints_hold_across_attach_and_an_incremental_after_it_is_exact(
    vm: VM, vms: VMFactory, out: Path, tmp_path: Path
) -> None:
    with GuestShell(vm) as shell:
        write_random(shell, 32)
    full = vm.backup(out, checkpoint="c1").wait(120)
    vm.close()
    vms.vms.remove(vm)
    again = VM.attach(vm.run_dir)
    vms.vms.append(again)
    assert again.checkpoints() == ["c1"]
    with GuestShell(again) as shell:
        write_random(shell, 2, seek=30)
        incremental = again.backup(out, since="c1", checkpoint="c2").wait(120)
        expected = device_sum(shell)
    assert restored_sum([full, incremental], tmp_path) == expected
    again.remove_checkpoint("c1")
    assert again.checkpoints() == ["c2"]


def test_a_backup_whose_control_plane_is_killed_is_settled_at_attach_and_loses_no_change(
    vm: VM, vms: VMFactory, out: Path, tmp_path: Path
) -> None:
    with GuestShell(vm) as shell:
        write_random(shell, 32)
        full = vm.backup(out, checkpoint="c1").wait(120)
        write_random(shell, 8, seek=2)
    vm.close()
    vms.vms.remove(vm)
    child = textwrap.dedent(
        f"""
        import os
        from vmctl import VM
        vm = VM.attach({str(vm.run_dir)!r})
        vm.backup({str(out)!r}, since="c1", checkpoint="killed", bandwidth=1 << 20)
        print("started", flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    killed = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120)
    assert killed.stdout == "started\n" and killed.returncode == -9, killed.stderr
    again = VM.attach(vm.run_dir)  # settles the backup: cancelled, nothing of it left
    vms.vms.append(again)
    assert again.block_jobs() == [] and again.leftovers == ()
    nodes = [n["node-name"] for n in again.qmp.execute("query-named-block-nodes", {"flat": True})]
    assert not [n for n in nodes if "-o999-" in n], nodes
    assert again.checkpoints() == ["c1"] and not (out / "d1.killed.qcow2").exists()
    with GuestShell(again) as shell:
        incremental = again.backup(out, since="c1", checkpoint="c2").wait(120)
        expected = device_sum(shell)
    assert restored_sum([full, incremental], tmp_path) == expected
