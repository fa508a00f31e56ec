"""Disk hotplug and unplug on the booted test guest: the guest sees the disk, data crosses, nothing leaks."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import attrs
import pytest

from integration.conftest import DomainFactory, VMFactory, make_image
from integration.versions import DISK_DEVICES, MIGRATION
from vmctl import VM, Domain
from vmctl.errors import CommandError, DeviceExists, HotplugError, InvalidArgument, UnknownDevice
from vmctl.libvirt import LibvirtVM
from vmctl.libvirt.devicexml import device_alias
from vmctl.model import DiskFormat, DiskSpec, Throttle
from vmctl.model.names import fdset_tag
from vmctl.ops import disks as disk_ops
from vmctl.testing import GuestShell


def guest_disk(shell: GuestShell, serial: str) -> str | None:
    """The guest's block device whose serial is ``serial`` (vmctl sets it to the disk id)."""
    out = shell.run(f"grep -l '^{serial}$' /sys/block/*/serial 2>/dev/null").output.strip()
    return out.split("/")[3] if out else None


def leftovers(vm: Domain, disk_id: str, image: Path | None = None) -> list[str]:
    """What QEMU still holds of a disk: block nodes (by vmctl's names, or on its image), its fdset,
    its device (vmctl's id, or libvirt's alias for it)."""
    nodes = vm.qmp.execute("query-named-block-nodes", {"flat": True})
    fdsets = [fd.get("opaque") for s in vm.qmp.execute("query-fdsets") for fd in s["fds"]]
    devices = [c["name"] for c in vm.qmp.execute("qom-list", {"path": "/machine/peripheral"})]
    found = [n["node-name"] for n in nodes if n["node-name"].startswith(f"{disk_id}-")]
    found += [n["node-name"] for n in nodes if image is not None and n.get("file") == str(image)]
    found += [f for f in fdsets if f == fdset_tag(disk_id)]
    found += [d for d in devices if d in (disk_id, device_alias(disk_id))]
    return found


@pytest.mark.versioned(DISK_DEVICES)
@pytest.mark.parametrize(("fmt", "machine"), [("qcow2", "q35"), ("raw", "pc")])
def test_hotplug_write_read_back_and_unplug(
    domains: DomainFactory, tmp_path: Path, fmt: DiskFormat, machine: str
) -> None:
    vm = domains.launch(domains.spec(machine=machine))
    image = make_image(tmp_path / f"data.{fmt}", fmt)
    with GuestShell(vm) as shell:
        disk = vm.hotplug_disk(image, id="data1", format=fmt)
        # q35: behind the first free root port; pc: at the PCI slot QEMU (or libvirt) chose, pinned.
        assert (disk.port, disk.pci_addr is None) == ((0, True) if machine == "q35" else (None, False))
        assert vm.disks() == (disk,)  # vmctl's inventory, or libvirt's live XML
        assert leftovers(vm, "data1", image) != []
        name = shell.block_device("data1")
        assert shell.run(f"cat /sys/block/{name}/size").output.strip() == str(64 * 1024 * 1024 // 512)
        shell.run(f"echo vmctl-pattern-1234 | dd of=/dev/{name} bs=512 conv=sync,fsync 2>/dev/null", check=True)
        assert shell.run(f"dd if=/dev/{name} bs=18 count=1 2>/dev/null").output == "vmctl-pattern-1234"
        assert [d.id for d in vm.disks()] == ["data1"]
        vm.unplug_disk("data1", timeout=30)
        assert guest_disk(shell, "data1") is None
    assert leftovers(vm, "data1", image) == []
    assert vm.disks() == ()
    if isinstance(vm, LibvirtVM):
        assert "data1" not in vm.xml()
    # What the guest wrote is in the image, as the host reads it through qemu-img.
    raw = tmp_path / "readback.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    assert raw.read_bytes()[:18] == b"vmctl-pattern-1234"


def test_failed_hotplugs_leave_nothing_behind(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch()
    raw_image = make_image(tmp_path / "plain.raw", "raw")
    # Format node fails (a raw file is not qcow2): file node and fdset are rolled back.
    with pytest.raises(HotplugError, match="rolled back") as info:
        vm.hotplug_disk(raw_image, id="bad1", format="qcow2")
    assert info.value.remaining == ()
    assert leftovers(vm, "bad1") == []
    # device_add fails (the id is taken in QEMU, bypassing vmctl's own check): both nodes and the fdset go.
    vm.hotplug_disk(make_image(tmp_path / "ok.qcow2", "qcow2"), id="dup1")
    with pytest.raises(HotplugError):
        disk_ops.hotplug_disk(vm.qmp, vm.log, DiskSpec(id="dup1", path=raw_image, format="raw"))
    assert sorted(leftovers(vm, "dup1")) == ["dup1", "dup1-file", "dup1-fmt", fdset_tag("dup1")]
    fdsets = [fd for s in vm.qmp.execute("query-fdsets") for fd in s["fds"]]
    assert len(fdsets) == 1  # only the working disk's
    # Bad input is refused before QEMU sees anything.
    with pytest.raises(DeviceExists):
        vm.hotplug_disk(raw_image, id="dup1", format="raw")
    with pytest.raises(InvalidArgument, match="does not exist"):
        vm.hotplug_disk(tmp_path / "missing.qcow2", id="miss1")
    with pytest.raises(UnknownDevice):
        vm.unplug_disk("never-there")
    assert [d.id for d in vm.disks()] == ["dup1"]
    vm.unplug_disk("dup1")
    assert leftovers(vm, "dup1") == []


def test_unplug_of_an_already_removed_device_is_idempotent(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch()
    vm.hotplug_disk(make_image(tmp_path / "d.qcow2", "qcow2"), id="gone1")
    # The device goes behind vmctl's back; the nodes and fdset stay.
    with vm.qmp.events("DEVICE_DELETED", match={"device": "gone1"}) as deleted:
        vm.qmp.execute("device_del", {"id": "gone1"})
        deleted.get(30)
    vm.unplug_disk("gone1")
    assert leftovers(vm, "gone1") == []


def test_resize_and_throttle(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch()
    image = make_image(tmp_path / "grow.qcow2", "qcow2", "64M")
    throttle = Throttle(bps=4 * 1024 * 1024, iops=100)
    vm.hotplug_disk(image, id="grow1", throttle=throttle)
    [info] = [b for b in vm.qmp.execute("query-block") if b.get("inserted", {}).get("node-name") == "grow1-fmt"]
    assert info["inserted"]["bps"] == 4 * 1024 * 1024 and info["inserted"]["iops"] == 100
    with GuestShell(vm) as shell:
        name = shell.block_device("grow1")
        vm.resize_disk("grow1", 128 * 1024 * 1024)
        assert shell.run(f"cat /sys/block/{name}/size").output.strip() == str(128 * 1024 * 1024 // 512)
        with pytest.raises(InvalidArgument, match="shrink"):
            vm.resize_disk("grow1", 32 * 1024 * 1024)
        vm.set_disk_throttle("grow1", Throttle())
        [info] = [b for b in vm.qmp.execute("query-block") if b.get("inserted", {}).get("node-name") == "grow1-fmt"]
        assert info["inserted"]["bps"] == 0
    out = subprocess.run(["qemu-img", "info", "--force-share", "--output=json", str(image)], capture_output=True)
    assert '"virtual-size": 134217728' in out.stdout.decode()
    with pytest.raises(InvalidArgument):
        Throttle(bps=-1)
    with pytest.raises(UnknownDevice):
        vm.resize_disk("nope", 1024 * 1024)
    vm.unplug_disk("grow1")
    assert leftovers(vm, "grow1") == []


def test_scsi_disk_hotplug(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch()
    image = make_image(tmp_path / "scsi.raw", "raw", "32M")
    with GuestShell(vm) as shell:
        vm.hotplug_disk(image, id="scsi1", format="raw", bus="scsi")
        assert shell.block_device("scsi1") == "sda"
        shell.run("echo scsi-data | dd of=/dev/sda conv=sync,fsync 2>/dev/null", check=True)
        vm.set_disk_throttle("scsi1", Throttle(iops=50))
        vm.unplug_disk("scsi1")
        assert shell.run("ls /sys/block | grep ^sd").output.strip() == ""
    assert leftovers(vm, "scsi1") == []
    assert image.read_bytes()[:10] == b"scsi-data\n"


def _device_properties(vm: VM, device_id: str) -> dict[str, object]:
    """Every readable property of a device, through qom-get."""
    path = f"/machine/peripheral/{device_id}"
    values: dict[str, object] = {}
    for prop in vm.qmp.execute("qom-list", {"path": path}):
        if prop["type"].startswith(("child<", "link<")):
            continue
        try:
            values[prop["name"]] = vm.qmp.execute("qom-get", {"path": path, "property": prop["name"]})
        except CommandError:
            values[prop["name"]] = "<unreadable>"
    return values


def _block_settings(vm: VM, device_id: str) -> dict[str, Any]:
    """What query-block says of the device's image, less what names the file itself."""
    [block] = [
        b for b in vm.qmp.execute("query-block") if b.get("qdev", "").startswith(f"/machine/peripheral/{device_id}")
    ]
    inserted = dict(block["inserted"])
    for key in ("file", "image", "backing_file", "backing_file_depth"):
        inserted.pop(key, None)
    return inserted


@pytest.mark.versioned(DISK_DEVICES)
def test_a_disk_at_boot_and_the_same_disk_hotplugged_get_identical_properties(vms: VMFactory, tmp_path: Path) -> None:
    disk = DiskSpec(
        id="same1",
        path=make_image(tmp_path / "boot.qcow2", "qcow2"),
        cache="none",
        aio="native",
        port=3,
        throttle=Throttle(iops=123, bps_wr=1048576),
    )
    # Paused, so that no guest driver changes what QEMU reports (the properties are QEMU's).
    booted = vms.launch(vms.spec("boot", disks=[disk]), wait_ready=False, paused=True)
    other = vms.launch(vms.spec("hot"), wait_ready=False, paused=True)
    plugged = other.hotplug_disk(attrs.evolve(disk, path=make_image(tmp_path / "hot.qcow2", "qcow2")))
    assert plugged.port == 3 and plugged.throttle == disk.throttle
    at_boot, hotplugged = _device_properties(booted, "same1"), _device_properties(other, "same1")
    # QEMU's own record of how the device arrived is the one property that must differ.
    assert (at_boot.pop("hotplugged"), hotplugged.pop("hotplugged")) == (False, True)
    assert at_boot == hotplugged and at_boot["write-cache"] == "on"
    settings = _block_settings(booted, "same1")
    assert settings == _block_settings(other, "same1")
    assert settings["cache"]["direct"] is True and settings["cache"]["no-flush"] is False
    assert settings["iops"] == 123 and settings["bps_wr"] == 1048576


@pytest.mark.versioned(MIGRATION)
def test_cache_and_io_limits_survive_attach_and_reach_a_migration_target(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("src"), wait_ready=False, paused=True)
    vm.hotplug_disk(make_image(tmp_path / "a.qcow2", "qcow2"), id="qa", cache="none", throttle=Throttle(iops=123))
    vm.hotplug_disk(make_image(tmp_path / "b.qcow2", "qcow2"), id="qb")
    vm.set_disk_throttle("qb", Throttle(bps=1048576))
    vm.close()
    again = VM.attach(vm.run_dir)
    vms.vms[vms.vms.index(vm)] = again  # the fixture ends the VM through its attached object
    assert {d.id: (d.cache, d.throttle) for d in again.inventory.disks} == {
        "qa": ("none", Throttle(iops=123)),
        "qb": ("writeback", Throttle(bps=1048576)),
    }
    target = VM.launch_incoming(
        again.migration_target_spec(name="dst"), run_dir=vms.run_dir("dst"), inventory=again.inventory
    )
    vms.vms.append(target)
    qa, qb = _block_settings(target, "qa"), _block_settings(target, "qb")
    assert qa["cache"]["direct"] is True and qa["iops"] == 123 and qa["bps"] == 0
    assert qb["cache"]["direct"] is False and qb["bps"] == 1048576 and qb["iops"] == 0
