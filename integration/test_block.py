"""Snapshots, commit, stream, mirror, bitmaps and NBD exports, with the guest writing through its shell.

Data integrity is checked two ways: by reading back in the guest, and by comparing the images on
the host (qemu-img) with what the guest wrote.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import VMFactory
from integration.versions import BLOCK_JOBS
from vmctl import VM, DiskSpec
from vmctl.errors import BlockJobError, InvalidArgument, SnapshotError
from vmctl.ops import chains
from vmctl.testing import GuestShell

pytestmark = pytest.mark.versioned(BLOCK_JOBS)

MIB = 1024 * 1024


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def make_image(path: Path, fmt: str = "qcow2", size: str = "32M") -> Path:
    qemu_img("create", "-q", "-f", fmt, str(path), size)
    return path


def write_block(shell: GuestShell, device: str, block: int, text: str) -> None:
    """Write ``text`` at 64 KiB block ``block`` of the device, synchronously."""
    shell.run(f"printf '{text}' | dd of=/dev/{device} bs=64k seek={block} conv=sync,fsync 2>/dev/null", check=True)


def read_block(shell: GuestShell, device: str, block: int, length: int) -> str:
    # Drop the guest's page cache so that the read goes to the (new) image.
    shell.run("echo 3 > /proc/sys/vm/drop_caches")
    return shell.run(f"dd if=/dev/{device} bs=64k skip={block} count=1 2>/dev/null | head -c {length}").output


def host_block(image: Path, fmt: str, block: int, length: int, tmp: Path) -> bytes:
    raw = tmp / f"readback-{image.name}.raw"
    qemu_img("convert", "-U", "-f", fmt, "-O", "raw", str(image), str(raw))
    with open(raw, "rb") as data:
        data.seek(block * 64 * 1024)
        content = data.read(length)
    raw.unlink()
    return content


@pytest.fixture
def guest_vm(vms: VMFactory) -> VM:
    return vms.launch()


def test_snapshot_write_commit_keeps_every_byte(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    base = make_image(tmp_path / "base.qcow2")
    vm.hotplug_disk(base, id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        write_block(shell, device, 0, "before-snapshot")
        [disk] = vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / "snap1.qcow2"}, bitmap="since-snap1")
        assert disk.layers == [0, 1] and vm.disks()[0].layers == [0, 1]
        assert [b.name for b in vm.bitmaps("d1")] == ["since-snap1"]
        write_block(shell, device, 1, "after-snapshot")
        assert vm.bitmaps("d1")[0].dirty_bytes > 0
        # The base holds only the first write; the overlay holds the second.
        assert host_block(base, "qcow2", 1, 14, tmp_path) == b"\0" * 14
        vm.commit_disk("d1")
        assert vm.disks()[0].layers == [0]
        assert read_block(shell, device, 0, 15) == "before-snapshot"
        assert read_block(shell, device, 1, 14) == "after-snapshot"
        write_block(shell, device, 2, "after-commit")
    assert [n for n in vm.qmp.execute("query-named-block-nodes", {"flat": True}) if "o1" in n["node-name"]] == []
    vm.unplug_disk("d1")  # QEMU closes (and so flushes) the image before the host reads it
    assert vm.qmp.execute("query-fdsets") == []
    assert host_block(base, "qcow2", 0, 15, tmp_path) == b"before-snapshot"
    assert host_block(base, "qcow2", 1, 14, tmp_path) == b"after-snapshot"
    assert host_block(base, "qcow2", 2, 12, tmp_path) == b"after-commit"


def test_intermediate_commit_and_stream(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    vm.hotplug_disk(make_image(tmp_path / "base.qcow2"), id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        for layer in (1, 2, 3):
            write_block(shell, device, layer, f"layer-{layer}")
            vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / f"s{layer}.qcow2"})
        assert vm.disks()[0].layers == [0, 1, 2, 3]
        vm.commit_disk("d1", top=2, base=0)  # layers 1 and 2 into the base
        assert vm.disks()[0].layers == [0, 3]
        info = qemu_img("info", "-U", str(tmp_path / "s3.qcow2"))
        assert f"backing file: {tmp_path / 'base.qcow2'}" in info  # a real path, not /dev/fdset/N
        vm.stream_disk("d1")  # flatten into the active layer
        [disk] = vm.disks()
        assert disk.layers == [3] and disk.path == str(tmp_path / "s3.qcow2")
        for layer in (1, 2, 3):
            assert read_block(shell, device, layer, 7) == f"layer-{layer}"
    vm.unplug_disk("d1")  # QEMU closes (and so flushes) the image before the host reads it
    assert "backing file" not in qemu_img("info", str(tmp_path / "s3.qcow2"))
    for layer in (1, 2, 3):
        assert host_block(tmp_path / "s3.qcow2", "qcow2", layer, 7, tmp_path) == f"layer-{layer}".encode()


def test_mirror_while_the_guest_writes_then_pivot(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    source = make_image(tmp_path / "src.qcow2", size="64M")
    vm.hotplug_disk(source, id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        shell.run(f"head -c 8000000 /dev/urandom | dd of=/dev/{device} bs=1M conv=fsync 2>/dev/null", check=True)
        # Keep writing while the mirror runs.
        shell.run(f"(for i in 1 2 3 4 5 6 7 8; do head -c 65536 /dev/urandom | "
                  f"dd of=/dev/{device} bs=64k seek=$((200+i)) conv=fsync 2>/dev/null; sleep 0.2; done) &")  # fmt: skip
        job = vm.mirror_disk("d1", tmp_path / "dst.qcow2")
        job.wait_ready(120)
        shell.run("sleep 2")  # the writer finishes; READY mirrors keep following writes
        guest_sum = shell.run(f"dd if=/dev/{device} bs=1M count=16 2>/dev/null | md5sum").output.split()[0]
        job.complete()
        assert vm.disks()[0].path == str(tmp_path / "dst.qcow2")
        assert shell.run(f"dd if=/dev/{device} bs=1M count=16 2>/dev/null | md5sum").output.split()[0] == guest_sum
    assert vm.block_jobs() == []
    nodes = [n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True})]
    assert "d1-fmt" not in nodes and "d1-o1-fmt" in nodes  # the source left the graph
    vm.unplug_disk("d1")
    host = tmp_path / "dst.raw"
    qemu_img("convert", "-U", "-O", "raw", str(tmp_path / "dst.qcow2"), str(host))
    with open(host, "rb") as data:
        assert hashlib.md5(data.read(16 * MIB)).hexdigest() == guest_sum


def test_cancel_keeps_the_source(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    vm.hotplug_disk(make_image(tmp_path / "src.qcow2"), id="d1")
    job = vm.mirror_disk("d1", tmp_path / "dst.qcow2")
    job.wait_ready(60)
    job.cancel()
    assert vm.disks()[0].path == str(tmp_path / "src.qcow2")
    assert vm.block_jobs() == []
    nodes = [n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True})]
    assert "d1-o1-fmt" not in nodes and "d1-fmt" in nodes
    with GuestShell(vm) as shell:
        write_block(shell, shell.block_device("d1"), 0, "still-usable")
    vm.unplug_disk("d1")
    assert host_block(tmp_path / "src.qcow2", "qcow2", 0, 12, tmp_path) == b"still-usable"


def test_failed_snapshot_transaction_changes_nothing(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    vm.hotplug_disk(make_image(tmp_path / "a.qcow2"), id="a1")
    vm.hotplug_disk(make_image(tmp_path / "b.qcow2"), id="b1")
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"this is not a qcow2 image" * 100)
    nodes_before = sorted(n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True}))
    fdsets_before = vm.qmp.execute("query-fdsets")
    with pytest.raises(SnapshotError, match="nothing changed"):
        vm.snapshot_disks(["a1", "b1"], overlays={"a1": tmp_path / "a-snap.qcow2", "b1": bad})
    assert not (tmp_path / "a-snap.qcow2").exists()  # the overlay it created is gone again
    # A failure inside the transaction itself (a bad bitmap granularity) rolls back too.
    with pytest.raises(SnapshotError):
        chains.snapshot_disks(
            vm.qmp, vm.log, list(vm.disks()), {"a1": tmp_path / "a2.qcow2", "b1": tmp_path / "b2.qcow2"},
            bitmap="x", bitmap_granularity=3,
        )  # fmt: skip
    assert sorted(n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True})) == nodes_before
    assert vm.qmp.execute("query-fdsets") == fdsets_before
    assert [d.layers for d in vm.disks()] == [[0], [0]]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "tiny"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_job_error_on_a_full_filesystem(guest_vm: VM, tmp_path: Path, tiny_fs: Path) -> None:
    vm = guest_vm
    vm.hotplug_disk(make_image(tmp_path / "src.qcow2", size="64M"), id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        shell.run(f"head -c 8000000 /dev/urandom | dd of=/dev/{device} bs=1M conv=fsync 2>/dev/null", check=True)
    job = vm.mirror_disk("d1", tiny_fs / "dst.qcow2")
    with pytest.raises(BlockJobError, match="No space left") as info:
        job.wait_ready(60)
    assert info.value.job_id == "d1-mirror"
    assert vm.status().running
    assert vm.block_jobs() == []
    assert vm.disks()[0].path == str(tmp_path / "src.qcow2")
    assert "d1-o1-fmt" not in [n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True})]


def test_bitmaps_and_nbd_export(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    image = make_image(tmp_path / "d.qcow2")
    vm.hotplug_disk(image, id="d1")
    vm.add_bitmap("d1", "b1")
    vm.add_bitmap("d1", "b2", persistent=False)
    with GuestShell(vm) as shell:
        write_block(shell, shell.block_device("d1"), 3, "exported-data")
    vm.merge_bitmaps("d1", "b2", ["b1"])
    bitmaps = {b.name: b for b in vm.bitmaps("d1")}
    assert bitmaps["b1"].persistent and not bitmaps["b2"].persistent
    assert bitmaps["b1"].dirty_bytes > 0 and bitmaps["b2"].dirty_bytes >= bitmaps["b1"].dirty_bytes
    vm.clear_bitmap("d1", "b1")
    assert {b.name: b.dirty_bytes for b in vm.bitmaps("d1")}["b1"] == 0
    vm.remove_bitmap("d1", "b2")
    assert [b.name for b in vm.bitmaps("d1")] == ["b1"]
    with pytest.raises(InvalidArgument):
        vm.add_bitmap("d1", "bad name")
    export = vm.export_disk("d1")
    raw = tmp_path / "via-nbd.raw"
    qemu_img("convert", "-f", "raw", "-O", "raw", export.uri, str(raw))
    with open(raw, "rb") as data:
        data.seek(3 * 64 * 1024)
        assert data.read(13) == b"exported-data"
    vm.unexport_disk("d1")
    assert vm.qmp.execute("query-block-exports") == []


def test_jobs_left_by_a_crashed_control_plane_are_reported_on_attach(vms: VMFactory, tmp_path: Path) -> None:
    disk = make_image(tmp_path / "data.qcow2")
    spec = vms.spec("orphan", disks=(DiskSpec(id="data0", path=disk),))
    run_dir = vms.run_dir("orphan")
    script = f"""
from vmctl import VM, VMSpec
spec = VMSpec.from_dict({spec.to_dict()!r})
vm = VM.launch(spec, run_dir={str(run_dir)!r})
job = vm.mirror_disk("data0", {str(tmp_path / "mirror.qcow2")!r})
job.wait_ready(60)
# the control plane "crashes" here, leaving the READY mirror behind
"""
    controller = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert controller.returncode == 0, controller.stderr
    vm = VM.attach(run_dir)
    vms.vms.append(vm)
    assert [(j.id, j.type, j.status) for j in vm.leftover_jobs] == [("data0-mirror", "mirror", "ready")]


def test_top_only_mirror_keeps_the_backing_chain(guest_vm: VM, tmp_path: Path) -> None:
    vm = guest_vm
    vm.hotplug_disk(make_image(tmp_path / "base.qcow2"), id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        write_block(shell, device, 0, "in-the-base")
        vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / "top.qcow2"})
        write_block(shell, device, 1, "in-the-top")
        job = vm.mirror_disk("d1", tmp_path / "new-top.qcow2", sync="top")
        job.wait_ready(60)
        job.complete()
        [disk] = vm.disks()
        assert disk.path == str(tmp_path / "base.qcow2")
        assert [(o.layer, o.path) for o in disk.overlays] == [(2, str(tmp_path / "new-top.qcow2"))]
        assert read_block(shell, device, 0, 11) == "in-the-base"
        assert read_block(shell, device, 1, 10) == "in-the-top"
    vm.unplug_disk("d1")
    info = qemu_img("info", str(tmp_path / "new-top.qcow2"))
    assert f"backing file: {tmp_path / 'base.qcow2'}" in info
    assert host_block(tmp_path / "new-top.qcow2", "qcow2", 0, 11, tmp_path) == b"in-the-base"
    assert host_block(tmp_path / "new-top.qcow2", "qcow2", 1, 10, tmp_path) == b"in-the-top"
