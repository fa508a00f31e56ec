"""q35 machines: root ports reserved at launch, hotplug behind them, the same topology on a
migration target; UEFI with a variable store of the VM's own that follows it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from integration.conftest import BOOT_TIMEOUT, VMFactory, make_image
from integration.versions import PCIE
from vmctl import VM, DiskSpec, NicSpec
from vmctl.errors import NoHotplugSlot
from vmctl.model.names import UEFI_VARS_FILE
from vmctl.testing import READY_MARKER, GuestShell

pytestmark = pytest.mark.versioned(PCIE)

MIB = 1 << 20


def pci_topology(vm: VM) -> list[tuple[Any, ...]]:
    """Every PCI device as (parent device, id, slot, function, PCI device id), from QEMU."""
    rows: list[tuple[Any, ...]] = []

    def walk(devices: list[dict[str, Any]], parent: str) -> None:
        for device in devices:
            rows.append((parent, device["qdev_id"], device["slot"], device["function"], device["id"]["device"]))
            bridge = device.get("pci_bridge")
            if bridge:
                walk(bridge.get("devices", []), device["qdev_id"])

    for bus in vm.qmp.execute("query-pci"):
        walk(bus["devices"], f"bus {bus['bus']}")
    return sorted(rows)


def qemu_state(vm: VM) -> tuple[Any, ...]:
    nodes = sorted(n["node-name"] for n in vm.qmp.execute("query-named-block-nodes", {"flat": True}))
    devices = sorted(c["name"] for c in vm.qmp.execute("qom-list", {"path": "/machine/peripheral"}))
    return nodes, vm.qmp.execute("query-fdsets"), devices


def test_the_root_port_pool_runs_out_with_no_hotplug_slot_and_an_unplug_frees_its_port(
    vms: VMFactory, tmp_path: Path
) -> None:
    vm = vms.launch(
        vms.spec(
            "pool", hotplug_slots=2, disks=[DiskSpec(id="boot0", path=make_image(tmp_path / "b", "raw"), format="raw")]
        )
    )
    assert vm.inventory.root_ports == 3 and vm.inventory.disks[0].port == 0
    with GuestShell(vm) as shell:
        first = vm.hotplug_disk(make_image(tmp_path / "1", "qcow2"), id="hot1")
        nic = vm.hotplug_nic(id="net1")
        assert (first.port, nic.port) == (1, 2)
        before = qemu_state(vm)
        with pytest.raises(NoHotplugSlot, match="all 3"):
            vm.hotplug_disk(make_image(tmp_path / "2", "qcow2"), id="hot2")
        assert qemu_state(vm) == before  # refused before anything reached QEMU
        vm.unplug_disk("boot0")  # a disk the VM booted with is hot-unpluggable too, behind its port
        assert shell.poll("ls /sys/block | grep -c vd", timeout=10) == "1"
        third = vm.hotplug_disk(make_image(tmp_path / "3", "qcow2"), id="hot3")
        assert third.port == 0
        assert shell.block_device("hot3") and shell.block_device("hot1")
    vm.close()
    again = VM.attach(vm.run_dir)
    vms.vms[vms.vms.index(vm)] = again  # the fixture ends the VM through its attached object
    assert {d.id: d.port for d in again.inventory.disks} == {"hot1": 1, "hot3": 0}


def test_a_migration_target_rebuilds_the_sources_pci_topology_and_the_guest_keeps_its_devices(
    vms: VMFactory, tmp_path: Path
) -> None:
    spec = vms.spec(
        "src",
        balloon=True,
        memory_mib=256,
        max_memory_mib=1024,
        memory_slots=1,
        disks=[DiskSpec(id="boot0", path=make_image(tmp_path / "b0", "qcow2"))],
        nics=[NicSpec(id="net0")],
    )
    source = vms.launch(spec)
    source.hotplug_disk(make_image(tmp_path / "h1", "qcow2"), id="hot1")
    source.add_virtio_mem("vmem0", max_size_mib=256, size_mib=128)
    source.hotplug_nic(id="net1")
    source.unplug_disk("boot0")
    moved = source.hotplug_disk(make_image(tmp_path / "h2", "qcow2"), id="hot2")
    assert moved.port == 1  # the port boot0 left
    with GuestShell(source) as shell:
        shell.run(f"echo hot2-data | dd of=/dev/{shell.block_device('hot2')} conv=sync,fsync 2>/dev/null", check=True)
    target = VM.launch_incoming(
        source.migration_target_spec(name="dst"), run_dir=vms.run_dir("dst"), inventory=source.inventory
    )
    vms.vms.append(target)
    assert target.inventory.root_ports == source.inventory.root_ports
    topology = pci_topology(source)
    assert source.migrate(target).wait(120).status == "completed"
    # Each device behind the same port at the same place (QEMU lists what sits behind a port once
    # the guest has numbered the buses: on the target, after the migration).
    assert pci_topology(target) == topology
    assert ("vmctl-port1", "hot2", 0, 0, 0x1042) in topology
    with GuestShell(target) as shell:
        assert shell.run(f"dd if=/dev/{shell.block_device('hot2')} bs=10 count=1 2>/dev/null").output == "hot2-data\n"
        size = int(target.qmp.execute("qom-get", {"path": "/machine/peripheral/vmem0", "property": "size"}))
        assert size == 128 * MIB
        # The target's pool is the source's: the next hotplug takes the next free port.
        late = target.hotplug_disk(make_image(tmp_path / "h3", "qcow2"), id="hot3")
        assert late.port not in {d.port for d in target.inventory.disks if d.id != "hot3"}
        assert shell.block_device("hot3")


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_uefi_boots_the_kernel_directly_and_its_variable_store_follows_a_migration(
    vms: VMFactory, machine: str
) -> None:
    source = vms.launch(vms.spec("uefi", firmware="uefi", machine=machine))
    store = source.run_dir / UEFI_VARS_FILE
    with GuestShell(source) as shell:
        assert shell.run("test -d /sys/firmware/efi && echo uefi").output.strip() == "uefi"
        # A variable the guest writes reaches the VM's own store through the firmware.
        guid = "3f6c4b1e-8a52-4e0a-9d7b-5f0c2a1e9b77"
        write = f"printf '\\007\\000\\000\\000vmctl-nvram' > /sys/firmware/efi/efivars/VmctlTest-{guid}"
        shell.run(write, check=True)
    assert "VmctlTest".encode("utf-16-le") in store.read_bytes()
    source.close()  # a control plane restarts: the attached VM has the same store
    attached = VM.attach(source.run_dir)
    vms.vms[vms.vms.index(source)] = source = attached
    target = VM.launch_incoming(
        source.migration_target_spec(name="uefi-dst"), run_dir=vms.run_dir("uefi-dst"), inventory=source.inventory
    )
    vms.vms.append(target)
    copy = target.run_dir / UEFI_VARS_FILE
    assert copy.read_bytes() == store.read_bytes() and copy != store
    assert source.migrate(target).wait(120).status == "completed"
    # After a reset the firmware reads its variables from the target's own copy again.
    mark = target.console.position
    target.reset()
    target.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT, since=mark)
    with GuestShell(target) as shell:
        assert shell.run(f"tail -c 11 /sys/firmware/efi/efivars/VmctlTest-{guid}").output == "vmctl-nvram"
