"""q35 placement: root ports reserved at launch, one per PCI device plus free ones for hotplug."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmctl import DiskSpec, Inventory, NicSpec, VMSpec
from vmctl.errors import FirmwareNotFound, NoHotplugSlot, SpecError
from vmctl.model.pcie import Controller
from vmctl.vm.firmware import prepare_firmware

RUN = Path("/run/vms/vm1")


def spec(**fields: Any) -> VMSpec:
    return VMSpec(**{"name": "vm1", "kernel": "/boot/vmlinuz", **fields})


def devices(argv: list[str]) -> list[dict[str, Any]]:
    return [json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-device" and argv[i + 1].startswith("{")]


def test_q35_is_the_default_and_every_device_sits_on_its_own_root_port_with_eight_free() -> None:
    vm = spec(
        disks=[DiskSpec(id="root", path="/img/r.qcow2"), DiskSpec(id="data", path="/img/d.qcow2")],
        nics=[NicSpec(id="net0")],
        balloon=True,
    )
    argv = vm.command_line(qemu_binary="qemu", run_dir=RUN, accel="tcg")
    assert argv[argv.index("-machine") + 1] == "q35"
    rendered = devices(argv)
    ports = [d for d in rendered if d["driver"] == "pcie-root-port"]
    assert [p["id"] for p in ports] == [f"vmctl-port{i}" for i in range(4 + 8)]
    assert len({p["chassis"] for p in ports}) == len({p["addr"] for p in ports}) == 12
    assert ports[0]["addr"] == "0x2.0" and ports[0]["multifunction"] is True and "multifunction" not in ports[1]
    assert ports[8]["addr"] == "0x3.0"
    buses = {d["id"]: d.get("bus") for d in rendered if d["driver"] != "pcie-root-port"}
    assert buses == {
        "vmctl-balloon": "vmctl-port0",
        "root": "vmctl-port1",
        "data": "vmctl-port2",
        "net0": "vmctl-port3",
    }
    layout = vm.layout()
    assert layout.root_ports == 12 and [d.port for d in layout.disks] == [1, 2]


def test_the_balloon_and_scsi_controller_come_first_and_scsi_disks_take_no_port() -> None:
    layout = spec(
        disks=[DiskSpec(id="d0", path="/d0"), DiskSpec(id="s0", path="/s0", bus="scsi")], balloon=True
    ).layout()
    assert layout.controllers == (Controller.balloon(0), Controller.scsi(1))
    assert [d.port for d in layout.disks] == [2, None]


def test_given_ports_are_kept_and_others_fill_the_gaps() -> None:
    layout = spec(
        disks=[DiskSpec(id="a", path="/a", port=5), DiskSpec(id="b", path="/b")], nics=[NicSpec(id="n", port=0)],
        hotplug_slots=0,
    ).layout()  # fmt: skip
    assert [d.port for d in layout.disks] == [5, 1] and layout.nics[0].port == 0
    assert layout.root_ports == 6  # up to the highest port given, even with no free slots asked for


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"machine": "pc", "disks": [DiskSpec(id="a", path="/a", port=1)]}, "plain PCI"),
        ({"disks": [DiskSpec(id="a", path="/a", port=1), DiskSpec(id="b", path="/b", port=1)]}, "port 1"),
        ({"balloon": True, "disks": [DiskSpec(id="a", path="/a", port=0)]}, "balloon"),
        ({"hotplug_slots": 500}, "hotplug_slots"),
        ({"hotplug_slots": -1}, "hotplug_slots"),
        ({"firmware": "coreboot"}, "firmware"),
    ],
)
def test_bad_placements_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(SpecError, match=message):
        spec(**fields)


def test_a_device_has_a_port_or_an_address_not_both() -> None:
    with pytest.raises(SpecError, match="not both"):
        NicSpec(id="n", port=1, pci_addr="0x5.0")
    with pytest.raises(SpecError, match="SCSI"):
        DiskSpec(id="s", path="/s", bus="scsi", port=1)


def test_the_pool_is_used_up_with_no_hotplug_slot_and_an_unplug_frees_its_port() -> None:
    inventory = Inventory(root_ports=2, disks=(DiskSpec(id="a", path="/a", port=0),), nics=(NicSpec(id="n", port=1),))
    with pytest.raises(NoHotplugSlot, match="all 2"):
        inventory.free_port(vm="vm1", device="d9")
    assert inventory.without_disk("a").free_port(vm="vm1", device="d9") == 0
    assert inventory.without_nic("n").free_port(vm="vm1", device="d9") == 1


def test_ports_and_controllers_survive_the_state_file() -> None:
    inventory = Inventory(
        root_ports=9, controllers=(Controller.serial(4),), nics=(NicSpec(id="n", port=3, link_up=False),),
        balloon_target=1 << 28,
    )  # fmt: skip
    assert Inventory.from_dict(json.loads(json.dumps(inventory.to_dict()))) == inventory


def test_uefi_renders_the_code_read_only_and_the_vms_own_variable_store() -> None:
    argv = spec(firmware="uefi").command_line(qemu_binary="qemu", run_dir=RUN, accel="tcg")
    assert argv[argv.index("-machine") + 1] == "q35,pflash0=vmctl-uefi-code,pflash1=vmctl-uefi-vars"
    nodes = {n["node-name"]: n for n in (json.loads(argv[i + 1]) for i, a in enumerate(argv) if a == "-blockdev")}
    assert nodes["vmctl-uefi-code"]["read-only"] is True
    assert nodes["vmctl-uefi-code"]["filename"] == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert nodes["vmctl-uefi-vars"] == {
        "driver": "file", "node-name": "vmctl-uefi-vars", "filename": str(RUN / "uefi-vars.fd"), "read-only": False,
    }  # fmt: skip


def test_the_variable_store_is_copied_once_and_replaced_only_from_a_named_source(tmp_path: Path) -> None:
    code, template, source = tmp_path / "code.fd", tmp_path / "vars.fd", tmp_path / "source-vars.fd"
    code.write_bytes(b"code")
    template.write_bytes(b"template")
    source.write_bytes(b"from the source")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    prepare_firmware(spec(firmware="uefi", uefi_code=str(code), uefi_vars=str(template)), run_dir)
    store = run_dir / "uefi-vars.fd"
    assert store.read_bytes() == b"template" and store.stat().st_mode & 0o777 == 0o600
    store.write_bytes(b"written by the guest")
    prepare_firmware(spec(firmware="uefi", uefi_code=str(code)), run_dir)  # a relaunch keeps the NVRAM
    assert store.read_bytes() == b"written by the guest"
    prepare_firmware(spec(firmware="uefi", uefi_code=str(code), uefi_vars=str(source)), run_dir)
    assert store.read_bytes() == b"from the source"


def test_missing_firmware_is_a_clear_error_before_launch(tmp_path: Path) -> None:
    with pytest.raises(FirmwareNotFound, match="ovmf"):
        prepare_firmware(spec(firmware="uefi", uefi_code=str(tmp_path / "nope.fd")), tmp_path)
