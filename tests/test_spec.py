from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from vmctl import DiskSpec, Inventory, NicSpec, Throttle, VMSpec
from vmctl.errors import InvalidArgument, SpecError
from vmctl.model.status import DiskIOError

RUN = Path("/run/vms/vm1")


def render(**fields: Any) -> list[str]:
    base: dict[str, Any] = {"name": "vm1", "kernel": "/boot/vmlinuz"}
    base.update(fields)
    return VMSpec(**base).command_line(qemu_binary="qemu", run_dir=RUN, accel="tcg")


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_minimal_command_line() -> None:
    argv = render()
    assert argv[0] == "qemu"
    assert option(argv, "-accel") == ["tcg"]
    assert option(argv, "-m") == ["256M"]
    assert option(argv, "-smp") == ["1"]
    assert "-S" in argv and "-nodefaults" in argv
    assert option(argv, "-pidfile") == [str(RUN / "qemu.pid")]
    assert f"socket,id=vmctl-qmp,path={RUN}/qmp.sock,server=on,wait=off" in option(argv, "-chardev")
    # The control plane's monitor, and a second one for operators' tools (QEMU serves one client each).
    assert f"socket,id=vmctl-tools,path={RUN}/tools.sock,server=on,wait=off" in option(argv, "-chardev")
    assert option(argv, "-mon") == ["chardev=vmctl-qmp,mode=control", "chardev=vmctl-tools,mode=control"]
    assert option(argv, "-serial") == ["chardev:vmctl-console"]
    assert option(argv, "-kernel") == ["/boot/vmlinuz"]


def test_hotplug_ranges_render() -> None:
    argv = render(memory_mib=512, max_memory_mib=2048, memory_slots=4, cpus=2, max_cpus=4)
    assert option(argv, "-m") == ["512M,slots=4,maxmem=2048M"]
    assert option(argv, "-smp") == ["2,maxcpus=4"]


def test_disks_nics_and_shell_render_on_a_plain_pci_machine() -> None:
    argv = render(
        machine="pc",
        disks=[
            DiskSpec(id="root", path="/img/a,b.qcow2"),
            DiskSpec(id="data", path="/img/d.raw", format="raw", read_only=True),
        ],
        nics=[NicSpec(id="net0", mac="52:54:00:12:34:56", tap="tap0"), NicSpec(id="net1")],
        shell_serial=True,
        no_shutdown=True,
        extra_args=["-device", "pvpanic"],
    )
    blockdevs = [json.loads(b) for b in option(argv, "-blockdev")]
    assert blockdevs[0] == {
        "driver": "file",
        "node-name": "root-file",
        "filename": "/img/a,b.qcow2",  # JSON needs no comma escaping
        "read-only": False,
        "aio": "threads",
        "cache": {"direct": False, "no-flush": False},
    }
    assert blockdevs[1]["driver"] == "qcow2" and blockdevs[1]["file"] == "root-file"
    assert blockdevs[3]["driver"] == "raw" and blockdevs[3]["read-only"] is True
    devices = option(argv, "-device")
    assert {"driver": "virtio-blk-pci", "id": "root", "drive": "root-fmt", "serial": "root", "write-cache": "on"} in [
        json.loads(d) for d in devices if d.startswith("{")
    ]
    assert {"driver": "virtio-net-pci", "id": "net0", "netdev": "net0-net", "mac": "52:54:00:12:34:56"} in [
        json.loads(d) for d in devices if d.startswith("{")
    ]
    assert option(argv, "-netdev") == ["tap,id=net0-net,ifname=tap0,script=no,downscript=no", "user,id=net1-net"]
    assert option(argv, "-serial") == ["chardev:vmctl-console", "chardev:vmctl-shell"]
    assert "-no-shutdown" in argv
    assert argv[-2:] == ["-device", "pvpanic"]


def test_a_disk_renders_the_same_nodes_and_device_for_boot_and_hotplug() -> None:
    disk = DiskSpec(
        id="d1", path="/img/d.qcow2", cache="none", aio="native", pci_addr="0x7.0", throttle=Throttle(iops=123)
    )
    argv = disk.arguments()
    assert [json.loads(v) for v in option(argv, "-blockdev")] == disk.layer_nodes(0, "/img/d.qcow2")
    assert [json.loads(v) for v in option(argv, "-device")] == [disk.device_properties()]
    assert disk.device_properties()["write-cache"] == "on" and disk.device_properties()["addr"] == "0x7.0"
    assert disk.layer_nodes(0, "/dev/fdset/3")[0]["cache"] == {"direct": True, "no-flush": False}
    assert disk.open_flags() & os.O_DIRECT


def test_a_disk_chain_renders_each_layer_on_its_backing() -> None:
    disk = DiskSpec(id="d1", path="/img/base.qcow2", overlays=[{"layer": 1, "path": "/img/s1.qcow2"}])
    nodes = [json.loads(v) for v in option(disk.arguments(), "-blockdev")]
    assert [n["node-name"] for n in nodes] == ["d1-file", "d1-fmt", "d1-o1-file", "d1-o1-fmt"]
    assert nodes[3]["backing"] == "d1-fmt" and "backing" not in nodes[1]
    assert disk.device_properties()["drive"] == "d1-o1-fmt"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cache": "bogus"}, "cache"),
        ({"aio": "native"}, "O_DIRECT"),
        ({"aio": "posix"}, "aio"),
        ({"bus": "ide"}, "bus"),
        ({"throttle": {"bps": -1}}, "throttle"),
    ],
)
def test_bad_disk_settings_are_refused(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        DiskSpec(id="d1", path="/img/d.qcow2", **fields)


def test_an_unlimited_throttle_is_no_throttle_and_settings_survive_the_state_file() -> None:
    assert DiskSpec(id="d1", path="/x", throttle=Throttle()).throttle is None
    disk = DiskSpec(id="d1", path="/x", cache="none", throttle=Throttle(bps=1048576))
    again = Inventory.from_dict(Inventory(disks=(disk,)).to_dict())
    assert again.disks == (disk,)


def test_shell_is_always_the_second_serial_port() -> None:
    argv = render(serial_console=False, shell_serial=True)
    assert option(argv, "-serial") == ["null", "chardev:vmctl-shell"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": ""}, "name"),
        ({"name": "a b"}, "name"),
        ({"memory_mib": 8}, "too small"),
        ({"memory_mib": 0}, "positive"),
        ({"memory_mib": 512, "max_memory_mib": 256, "memory_slots": 2}, "must exceed"),
        ({"max_memory_mib": 1024}, "both"),
        ({"cpus": 4, "max_cpus": 2}, "below"),
        ({"cpus": True}, "positive"),
        ({"accel": "hvf"}, "accel"),
        ({"kernel": None}, "nothing to boot"),
        ({"kernel": None, "initrd": "/i", "disks": [DiskSpec(id="d", path="/d")]}, "need a kernel"),
        ({"disks": [DiskSpec(id="x", path="/a")], "nics": [NicSpec(id="x")]}, "unique"),
        ({"machine": "pc q35"}, "machine"),
    ],
)
def test_bad_specs_are_refused_with_clear_errors(fields: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "vm1", "kernel": "/boot/vmlinuz"}
    base.update(fields)
    with pytest.raises(SpecError, match=message):
        VMSpec(**base)


@pytest.mark.parametrize(
    "make",
    [
        lambda: DiskSpec(id="1abc", path="/a"),
        lambda: DiskSpec(id="d", path="/a", format="vmdk"),  # type: ignore[arg-type]
        lambda: DiskSpec(id="d", path=""),
        lambda: NicSpec(id="n", mac="zz"),
        lambda: NicSpec(id="n", tap="much-too-long-interface-name"),
    ],
)
def test_bad_devices_are_refused(make: Any) -> None:
    with pytest.raises(SpecError):
        make()


def test_spec_round_trips_through_a_dict() -> None:
    spec = VMSpec(
        name="vm1",
        kernel=Path("/boot/vmlinuz"),
        disks=[DiskSpec(id="d", path=Path("/d"))],
        nics=[NicSpec(id="n")],
        extra_args=["-x"],
    )
    assert VMSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError):
        VMSpec.from_dict({"name": "vm1", "kernel": "/k", "bogus": 1})


def test_scsi_disks_get_a_controller() -> None:
    argv = render(machine="pc", disks=[DiskSpec(id="s0", path="/s0", bus="scsi")])
    devices = option(argv, "-device")
    assert json.loads(devices[0]) == {"driver": "virtio-scsi-pci", "id": "vmctl-scsi"}
    assert json.loads(devices[1]) == {
        "driver": "scsi-hd",
        "id": "s0",
        "drive": "s0-fmt",
        "serial": "s0",
        "write-cache": "on",
        "bus": "vmctl-scsi.0",
    }


def test_an_error_policy_renders_werror_and_rerror_and_bad_ones_are_refused() -> None:
    assert DiskSpec(id="d1", path="/x").device_properties().keys().isdisjoint({"werror", "rerror"})
    stop = DiskSpec(id="d1", path="/x", on_error="stop").device_properties()
    assert (stop["werror"], stop["rerror"]) == ("stop", "stop")
    enospc = DiskSpec(id="d1", path="/x", on_error="enospc").device_properties()
    assert (enospc["werror"], enospc["rerror"]) == ("enospc", "report")  # reads never run out of space
    with pytest.raises(SpecError, match="on_error"):
        DiskSpec(id="d1", path="/x", on_error="retry")  # type: ignore[arg-type]


def test_an_io_error_names_its_disk_from_the_block_node() -> None:
    data = {"node-name": "data-1-o2-fmt", "operation": "write", "action": "stop", "nospace": True, "reason": "x"}
    error = DiskIOError.from_event(data, 1.0)
    assert (error.disk_id, error.operation, error.nospace) == ("data-1", "write", True)
    assert DiskIOError.from_event({"node-name": "#block123"}, 1.0).disk_id is None


def test_a_guest_agent_gets_a_virtio_serial_port_on_a_controller_with_a_root_port_of_its_own() -> None:
    spec = VMSpec(name="vm1", kernel="/k", guest_agent=True)
    assert [c.id for c in spec.layout().controllers] == ["vmctl-vserial"]
    assert spec.layout().controllers[0].port == 0
    argv = spec.command_line(qemu_binary="qemu", run_dir=Path("/run/vm1"), accel="tcg")
    assert "socket,id=vmctl-agent,path=/run/vm1/agent.sock,server=on,wait=off" in option(argv, "-chardev")
    port = json.loads(option(argv, "-device")[-1])
    assert port == {
        "driver": "virtserialport",
        "id": "vmctl-agent-port",
        "chardev": "vmctl-agent",
        "name": "org.qemu.guest_agent.0",
        "bus": "vmctl-vserial.0",
    }
    assert VMSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(SpecError, match="guest_agent"):
        VMSpec(name="vm1", kernel="/k", guest_agent="yes")  # type: ignore[arg-type]


def test_vga_renders_a_display_device_and_is_off_by_default() -> None:
    assert not any("VGA" in a for a in render())
    assert {"driver": "VGA", "id": "vmctl-vga"} in [json.loads(d) for d in option(render(vga=True), "-device")]


def test_a_disk_given_by_path_and_keywords_is_the_disk_spec_of_those_settings() -> None:
    disk = DiskSpec.of("/img/a.qcow2", id="a", cache="none", aio="native", read_only=True)
    assert disk == DiskSpec(id="a", path="/img/a.qcow2", cache="none", aio="native", read_only=True)


def test_a_disk_spec_passes_through_the_adapter_unchanged_and_may_repeat_its_own_id() -> None:
    disk = DiskSpec(id="a", path="/img/a.qcow2", cache="none")
    assert DiskSpec.of(disk) is disk
    assert DiskSpec.of(disk, id="a") is disk


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"id": "b"}, "contradicts the DiskSpec's id"),
        ({"cache": "none"}, "cache given beside a DiskSpec"),
        ({"cahce": "none"}, "unknown disk option"),
    ],
)
def test_the_disk_adapter_refuses_options_it_would_otherwise_drop(options: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        DiskSpec.of(DiskSpec(id="a", path="/img/a.qcow2"), **options)


def test_a_disk_given_by_path_needs_an_id() -> None:
    with pytest.raises(InvalidArgument, match="needs an id="):
        DiskSpec.of("/img/a.qcow2", cache="none")


def test_a_nic_given_by_keywords_gets_a_generated_mac_once() -> None:
    nic = NicSpec.of(id="n1", queues=2)
    assert nic.mac is not None and nic.mac.startswith("52:54:00:") and nic.queues == 2
    assert NicSpec.of(nic) is nic  # a NicSpec with its MAC passes through unchanged


def test_the_nic_adapter_refuses_options_beside_a_nic_spec() -> None:
    with pytest.raises(InvalidArgument, match="queues given beside a NicSpec"):
        NicSpec.of(NicSpec(id="n1"), queues=2)
    with pytest.raises(InvalidArgument, match="needs an id="):
        NicSpec.of(tap="tap0")


def test_detect_zeroes_is_rendered_on_the_format_node_of_every_layer_and_unmap_needs_discard() -> None:
    disk = DiskSpec(id="a", path="/img/a.qcow2", discard=True, detect_zeroes="unmap").with_overlay("/img/o.qcow2")
    for layer in disk.layers:
        protocol, fmt = disk.layer_nodes(layer, "/dev/fdset/1")
        assert fmt["detect-zeroes"] == "unmap" and "detect-zeroes" not in protocol
    assert "detect-zeroes" not in DiskSpec(id="b", path="/img/b.qcow2").layer_nodes(0, "/x")[1]
    with pytest.raises(SpecError, match="needs discard=True"):
        DiskSpec(id="c", path="/img/c.qcow2", detect_zeroes="unmap")
