"""Runtime settings vmctl sets are in the inventory: visible after attach, in force on a migration target.

QEMU migrates a device's state, not the options of the block layer nor what a spec asks for at
launch: vmctl carries them. The guest shows each one, on the source and on the target.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from integration.conftest import VMFactory, make_image
from integration.versions import MIGRATION
from vmctl import VM, NicSpec
from vmctl.testing import GuestShell

pytestmark = pytest.mark.versioned(MIGRATION)

MIB = 1 << 20
MAC = "52:54:00:5e:77:01"


def interface(shell: GuestShell) -> str:
    name = shell.poll(f"grep -l '^{MAC}$' /sys/class/net/*/address | cut -d/ -f5")
    shell.run(f"ip link set {name} up", check=True)  # the carrier reads only on an interface that is up
    return name


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_link_state_balloon_target_discard_and_read_only_survive_attach_and_migration(
    vms: VMFactory, tmp_path: Path
) -> None:
    # A NIC can start with its link down (set before the guest runs).
    source = vms.launch(vms.spec("src", balloon=True, nics=[NicSpec(id="net0", mac=MAC, link_up=False)]))
    trim_image = make_image(tmp_path / "trim.raw", "raw", "32M")
    source.hotplug_disk(trim_image, id="trim", format="raw", discard=True)
    source.hotplug_disk(make_image(tmp_path / "ro.qcow2", "qcow2"), id="ro", read_only=True)
    source.set_balloon(200 * MIB)
    with GuestShell(source) as shell:
        assert shell.run(f"cat /sys/class/net/{interface(shell)}/carrier").output.strip() == "0"
    source.close()
    again = VM.attach(source.run_dir)
    vms.vms[vms.vms.index(source)] = again
    inventory = again.inventory
    assert (inventory.nic("net0").link_up, inventory.balloon_target) == (False, 200 * MIB)  # type: ignore[union-attr]
    assert [(d.id, d.discard, d.read_only) for d in inventory.disks] == [("trim", True, False), ("ro", False, True)]

    target = VM.launch_incoming(
        again.migration_target_spec(name="dst"), run_dir=vms.run_dir("dst"), inventory=inventory
    )
    vms.vms.append(target)
    assert again.migrate(target).wait(120).status == "completed"
    assert abs(int(target.qmp.execute("query-balloon")["actual"]) - 200 * MIB) < MIB
    nodes = {n["node-name"]: n for n in target.qmp.execute("query-named-block-nodes", {"flat": True})}
    assert nodes["ro-fmt"]["ro"] is True and nodes["trim-fmt"]["ro"] is False
    with GuestShell(target) as shell:
        carrier = f"/sys/class/net/{interface(shell)}/carrier"
        assert shell.run(f"cat {carrier}").output.strip() == "0"  # still down on the target
        target.set_nic_link("net0", True)
        assert shell.poll(f"grep -x 1 {carrier}") == "1"
        # The guest's discards reach the image on the target: its blocks are given back to the host.
        trim = shell.block_device("trim")
        shell.run(f"dd if=/dev/urandom of=/dev/{trim} bs=1M count=16 conv=fsync 2>/dev/null", check=True)
        full = allocated(trim_image)
        assert full >= 16 * MIB
        shell.run(f"blkdiscard /dev/{trim}", check=True)
        assert allocated(trim_image) < full - 8 * MIB
    assert target.inventory.nic("net0").link_up is True  # type: ignore[union-attr]
