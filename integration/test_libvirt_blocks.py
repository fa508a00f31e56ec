"""Snapshots, commit, stream and mirror on a LibvirtVM (libvirt's block APIs), with the guest writing
through its shell; the data is checked in the guest and in the images on the host, and the chain in
libvirt's live XML (``vm.disks()``) is checked after each step."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from integration.conftest import DomainFactory
from integration.test_block import host_block, make_image, qemu_img, read_block, write_block
from integration.versions import BLOCK_JOBS
from vmctl import Domain
from vmctl.errors import InvalidArgument, SnapshotError
from vmctl.libvirt import LibvirtVM
from vmctl.testing import GuestShell

pytestmark = pytest.mark.versioned(BLOCK_JOBS)

MIB = 1024 * 1024


@pytest.fixture
def vm(domains: DomainFactory) -> Domain:
    return domains.launch()


def chain(vm: Domain, id: str) -> list[str]:
    [disk] = [d for d in vm.disks() if d.id == id]
    return [disk.path, *(overlay.path for overlay in disk.overlays)]


@pytest.mark.parametrize("domains", ["libvirt"], indirect=True)
def test_snapshot_then_active_commit_keeps_every_byte(vm: Domain, tmp_path: Path) -> None:
    base = make_image(tmp_path / "base.qcow2")
    vm.hotplug_disk(base, id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        write_block(shell, device, 0, "before-snapshot")
        [disk] = vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / "snap1.qcow2"})
        assert chain(vm, "d1") == [str(base), str(tmp_path / "snap1.qcow2")] and disk.overlays
        write_block(shell, device, 1, "after-snapshot")
        assert host_block(base, "qcow2", 1, 14, tmp_path) == b"\0" * 14  # the overlay took it
        vm.commit_disk("d1")
        assert chain(vm, "d1") == [str(base)]
        assert read_block(shell, device, 0, 15) == "before-snapshot"
        assert read_block(shell, device, 1, 14) == "after-snapshot"
        write_block(shell, device, 2, "after-commit")
    vm.unplug_disk("d1")
    assert host_block(base, "qcow2", 0, 15, tmp_path) == b"before-snapshot"
    assert host_block(base, "qcow2", 1, 14, tmp_path) == b"after-snapshot"
    assert host_block(base, "qcow2", 2, 12, tmp_path) == b"after-commit"


@pytest.mark.parametrize("domains", ["libvirt"], indirect=True)
def test_intermediate_commit_then_stream_flattens_the_chain(vm: Domain, tmp_path: Path) -> None:
    vm.hotplug_disk(make_image(tmp_path / "base.qcow2"), id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        for layer in (1, 2, 3):
            write_block(shell, device, layer, f"layer-{layer}")
            vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / f"s{layer}.qcow2"})
        assert len(chain(vm, "d1")) == 4
        vm.commit_disk("d1", top=2, base=0)  # layers 1 and 2 into the base
        assert chain(vm, "d1") == [str(tmp_path / "base.qcow2"), str(tmp_path / "s3.qcow2")]
        vm.stream_disk("d1")
        assert chain(vm, "d1") == [str(tmp_path / "s3.qcow2")]
        for layer in (1, 2, 3):
            assert read_block(shell, device, layer, 7) == f"layer-{layer}"
    vm.unplug_disk("d1")
    assert "backing file" not in qemu_img("info", str(tmp_path / "s3.qcow2"))
    for layer in (1, 2, 3):
        assert host_block(tmp_path / "s3.qcow2", "qcow2", layer, 7, tmp_path) == f"layer-{layer}".encode()


@pytest.mark.parametrize("domains", ["libvirt"], indirect=True)
def test_mirror_while_the_guest_writes_then_pivot_onto_the_copy(vm: Domain, tmp_path: Path) -> None:
    vm.hotplug_disk(make_image(tmp_path / "src.qcow2", size="64M"), id="d1")
    with GuestShell(vm) as shell:
        device = shell.block_device("d1")
        shell.run(f"head -c 8000000 /dev/urandom | dd of=/dev/{device} bs=1M conv=fsync 2>/dev/null", check=True)
        shell.run(f"(for i in 1 2 3 4 5 6 7 8; do head -c 65536 /dev/urandom | "
                  f"dd of=/dev/{device} bs=64k seek=$((200+i)) conv=fsync 2>/dev/null; sleep 0.2; done) &")  # fmt: skip
        job = vm.mirror_disk("d1", tmp_path / "dst.qcow2")
        job.wait_ready(120)
        shell.run("sleep 2")
        guest_sum = shell.run(f"dd if=/dev/{device} bs=1M count=16 2>/dev/null | md5sum").output.split()[0]
        job.complete()
        assert chain(vm, "d1") == [str(tmp_path / "dst.qcow2")]
        assert shell.run(f"dd if=/dev/{device} bs=1M count=16 2>/dev/null | md5sum").output.split()[0] == guest_sum
    vm.unplug_disk("d1")
    host = tmp_path / "dst.raw"
    qemu_img("convert", "-U", "-O", "raw", str(tmp_path / "dst.qcow2"), str(host))
    with open(host, "rb") as data:
        assert hashlib.md5(data.read(16 * MIB)).hexdigest() == guest_sum


@pytest.mark.parametrize("domains", ["libvirt"], indirect=True)
def test_a_cancelled_mirror_keeps_the_source_and_bad_requests_change_nothing(vm: Domain, tmp_path: Path) -> None:
    assert isinstance(vm, LibvirtVM)
    source = make_image(tmp_path / "src.qcow2")
    vm.hotplug_disk(source, id="d1")
    before = vm.xml()
    with pytest.raises(InvalidArgument, match="overlays"):
        vm.snapshot_disks(["d1"], overlays={})
    with pytest.raises(SnapshotError):
        vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / "no-such-dir" / "snap.qcow2"})
    assert vm.xml() == before
    job = vm.mirror_disk("d1", tmp_path / "dst.qcow2")
    job.wait_ready(60)
    job.cancel()
    assert chain(vm, "d1") == [str(source)]
    with GuestShell(vm) as shell:
        write_block(shell, shell.block_device("d1"), 0, "still-usable")
    vm.unplug_disk("d1")
    assert host_block(source, "qcow2", 0, 12, tmp_path) == b"still-usable"
