from __future__ import annotations

import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import attrs
import pytest

from vmctl import DiskSpec, NicSpec, Throttle, VMSpec
from vmctl.errors import InvalidArgument, SpecError
from vmctl.libvirt.domainxml import (
    device_alias,
    disk_xml,
    disks_from_xml,
    domain_xml,
    next_target_dev,
    nic_xml,
    nics_from_xml,
    spec_from_xml,
    target_devs,
    vmctl_id,
)
from vmctl.model.secret import Secret

RUN = Path("/run/vms/vm1")
QEMU = "/usr/bin/qemu-system-x86_64"
SECRET_UUID = "6f7a3c2e-1f0b-4a4e-9d8c-2b1a0e9f8d7c"


def spec(**fields: Any) -> VMSpec:
    base: dict[str, Any] = {"name": "vm1", "kernel": "/boot/vmlinuz"}
    base.update(fields)
    return VMSpec(**base)


def render(**fields: Any) -> ET.Element:
    return ET.fromstring(domain_xml(spec(**fields), run_dir=RUN, emulator=QEMU))


def full_spec() -> VMSpec:
    """Most of what a spec can say, at once."""
    return spec(
        initrd="/boot/initrd.img",
        append="console=ttyS0 panic=-1",
        memory_mib=512,
        max_memory_mib=2048,
        memory_slots=4,
        cpus=2,
        max_cpus=4,
        balloon=True,
        shell_serial=True,
        disks=[
            DiskSpec(
                id="root",
                path="/img/root.qcow2",
                cache="none",
                aio="native",
                discard=True,
                detect_zeroes="unmap",
                on_error="stop",
            ),
            DiskSpec(id="data", path="/img/data.raw", format="raw", read_only=True, bus="scsi"),
            DiskSpec(id="logs", path="/img/logs.qcow2", throttle=Throttle(bps_rd=1048576, iops=200), port=11),
            DiskSpec(id="snap", path="/img/base.qcow2", aio="io_uring").with_overlay("/img/s1.qcow2"),
        ],
        nics=[
            NicSpec(id="net0", mac="52:54:00:12:34:56"),
            NicSpec(id="net1", tap="tap1", queues=4, link_up=False),
        ],
    )


def one(element: ET.Element, path: str) -> ET.Element:
    found = element.find(path)
    assert found is not None, f"no {path} in {ET.tostring(element, encoding='unicode')}"
    return found


def validate(xml: str, tmp_path: Path) -> None:
    """Against libvirt's own RelaxNG schema (virt-xml-validate runs xmllint)."""
    missing = [tool for tool in ("virt-xml-validate", "xmllint") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{' and '.join(missing)} not found: install libvirt-clients and libxml2-utils")
    path = tmp_path / "domain.xml"
    path.write_text(xml)
    result = subprocess.run(["virt-xml-validate", str(path), "domain"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


# -- the domain --------------------------------------------------------------------------------


def test_a_minimal_domain_is_tcg_on_q35_with_the_console_on_a_file_and_no_display() -> None:
    domain = render()
    assert domain.get("type") == "qemu"
    assert domain.findtext("name") == "vm1" and domain.find("uuid") is None
    assert domain.findtext("memory") == domain.findtext("currentMemory") == str(256 * 1024)
    assert one(domain, "memory").get("unit") == "KiB"
    assert one(domain, "vcpu").attrib == {"placement": "static"} and domain.findtext("vcpu") == "1"
    os_type = domain.find("os/type")
    assert os_type is not None and os_type.attrib == {"arch": "x86_64", "machine": "q35"} and os_type.text == "hvm"
    assert domain.find("os/loader") is None and domain.findtext("os/kernel") == "/boot/vmlinuz"
    assert domain.find("features/acpi") is not None
    assert [domain.findtext(e) for e in ("on_poweroff", "on_reboot", "on_crash")] == ["destroy", "restart", "destroy"]
    assert domain.findtext("devices/emulator") == QEMU
    serials = domain.findall("devices/serial")
    assert [(s.get("type"), one(s, "target").get("port")) for s in serials] == [("file", "0")]
    assert one(serials[0], "source").get("path") == str(RUN / "console.log")
    assert one(domain, "devices/console/target").attrib == {"type": "serial", "port": "0"}
    assert domain.find("devices/graphics") is None
    assert one(domain, "devices/video/model").get("type") == "none"
    assert one(domain, "devices/memballoon").get("model") == "none"
    assert one(domain, "devices/controller[@type='usb']").get("model") == "none"
    assert domain.find("seclabel") is None


def test_kvm_makes_a_kvm_domain_and_a_uuid_is_kept() -> None:
    xml = domain_xml(spec(accel="kvm"), run_dir=RUN, emulator=QEMU, uuid=SECRET_UUID)
    domain = ET.fromstring(xml)
    assert domain.get("type") == "kvm" and domain.findtext("uuid") == SECRET_UUID
    assert ET.fromstring(domain_xml(spec(accel="tcg"), run_dir=RUN, emulator=QEMU)).get("type") == "qemu"


def test_memory_hotplug_renders_max_memory_and_the_numa_cell_libvirt_requires() -> None:
    domain = render(memory_mib=512, max_memory_mib=2048, memory_slots=4, cpus=2, max_cpus=4)
    max_memory = domain.find("maxMemory")
    assert max_memory is not None and max_memory.attrib == {"slots": "4", "unit": "KiB"}
    assert max_memory.text == str(2048 * 1024) and domain.findtext("memory") == str(512 * 1024)
    cells = domain.findall("cpu/numa/cell")
    assert [c.attrib for c in cells] == [{"id": "0", "cpus": "0-3", "memory": str(512 * 1024), "unit": "KiB"}]


def test_cpu_hotplug_renders_the_current_count_of_the_maximum() -> None:
    domain = render(cpus=2, max_cpus=4)
    vcpu = domain.find("vcpu")
    assert vcpu is not None and vcpu.attrib == {"placement": "static", "current": "2"} and vcpu.text == "4"
    assert domain.find("vcpus") is None and domain.find("cpu") is None  # libvirt needs neither for setVcpusFlags


def test_uefi_boots_ovmf_from_pflash_with_the_variable_store_in_the_run_dir() -> None:
    domain = render(firmware="uefi", uefi_vars="/srv/my-vars.fd")
    loader, nvram = domain.find("os/loader"), domain.find("os/nvram")
    assert loader is not None and loader.get("type") == "pflash" and loader.get("readonly") == "yes"
    assert loader.text == "/usr/share/OVMF/OVMF_CODE_4M.fd"
    assert nvram is not None and nvram.text == str(RUN / "uefi-vars.fd") and nvram.get("template") == "/srv/my-vars.fd"
    assert one(render(firmware="uefi"), "os/nvram").get("template") == "/usr/share/OVMF/OVMF_VARS_4M.fd"


def test_kernel_initrd_and_append_render_in_os() -> None:
    domain = render(initrd="/boot/initrd.img", append="console=ttyS0")
    assert [domain.findtext(f"os/{tag}") for tag in ("kernel", "initrd", "cmdline")] == [
        "/boot/vmlinuz",
        "/boot/initrd.img",
        "console=ttyS0",
    ]
    assert render().find("os/cmdline") is None


def test_the_shell_is_ttys1_on_a_unix_socket_in_the_run_dir() -> None:
    serials = render(shell_serial=True).findall("devices/serial")
    assert [(s.get("type"), one(s, "target").get("port")) for s in serials] == [("file", "0"), ("unix", "1")]
    assert one(serials[1], "source").attrib == {"mode": "bind", "path": str(RUN / "shell.sock")}


def test_the_shell_stays_ttys1_without_a_console() -> None:
    domain = render(serial_console=False, shell_serial=True)
    serials = domain.findall("devices/serial")
    assert [(s.get("type"), one(s, "target").get("port")) for s in serials] == [("null", "0"), ("unix", "1")]
    assert domain.find("devices/console") is None
    assert render(serial_console=False).find("devices/serial") is None


def test_a_shell_socket_path_too_long_for_the_kernel_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="too long"):
        domain_xml(spec(shell_serial=True), run_dir=Path("/run/" + "x" * 120), emulator=QEMU)


def test_a_balloon_renders_a_virtio_memballoon() -> None:
    assert one(render(balloon=True), "devices/memballoon").get("model") == "virtio"


def test_a_guest_agent_is_libvirts_own_agent_channel(tmp_path: Path) -> None:
    validate(domain_xml(spec(guest_agent=True), run_dir=RUN, emulator=QEMU), tmp_path)
    parsed, _ = spec_from_xml(domain_xml(spec(guest_agent=True), run_dir=RUN, emulator=QEMU))
    assert parsed.guest_agent
    channel = one(render(guest_agent=True), "devices/channel")
    assert (channel.get("type"), channel.find("source").get("mode")) == ("unix", "bind")  # type: ignore[union-attr]
    assert channel.find("target").attrib == {"type": "virtio", "name": "org.qemu.guest_agent.0"}  # type: ignore[union-attr]


def test_q35_gets_a_root_port_per_device_plus_the_hotplug_slots() -> None:
    full = full_spec()
    domain = ET.fromstring(domain_xml(full, run_dir=RUN, emulator=QEMU))
    ports = domain.findall("devices/controller[@model='pcie-root-port']")
    # balloon, the SCSI controller, three virtio disks, two NICs; the SCSI disk needs none. Port 11 is pinned.
    assert len(ports) == full.layout().root_ports == 7 + 8
    assert [p.get("index") for p in ports] == [str(i) for i in range(1, 16)]
    assert one(domain, "devices/controller[@model='pcie-root']").get("index") == "0"
    assert len(render(hotplug_slots=0).findall("devices/controller[@model='pcie-root-port']")) == 0


def test_a_plain_pci_machine_has_no_root_ports_and_keeps_pinned_pci_addresses() -> None:
    domain = render(machine="pc", disks=[DiskSpec(id="d1", path="/img/d.qcow2", pci_addr="0x7.0")])
    assert domain.find("devices/controller[@type='pci']") is None
    assert one(domain, "os/type").get("machine") == "pc"
    address = domain.find("devices/disk/address")
    assert address is not None and (address.get("bus"), address.get("slot"), address.get("function")) == (
        "0x00",
        "0x07",
        "0x0",
    )


def test_disks_get_target_devs_in_order_per_bus_and_scsi_a_controller() -> None:
    domain = ET.fromstring(domain_xml(full_spec(), run_dir=RUN, emulator=QEMU))
    targets = [(d.findtext("serial"), one(d, "target").attrib) for d in domain.findall("devices/disk")]
    assert targets == [
        ("root", {"dev": "vda", "bus": "virtio"}),
        ("data", {"dev": "sda", "bus": "scsi"}),
        ("logs", {"dev": "vdb", "bus": "virtio"}),
        ("snap", {"dev": "vdc", "bus": "virtio"}),
    ]
    assert one(domain, "devices/controller[@type='scsi']").get("model") == "virtio-scsi"
    assert render().find("devices/controller[@type='scsi']") is None


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"extra_args": ["-device", "pvpanic"]}, "extra_args"),
        ({"no_shutdown": True}, "no_shutdown"),
        ({"sandbox": False}, "sandbox"),
        ({"run_as": "nobody"}, "run_as"),
        ({"run_as": None}, "run_as"),
    ],
)
def test_what_libvirt_cannot_carry_is_refused_naming_the_field(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError, match=field):
        domain_xml(spec(**fields), run_dir=RUN, emulator=QEMU)


def test_run_as_root_is_a_static_dac_label() -> None:
    seclabel = render(run_as="root").find("seclabel")
    assert seclabel is not None and seclabel.attrib == {"type": "static", "model": "dac", "relabel": "no"}
    assert seclabel.findtext("label") == "+0:+0"


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"firmware": "uefi", "kernel": None, "disks": [DiskSpec(id="root", path="/img/r.qcow2")]},
        {"machine": "pc", "serial_console": False, "shell_serial": True, "run_as": "root", "accel": "kvm"},
    ],
)
def test_rendered_domains_validate_against_libvirts_schema(fields: dict[str, Any], tmp_path: Path) -> None:
    validate(domain_xml(spec(**fields), run_dir=RUN, emulator=QEMU), tmp_path)


def test_a_domain_with_every_kind_of_device_validates_against_libvirts_schema(tmp_path: Path) -> None:
    full = full_spec()
    encrypted = DiskSpec(id="sec", path="/img/sec.qcow2", encryption=Secret("pass")).with_overlay("/img/sec1.qcow2")
    full = attrs.evolve(full, firmware="uefi", disks=(*full.disks, encrypted))
    validate(domain_xml(full, run_dir=RUN, emulator=QEMU, secret_uuids={"sec": SECRET_UUID}), tmp_path)


# -- disks -------------------------------------------------------------------------------------


def disk_element(disk: DiskSpec, target_dev: str = "vda", **kwargs: Any) -> ET.Element:
    return ET.fromstring(disk_xml(disk, target_dev=target_dev, **kwargs))


def test_a_qcow2_virtio_disk_renders_driver_source_target_serial_and_alias() -> None:
    element = disk_element(DiskSpec(id="root", path="/img/root.qcow2"))
    assert element.attrib == {"type": "file", "device": "disk"}
    assert one(element, "driver").attrib == {"name": "qemu", "type": "qcow2", "cache": "writeback", "io": "threads"}
    assert one(element, "source").attrib == {"file": "/img/root.qcow2"}
    assert one(element, "target").attrib == {"dev": "vda", "bus": "virtio"}
    assert element.findtext("serial") == "root"  # the guest finds it by this, as under vmctl's own QEMU
    assert one(element, "alias").get("name") == "ua-root"
    assert element.find("readonly") is None and element.find("iotune") is None and element.find("address") is None


def test_a_raw_read_only_scsi_disk() -> None:
    element = disk_element(DiskSpec(id="data", path="/img/d.raw", format="raw", read_only=True, bus="scsi"), "sdb")
    assert one(element, "driver").get("type") == "raw" and element.find("readonly") is not None
    assert one(element, "target").attrib == {"dev": "sdb", "bus": "scsi"}


def test_cache_aio_discard_detect_zeroes_and_error_policy_map_to_libvirts_names() -> None:
    disk = DiskSpec(
        id="d1", path="/img/d.qcow2", cache="directsync", aio="native", discard=True, detect_zeroes="on",
        on_error="enospc",
    )  # fmt: skip
    driver = disk_element(disk).find("driver")
    assert driver is not None and driver.get("cache") == "directsync" and driver.get("io") == "native"
    assert driver.get("detect_zeroes") == "on"
    assert driver.get("discard") == "unmap" and driver.get("error_policy") == "enospace"
    assert "rerror_policy" not in driver.attrib  # libvirt, like vmctl, reports read errors under enospace
    report = disk_element(DiskSpec(id="d1", path="/img/d.qcow2", on_error="report")).find("driver")
    assert report is not None and report.get("error_policy") == "report"


def test_a_throttle_renders_only_its_limits_in_iotune() -> None:
    disk = DiskSpec(id="d1", path="/img/d.qcow2", throttle=Throttle(bps_rd=1000, bps_wr=2000, iops=50))
    iotune = disk_element(disk).find("iotune")
    assert iotune is not None
    assert {e.tag: e.text for e in iotune} == {
        "read_bytes_sec": "1000",
        "write_bytes_sec": "2000",
        "total_iops_sec": "50",
    }


def test_overlays_render_as_the_backing_chain_below_the_active_layer() -> None:
    disk = DiskSpec(id="d1", path="/img/base.raw", format="raw").with_overlay("/img/s1.qcow2").with_overlay("/img/s2")
    element = disk_element(disk)
    assert one(element, "driver").get("type") == "qcow2"
    assert one(element, "source").get("file") == "/img/s2"
    first = element.find("backingStore")
    assert first is not None and one(first, "source").get("file") == "/img/s1.qcow2"
    assert one(first, "format").get("type") == "qcow2"
    base = first.find("backingStore")
    assert base is not None and one(base, "source").get("file") == "/img/base.raw"
    assert one(base, "format").get("type") == "raw" and base.find("backingStore") is None


def test_a_chain_libvirt_would_number_otherwise_is_refused() -> None:
    disk = DiskSpec(id="d1", path="/img/s3.qcow2", base_layer=3, overlays=[{"layer": 4, "path": "/img/s4.qcow2"}])
    with pytest.raises(SpecError, match="layer numbers"):
        disk_xml(disk, target_dev="vda")


def test_an_encrypted_disk_takes_its_passphrase_from_a_libvirt_secret_on_every_layer() -> None:
    disk = DiskSpec(id="d1", path="/img/d.qcow2", encryption=Secret("hunter2")).with_overlay("/img/s1.qcow2")
    with pytest.raises(SpecError, match="libvirt secret"):
        disk_xml(disk, target_dev="vda")
    element = disk_element(disk, secret_uuid=SECRET_UUID)
    secrets = [e.attrib for e in element.iter("secret")]
    assert secrets == [{"type": "passphrase", "uuid": SECRET_UUID}] * 2
    assert [e.get("format") for e in element.iter("encryption")] == ["luks", "luks"]
    assert "hunter2" not in disk_xml(disk, target_dev="vda", secret_uuid=SECRET_UUID)


def test_a_disk_pinned_to_a_root_port_sits_on_the_bus_of_that_port() -> None:
    address = disk_element(DiskSpec(id="d1", path="/img/d.qcow2", port=4)).find("address")
    assert address is not None and address.attrib == {
        "type": "pci",
        "domain": "0x0000",
        "bus": "0x05",
        "slot": "0x00",
        "function": "0x0",
    }


# -- NICs --------------------------------------------------------------------------------------


def test_a_nic_without_tap_is_user_networking() -> None:
    element = ET.fromstring(nic_xml(NicSpec(id="net0", mac="52:54:00:12:34:56")))
    assert element.get("type") == "user" and element.find("target") is None
    assert one(element, "mac").get("address") == "52:54:00:12:34:56"
    assert one(element, "model").get("type") == "virtio"
    assert one(element, "link").get("state") == "up"
    assert one(element, "alias").get("name") == "ua-net0"
    assert element.find("driver") is None


def test_a_tap_nic_is_an_unmanaged_ethernet_interface_with_its_queues() -> None:
    element = ET.fromstring(nic_xml(NicSpec(id="net1", tap="tap1", queues=4, link_up=False)))
    assert element.get("type") == "ethernet" and element.find("mac") is None
    assert one(element, "target").attrib == {"dev": "tap1", "managed": "no"}
    assert one(element, "driver").attrib == {"queues": "4"}
    assert one(element, "link").get("state") == "down"


def test_without_vhost_a_virtio_nic_stays_in_qemu_and_tcg_domains_use_that() -> None:
    element = ET.fromstring(nic_xml(NicSpec(id="net0", tap="tap0"), vhost=False))
    assert one(element, "driver").attrib == {"name": "qemu"}
    assert one(render(nics=[NicSpec(id="net0")]), "devices/interface/driver").get("name") == "qemu"
    assert render(accel="kvm", nics=[NicSpec(id="net0")]).find("devices/interface/driver") is None


def test_other_nic_models_keep_their_names() -> None:
    assert one(ET.fromstring(nic_xml(NicSpec(id="n", model="e1000e"))), "model").get("type") == "e1000e"


def test_multiqueue_user_networking_is_refused() -> None:
    with pytest.raises(SpecError, match="multiqueue"):
        nic_xml(NicSpec(id="net0", queues=2))


# -- parsing back ------------------------------------------------------------------------------


def test_disks_and_nics_round_trip_through_the_domain_xml() -> None:
    full = full_spec()
    xml = domain_xml(full, run_dir=RUN, emulator=QEMU)
    assert disks_from_xml(xml) == full.disks
    assert nics_from_xml(xml) == full.nics
    assert target_devs(xml) == {"root": "vda", "data": "sda", "logs": "vdb", "snap": "vdc"}


def test_a_parsed_encrypted_disk_has_no_passphrase() -> None:
    disk = DiskSpec(id="d1", path="/img/d.qcow2", encryption=Secret("pass"))
    xml = domain_xml(spec(disks=[disk]), run_dir=RUN, emulator=QEMU, secret_uuids={"d1": SECRET_UUID})
    assert disks_from_xml(xml) == (DiskSpec(id="d1", path="/img/d.qcow2"),)


LIBVIRTS_OWN = """
<domain type='qemu'>
  <name>other</name>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/img/a.qcow2' index='2'/>
      <backingStore type='file' index='3'>
        <format type='qcow2'/>
        <source file='/img/base.qcow2'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <serial>disk-a</serial>
      <alias name='virtio-disk0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source file='/img/b.raw'/>
      <target dev='vdb' bus='virtio'/>
      <alias name='virtio-disk1'/>
    </disk>
    <disk type='file' device='cdrom'>
      <source file='/img/cd.iso'/>
      <target dev='sdc' bus='sata'/>
    </disk>
    <controller type='pci' index='0' model='pcie-root'/>
    <controller type='pci' index='3' model='pcie-root-port'/>
    <interface type='ethernet'>
      <mac address='52:54:00:aa:bb:cc'/>
      <target dev='tap7' managed='no'/>
      <model type='e1000e'/>
      <alias name='net0'/>
      <address type='pci' domain='0x0000' bus='0x03' slot='0x00' function='0x0'/>
    </interface>
    <interface type='user'>
      <model type='virtio'/>
    </interface>
  </devices>
</domain>
"""


def test_devices_libvirt_named_take_their_id_from_the_serial_target_dev_or_alias() -> None:
    disks = disks_from_xml(LIBVIRTS_OWN)
    assert [d.id for d in disks] == ["disk-a", "vdb"]  # the CD-ROM is no vmctl disk
    assert disks[0].overlays[0].path == "/img/a.qcow2" and disks[0].path == "/img/base.qcow2"
    assert disks[0].port == 2  # the root port of index 3, as domain_xml numbers them
    assert (disks[1].format, disks[1].cache, disks[1].aio, disks[1].port) == ("raw", "none", "native", None)
    nics = nics_from_xml(LIBVIRTS_OWN)
    assert [(n.id, n.tap, n.model, n.mac) for n in nics] == [
        ("net0", "tap7", "e1000e", "52:54:00:aa:bb:cc"),
        ("net1", None, "virtio-net-pci", None),
    ]
    assert target_devs(LIBVIRTS_OWN) == {"disk-a": "vda", "vdb": "vdb"}


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("<disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vda' bus='virtio'/></disk>", "file"),
        ("<disk type='file' device='disk'><source file='/x'/><target dev='hda' bus='ide'/></disk>", "virtio"),
        ("<interface type='bridge'><source bridge='br0'/></interface>", "bridge"),
    ],
)
def test_devices_vmctl_cannot_model_are_refused_when_parsed(device: str, message: str) -> None:
    xml = f"<domain type='qemu'><name>x</name><devices>{device}</devices></domain>"
    with pytest.raises(SpecError, match=message):
        disks_from_xml(xml)
        nics_from_xml(xml)


def test_parsing_what_is_not_xml_is_an_invalid_argument() -> None:
    with pytest.raises(InvalidArgument, match="not a domain XML"):
        disks_from_xml("<domain")


# -- names -------------------------------------------------------------------------------------


def test_device_aliases_are_user_aliases_and_map_back() -> None:
    assert device_alias("root") == "ua-root" and vmctl_id("ua-root") == "root"
    with pytest.raises(SpecError, match=r"no '\.'"):
        device_alias("root.a")  # libvirt would drop the alias ua-root.a without a word
    with pytest.raises(SpecError, match=r"no '\.'"):
        disk_xml(DiskSpec(id="root.a", path="/img/r.qcow2"), target_dev="vda")
    for alias in ("virtio-disk0", "ua-"):
        with pytest.raises(InvalidArgument, match="not a vmctl device alias"):
            vmctl_id(alias)


def test_next_target_dev_skips_the_used_names() -> None:
    assert next_target_dev([], "virtio-blk") == "vda"
    assert next_target_dev(["vda", "vdc", "sdb"], "virtio-blk") == "vdb"
    assert next_target_dev(["vda", "vdb"], "scsi") == "sda"
    assert next_target_dev([f"vd{chr(c)}" for c in range(ord("a"), ord("z") + 1)], "virtio-blk") == "vdaa"
    with pytest.raises(InvalidArgument):
        next_target_dev([], "ide")  # type: ignore[arg-type]


# -- hotplug and taking over a domain ---------------------------------------------------------


def test_a_hotplugged_nic_without_tap_asks_libvirt_for_a_new_tap_not_user_networking() -> None:
    element = ET.fromstring(nic_xml(NicSpec(id="net1", mac="52:54:00:00:00:01", queues=2), new_tap=True))
    assert element.get("type") == "ethernet" and element.find("target") is None
    assert one(element, "driver").get("queues") == "2"


def test_a_domain_xml_reads_back_as_the_spec_and_the_run_dir_of_its_shell() -> None:
    original = full_spec()
    parsed, run_dir = spec_from_xml(domain_xml(original, run_dir=RUN, emulator=QEMU))
    assert run_dir == RUN
    for field in ("name", "memory_mib", "max_memory_mib", "memory_slots", "cpus", "max_cpus", "machine", "kernel",
                  "initrd", "append", "balloon", "shell_serial", "serial_console", "disks", "nics"):  # fmt: skip
        assert getattr(parsed, field) == getattr(original, field), field
    assert parsed.accel == "tcg"


def test_a_domain_without_serial_ports_reads_back_without_a_run_dir() -> None:
    parsed, run_dir = spec_from_xml(domain_xml(spec(serial_console=False), run_dir=RUN, emulator=QEMU))
    assert run_dir is None and not parsed.serial_console and not parsed.shell_serial
