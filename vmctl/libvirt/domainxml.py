"""A ``VMSpec`` as a libvirt domain XML: libvirt runs QEMU, vmctl renders what it runs.

Pure: no I/O, no libvirt; devices come from :mod:`vmctl.libvirt.devicexml` (re-exported here).

What the domain carries: name, UUID (if given), memory (KiB) and the hotplug ceiling
(``<maxMemory slots>`` with the one NUMA cell libvirt requires for memory hotplug), vCPUs
(``current`` of ``max_cpus``; the boot vCPUs are not hotpluggable, the rest are, which is all
``setVcpusFlags`` needs and what vmctl unplugs), machine, accelerator (``type='kvm'`` for
``accel='kvm'``, else TCG), firmware (SeaBIOS, or OVMF as a read-only pflash with the VM's
variable store ``run_dir/uefi-vars.fd``, which libvirt copies from ``uefi_vars_template`` the
first time), kernel / initrd / append, the disks and NICs, the SCSI controller, the balloon,
the serial ports (the console, ttyS0, logged to ``run_dir/console.log``; the shell, ttyS1, on
``run_dir/shell.sock``), ``hotplug_slots`` free PCIe root ports past the devices' own, and no
display. Guest poweroff ends the domain, reboot restarts it, a crash ends it, as under vmctl.

What it refuses (``SpecError`` naming the field) unless left at its default:
``extra_args`` (libvirt's ``<qemu:commandline>`` would take them, but they name vmctl's
devices, which libvirt names otherwise), ``no_shutdown`` (libvirt's QEMU driver has no
``preserve`` on poweroff), ``sandbox=False`` (libvirt's qemu.conf, ``seccomp_sandbox``,
decides, and by default sets the same ``-sandbox`` as vmctl) and ``run_as`` other than
``'auto'`` (libvirt's qemu.conf user, where vmctl takes a uid from its pool) or root (a static DAC
label). What vmctl does itself and libvirt does otherwise is not carried: the QMP socket,
the pid file, passing files by fd, the master key (libvirt has its own).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from vmctl.errors import SpecError
from vmctl.libvirt.devicexml import (
    device_alias,
    disk_element,
    disk_xml,
    disks_from_xml,
    next_target_dev,
    nic_element,
    nic_xml,
    nics_from_xml,
    target_devs,
    vmctl_id,
)
from vmctl.model.agent import AGENT_PORT_NAME
from vmctl.model.names import SHELL_SOCKET, UEFI_VARS_FILE
from vmctl.model.validate import check_unix_path
from vmctl.model.vm import VMSpec

__all__ = [
    "CONSOLE_LOG",
    "device_alias",
    "disk_xml",
    "disks_from_xml",
    "domain_xml",
    "next_target_dev",
    "nic_xml",
    "nics_from_xml",
    "spec_from_xml",
    "target_devs",
    "vmctl_id",
]

#: The serial console's output, in the run dir (libvirt writes it; vmctl keeps it in a ring buffer).
CONSOLE_LOG: Final = "console.log"
_ROOT = ("root", "0", "root:root", "0:0", "root:0", "0:root")


def _refuse_what_libvirt_cannot_carry(spec: VMSpec) -> None:
    if spec.extra_args:
        raise SpecError(f"{spec.name}: extra_args cannot be passed through libvirt (they name vmctl's own devices)")
    if spec.no_shutdown:
        raise SpecError(f"{spec.name}: no_shutdown: libvirt's QEMU driver ends the domain on guest poweroff")
    if not spec.sandbox:
        raise SpecError(f"{spec.name}: sandbox=False: libvirt's qemu.conf (seccomp_sandbox) decides the sandbox")
    if spec.run_as not in ("auto", *_ROOT):
        raise SpecError(
            f"{spec.name}: run_as={spec.run_as!r}: under libvirt QEMU runs as qemu.conf's user ('auto') or root"
        )


def _memory(domain: ET.Element, spec: VMSpec) -> None:
    kib = str(spec.memory_mib * 1024)
    if spec.max_memory_mib is not None:
        max_kib = str(spec.max_memory_mib * 1024)
        ET.SubElement(domain, "maxMemory", slots=str(spec.memory_slots), unit="KiB").text = max_kib
    ET.SubElement(domain, "memory", unit="KiB").text = kib
    ET.SubElement(domain, "currentMemory", unit="KiB").text = kib
    max_cpus = spec.max_cpus or spec.cpus
    vcpu = ET.SubElement(domain, "vcpu", placement="static")
    vcpu.text = str(max_cpus)
    if max_cpus > spec.cpus:
        vcpu.set("current", str(spec.cpus))


def _os(domain: ET.Element, spec: VMSpec, run_dir: Path) -> None:
    os = ET.SubElement(domain, "os")
    ET.SubElement(os, "type", arch="x86_64", machine=spec.machine).text = "hvm"
    if spec.firmware == "uefi":
        ET.SubElement(os, "loader", readonly="yes", secure="no", type="pflash").text = spec.uefi_code
        ET.SubElement(os, "nvram", template=spec.uefi_vars_template).text = str(run_dir / UEFI_VARS_FILE)
    for tag, value in (("kernel", spec.kernel), ("initrd", spec.initrd), ("cmdline", spec.append)):
        if value:
            ET.SubElement(os, tag).text = value
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")  # without it libvirt turns ACPI off: no power button, no memory hotplug
    ET.SubElement(features, "apic")
    if spec.max_memory_mib is not None:
        # libvirt refuses memory hotplug without a NUMA node: one cell, all vCPUs, the boot memory.
        numa = ET.SubElement(ET.SubElement(domain, "cpu"), "numa")
        cpus = f"0-{(spec.max_cpus or spec.cpus) - 1}"
        ET.SubElement(numa, "cell", id="0", cpus=cpus, memory=str(spec.memory_mib * 1024), unit="KiB")


def _serials(devices: ET.Element, spec: VMSpec, run_dir: Path) -> None:
    if spec.serial_console:
        console = str(run_dir / CONSOLE_LOG)
        serial = ET.SubElement(devices, "serial", type="file")
        ET.SubElement(serial, "source", path=console)
        ET.SubElement(serial, "target", port="0")
        # libvirt makes a serial console the same device as serial port 0.
        mirror = ET.SubElement(devices, "console", type="file")
        ET.SubElement(mirror, "source", path=console)
        ET.SubElement(mirror, "target", type="serial", port="0")
    if spec.shell_serial:
        if not spec.serial_console:
            null = ET.SubElement(devices, "serial", type="null")  # the shell is always ttyS1
            ET.SubElement(null, "target", port="0")
        serial = ET.SubElement(devices, "serial", type="unix")
        ET.SubElement(serial, "source", mode="bind", path=check_unix_path("shell_serial", run_dir / SHELL_SOCKET))
        ET.SubElement(serial, "target", port="1")


def domain_xml(
    spec: VMSpec,
    *,
    run_dir: Path,
    emulator: str,
    uuid: str | None = None,
    secret_uuids: Mapping[str, str] | None = None,
) -> str:
    """The whole ``<domain>`` of ``spec`` (see the module's docstring for what it carries).

    ``run_dir`` holds the console log, the shell socket and the UEFI variable store;
    ``emulator`` is the QEMU binary; ``secret_uuids`` maps an encrypted disk's id to the libvirt
    secret holding its passphrase. Disks get target devs in order (vda, vdb, ...; sda, ... on SCSI)."""
    _refuse_what_libvirt_cannot_carry(spec)
    layout = spec.layout()
    domain = ET.Element("domain", type="kvm" if spec.accel == "kvm" else "qemu")
    ET.SubElement(domain, "name").text = spec.name
    if uuid is not None:
        ET.SubElement(domain, "uuid").text = uuid
    _memory(domain, spec)
    _os(domain, spec, run_dir)
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(domain, event).text = action
    if spec.run_as in _ROOT:
        seclabel = ET.SubElement(domain, "seclabel", type="static", model="dac", relabel="no")
        ET.SubElement(seclabel, "label").text = "+0:+0"

    devices = ET.SubElement(domain, "devices")
    ET.SubElement(devices, "emulator").text = emulator
    used: list[str] = []
    for disk in spec.disks:
        used.append(next_target_dev(used, disk.bus))
        secret = (secret_uuids or {}).get(disk.id)
        devices.append(disk_element(disk, target_dev=used[-1], secret_uuid=secret))
    for nic in spec.nics:
        devices.append(nic_element(nic, vhost=spec.accel == "kvm"))
    if spec.pcie:
        ET.SubElement(devices, "controller", type="pci", index="0", model="pcie-root")
        # Root port N is the controller of index N + 1: a device pinned to port N sits on bus N + 1.
        for index in range(layout.root_ports):
            ET.SubElement(devices, "controller", type="pci", index=str(index + 1), model="pcie-root-port")
    if any(disk.bus == "scsi" for disk in spec.disks):
        ET.SubElement(devices, "controller", type="scsi", index="0", model="virtio-scsi")
    # libvirt adds a USB controller by default, which would take one of the root ports.
    ET.SubElement(devices, "controller", type="usb", model="none")
    _serials(devices, spec, run_dir)
    if spec.guest_agent:  # libvirt's own agent channel: it places the socket and watches the port
        channel = ET.SubElement(devices, "channel", type="unix")
        ET.SubElement(channel, "source", mode="bind")
        ET.SubElement(channel, "target", type="virtio", name=AGENT_PORT_NAME)
    ET.SubElement(ET.SubElement(devices, "video"), "model", type="vga" if spec.vga else "none")
    ET.SubElement(devices, "memballoon", model="virtio" if spec.balloon else "none")
    ET.indent(domain)
    return ET.tostring(domain, encoding="unicode")


def spec_from_xml(xml: str) -> tuple[VMSpec, Path | None]:
    """The ``VMSpec`` a defined domain's XML describes, and its run dir (where its shell socket or
    console log is), for ``LibvirtVM.open`` on a domain vmctl did not define. Fields the XML does
    not say are left at their defaults."""
    domain = ET.fromstring(xml)
    memory_kib = int(domain.findtext("currentMemory") or domain.findtext("memory") or 0)
    max_memory = domain.find("maxMemory")
    vcpu = domain.find("vcpu")
    max_cpus = int(vcpu.text or 1) if vcpu is not None else 1
    cpus = int(vcpu.get("current", max_cpus)) if vcpu is not None else 1
    os = domain.find("os")
    os_type = os.find("type") if os is not None else None
    machine = os_type.get("machine", "q35") if os_type is not None else "q35"
    by_port = {_port(serial): serial for serial in domain.iter("serial")}
    console = by_port.get("0")
    shell = by_port.get("1")
    run_dir: Path | None = None
    shell_path = _source_path(shell, "unix")
    console_path = _source_path(console, "file")
    if shell_path:
        run_dir = Path(shell_path).parent
    elif console_path:
        run_dir = Path(console_path).parent
    balloon = domain.find("devices/memballoon")
    spec = VMSpec(
        name=domain.findtext("name") or "",
        memory_mib=memory_kib // 1024,
        max_memory_mib=int(max_memory.text or 0) // 1024 if max_memory is not None else None,
        memory_slots=int(max_memory.get("slots", 0)) if max_memory is not None else 0,
        cpus=cpus,
        max_cpus=max_cpus if max_cpus > cpus else None,
        machine="q35" if "q35" in machine else "pc",
        firmware="uefi" if os is not None and os.find("loader") is not None else "bios",
        accel="kvm" if domain.get("type") == "kvm" else "tcg",
        kernel=os.findtext("kernel") if os is not None else None,
        initrd=os.findtext("initrd") if os is not None else None,
        append=(os.findtext("cmdline") or "") if os is not None else "",
        disks=disks_from_xml(xml),
        nics=nics_from_xml(xml),
        serial_console=console_path is not None,
        shell_serial=shell_path is not None,
        balloon=balloon is not None and balloon.get("model") != "none",
        vga=any(model.get("type") == "vga" for model in domain.iterfind("devices/video/model")),
        guest_agent=any(target.get("name") == AGENT_PORT_NAME for target in domain.iterfind("devices/channel/target")),
    )
    return spec, run_dir


def _port(serial: ET.Element) -> str:
    target = serial.find("target")
    return target.get("port", "") if target is not None else ""


def _source_path(serial: ET.Element | None, kind: str) -> str | None:
    if serial is None or serial.get("type") != kind:
        return None
    source = serial.find("source")
    return source.get("path") if source is not None else None
