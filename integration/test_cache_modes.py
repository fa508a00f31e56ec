"""A disk's settings hold on every layer QEMU opens for it, not only the one it was plugged with.

A ``cache="none"`` disk must stay direct (O_DIRECT, no host page cache) after a snapshot, a
commit, a mirror's pivot and on a migration target: QEMU says so in ``query-block``, and every fd
QEMU holds on the active layer's image has O_DIRECT in its flags (``/proc/PID/fdinfo``). Its
zero detection and discard hold on every layer as well.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import VMFactory, make_image
from integration.versions import BLOCK_JOBS
from vmctl import VM

pytestmark = pytest.mark.versioned(BLOCK_JOBS)


def active_layer(vm: VM, disk_id: str) -> dict[str, Any]:
    """What ``query-block`` says of the layer the disk's device reads and writes."""
    for block in vm.qmp.execute("query-block"):
        qdev = str(block.get("qdev", ""))
        if qdev.startswith(f"/machine/peripheral/{disk_id}/") or qdev == disk_id:
            inserted: dict[str, Any] = block["inserted"]
            return inserted
    raise AssertionError(f"{vm.name} has no disk {disk_id}")


def fd_flags(vm: VM, image: Path) -> list[int]:
    """The open flags of every fd QEMU holds on ``image``."""
    flags = []
    for fd in os.listdir(f"/proc/{vm.pid}/fd"):
        try:
            if os.readlink(f"/proc/{vm.pid}/fd/{fd}") != str(image):
                continue
            info = Path(f"/proc/{vm.pid}/fdinfo/{fd}").read_text()
        except OSError:  # closed meanwhile
            continue
        flags.append(int(info.split("flags:")[1].split()[0], 8))
    return flags


def assert_direct(vm: VM, disk_id: str, image: Path) -> None:
    layer = active_layer(vm, disk_id)
    [disk] = [d for d in vm.disks() if d.id == disk_id]
    assert (layer["node-name"], disk.layer_path(disk.layers[-1])) == (disk.active_node, str(image)), layer
    assert layer["cache"] == {"direct": True, "no-flush": False, "writeback": True}, layer
    assert layer["detect_zeroes"] == "unmap", layer
    flags = fd_flags(vm, image)
    assert flags, f"QEMU holds no fd on {image}"
    assert all(f & os.O_DIRECT for f in flags), f"{image}: {[oct(f) for f in flags]} (O_DIRECT is {oct(os.O_DIRECT)})"


def test_a_cache_none_disk_stays_direct_and_detects_zeroes_after_snapshot_commit_mirror_and_on_a_migration_target(
    vms: VMFactory, tmp_path: Path
) -> None:
    vm = vms.launch(vms.spec("direct"), wait_ready=False, paused=True)  # no guest needed: QEMU's layers
    base = make_image(tmp_path / "base.qcow2", "qcow2")
    vm.hotplug_disk(base, id="d1", cache="none", discard=True, detect_zeroes="unmap")
    assert_direct(vm, "d1", base)

    vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / "snap.qcow2"})
    assert_direct(vm, "d1", tmp_path / "snap.qcow2")

    vm.commit_disk("d1", timeout=60)  # the active commit pivots back onto the base
    assert vm.disks()[0].layers == [0]
    assert_direct(vm, "d1", base)

    job = vm.mirror_disk("d1", tmp_path / "copy.qcow2")
    job.wait_ready(60)
    job.complete()
    assert vm.disks()[0].path == str(tmp_path / "copy.qcow2")
    assert_direct(vm, "d1", tmp_path / "copy.qcow2")

    vm.snapshot_disks(["d1"], overlays={"d1": tmp_path / "top.qcow2"})
    job = vm.mirror_disk("d1", tmp_path / "top-copy.qcow2", sync="top")  # keeps copy.qcow2 below
    job.wait_ready(60)
    job.complete()
    assert_direct(vm, "d1", tmp_path / "top-copy.qcow2")

    target = VM.launch_incoming(
        vm.migration_target_spec(name="dst"), run_dir=vms.run_dir("dst"), inventory=vm.inventory
    )
    vms.vms.append(target)
    assert_direct(target, "d1", tmp_path / "top-copy.qcow2")
