"""What a VM is made of, as frozen values, and the QEMU command line they render to."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from vmctl.errors import SpecError

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEVICE_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
_PCI_ADDR = re.compile(r"0x[0-9a-f]{1,2}\.[0-7]")

QMP_SOCKET = "qmp.sock"
SHELL_SOCKET = "shell.sock"
MIGRATION_SOCKET = "migrate.sock"
LOG_FILE = "qemu.log"
PID_FILE = "qemu.pid"
CONSOLE_CHARDEV = "vmctl-console"
SHELL_CHARDEV = "vmctl-shell"
MONITOR_CHARDEV = "vmctl-qmp"
BALLOON_DEVICE = "vmctl-balloon"

DiskFormat = Literal["qcow2", "raw"]
DiskBus = Literal["virtio-blk", "scsi"]
SCSI_CONTROLLER = "vmctl-scsi"
Accelerator = Literal["kvm", "tcg"]


def _check_pci_addr(device_id: str, value: str | None) -> None:
    if value is not None and not _PCI_ADDR.fullmatch(value):
        raise SpecError(f"{device_id}: PCI address {value!r} is not of the form 0x5.0")


def _addr(pci_addr: str | None) -> str:
    return f",addr={pci_addr}" if pci_addr else ""


def pci_addr_from_devfn(devfn: int) -> str:
    return f"0x{devfn >> 3:x}.{devfn & 7}"


def _check_id(kind: str, value: str, *, max_length: int = 31) -> None:
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value) or len(value) > max_length:
        raise SpecError(
            f"{kind} id {value!r} must start with a letter and use only letters, digits, _ . - (max {max_length})"
        )


def _path(value: str | os.PathLike[str]) -> str:
    return os.fspath(value)


def _optional_path(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def _overlays(value: Iterable[Overlay | Mapping[str, Any]]) -> tuple[Overlay, ...]:
    return tuple(o if isinstance(o, Overlay) else Overlay(**o) for o in value)


def _disks(value: Iterable[DiskSpec]) -> tuple[DiskSpec, ...]:
    return tuple(value)


def _nics(value: Iterable[NicSpec]) -> tuple[NicSpec, ...]:
    return tuple(value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


def disk_node_names(disk_id: str, layer: int = 0) -> tuple[str, str]:
    """The protocol and format node names of one layer of a disk, derived from its id and the
    layer's number (0 for the image the disk was created with), so nothing else is stored."""
    if layer == 0:
        return f"{disk_id}-file", f"{disk_id}-fmt"
    return f"{disk_id}-o{layer}-file", f"{disk_id}-o{layer}-fmt"


@attrs.frozen(kw_only=True)
class Overlay:
    """A qcow2 layer on top of a disk's base image (an external snapshot)."""

    layer: int
    path: str = attrs.field(converter=_path)


@attrs.frozen(kw_only=True)
class DiskSpec:
    id: str
    path: str = attrs.field(converter=_path)
    format: DiskFormat = "qcow2"
    read_only: bool = False
    bus: DiskBus = "virtio-blk"
    pci_addr: str | None = None  # pinned so that a migration target lays out its PCI bus alike
    base_layer: int = 0  # the layer number of ``path`` (not 0 once a stream or mirror replaced it)
    overlays: tuple[Overlay, ...] = attrs.field(default=(), converter=_overlays)  # bottom to top

    def __attrs_post_init__(self) -> None:
        _check_id("disk", self.id, max_length=20)  # node names derived from it must fit QEMU's 31
        if re.search(r"-o\d+$", self.id):
            raise SpecError(f"disk id {self.id!r} must not end in -o<number> (that names snapshot layers)")
        _check_pci_addr(self.id, self.pci_addr)
        if self.format not in ("qcow2", "raw"):
            raise SpecError(f"disk {self.id}: format must be qcow2 or raw, not {self.format!r}")
        if self.bus not in ("virtio-blk", "scsi"):
            raise SpecError(f"disk {self.id}: bus must be virtio-blk or scsi, not {self.bus!r}")
        if not self.path:
            raise SpecError(f"disk {self.id}: the image path is empty")

    @property
    def layers(self) -> list[int]:
        """Layer numbers from the base image up to the active (top) one."""
        return [self.base_layer, *(o.layer for o in self.overlays)]

    @property
    def active_node(self) -> str:
        """The format node the guest's device reads and writes."""
        return disk_node_names(self.id, self.layers[-1])[1]

    def next_layer(self) -> int:
        return max(self.layers) + 1

    def arguments(self) -> list[str]:
        file_node, format_node = disk_node_names(self.id, self.base_layer)
        read_only = "on" if self.read_only else "off"
        argv = [
            "-blockdev",
            f"driver=file,node-name={file_node},filename={_escape(self.path)},read-only={read_only}",
            "-blockdev",
            f"driver={self.format},node-name={format_node},file={file_node},read-only={read_only}",
        ]
        below = format_node
        for overlay in self.overlays:
            file_node, format_node = disk_node_names(self.id, overlay.layer)
            argv += [
                "-blockdev",
                f"driver=file,node-name={file_node},filename={_escape(overlay.path)},read-only={read_only}",
                "-blockdev",
                f"driver=qcow2,node-name={format_node},file={file_node},backing={below},read-only={read_only}",
            ]
            below = format_node
        return [*argv, "-device", self.device()]

    def device(self) -> str:
        """The ``-device`` value; the same properties as a hotplugged disk of this bus gets."""
        format_node = self.active_node
        if self.bus == "scsi":
            return f"scsi-hd,drive={format_node},id={self.id},serial={self.id},bus={SCSI_CONTROLLER}.0"
        return f"virtio-blk-pci,drive={format_node},id={self.id},serial={self.id}" + _addr(self.pci_addr)


@attrs.frozen(kw_only=True)
class NicSpec:
    """A NIC; ``tap`` names an existing host tap interface, else QEMU's user networking is used."""

    id: str
    mac: str | None = None
    model: str = "virtio-net-pci"
    tap: str | None = None
    pci_addr: str | None = None

    def __attrs_post_init__(self) -> None:
        _check_id("nic", self.id)
        _check_pci_addr(self.id, self.pci_addr)
        if self.mac is not None and not _MAC.fullmatch(self.mac):
            raise SpecError(f"nic {self.id}: MAC {self.mac!r} is not of the form 52:54:00:12:34:56")
        if self.tap is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
            raise SpecError(f"nic {self.id}: tap interface name {self.tap!r} is not valid")

    def arguments(self) -> list[str]:
        netdev = f"{self.id}-net"
        backend = f"tap,id={netdev},ifname={self.tap},script=no,downscript=no" if self.tap else f"user,id={netdev}"
        device = f"{self.model},netdev={netdev},id={self.id}" + _addr(self.pci_addr)
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", backend, "-device", device]


def _positive(kind: str) -> Any:
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SpecError(f"{kind} must be a positive whole number, not {value!r}")

    return check


@attrs.frozen(kw_only=True)
class VMSpec:
    """A VM to launch. Validated on creation: a bad spec never reaches QEMU."""

    name: str
    memory_mib: int = attrs.field(default=256, validator=_positive("memory_mib"))
    max_memory_mib: int | None = attrs.field(default=None, validator=_positive("max_memory_mib"))
    memory_slots: int = 0
    cpus: int = attrs.field(default=1, validator=_positive("cpus"))
    max_cpus: int | None = attrs.field(default=None, validator=_positive("max_cpus"))
    machine: str = "pc"
    accel: Accelerator | None = None
    kernel: str | None = attrs.field(default=None, converter=_optional_path)
    initrd: str | None = attrs.field(default=None, converter=_optional_path)
    append: str = ""
    disks: tuple[DiskSpec, ...] = attrs.field(default=(), converter=_disks)
    nics: tuple[NicSpec, ...] = attrs.field(default=(), converter=_nics)
    serial_console: bool = True
    shell_serial: bool = False
    no_shutdown: bool = False
    balloon: bool = False
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise SpecError(f"VM name {self.name!r} must be 1-64 letters, digits, _ . - (not starting with . or -)")
        if self.memory_mib < 16:
            raise SpecError(f"memory_mib={self.memory_mib} is too small (QEMU needs at least 16 MiB)")
        if self.max_memory_mib is not None and self.max_memory_mib <= self.memory_mib:
            raise SpecError(f"max_memory_mib ({self.max_memory_mib}) must exceed memory_mib ({self.memory_mib})")
        if not isinstance(self.memory_slots, int) or not 0 <= self.memory_slots <= 256:
            raise SpecError(f"memory_slots must be 0..256, not {self.memory_slots!r}")
        if (self.max_memory_mib is None) != (self.memory_slots == 0):
            raise SpecError("memory hotplug needs both max_memory_mib and memory_slots (or neither)")
        if self.max_cpus is not None and self.max_cpus < self.cpus:
            raise SpecError(f"max_cpus ({self.max_cpus}) is below cpus ({self.cpus})")
        if self.accel not in (None, "kvm", "tcg"):
            raise SpecError(f"accel must be 'kvm' or 'tcg', not {self.accel!r}")
        if (self.initrd or self.append) and not self.kernel:
            raise SpecError("initrd and append need a kernel")
        if not self.kernel and not self.disks:
            raise SpecError("nothing to boot: give a kernel or a disk")
        if not _NAME.fullmatch(self.machine):
            raise SpecError(f"machine type {self.machine!r} is not valid")
        ids = [d.id for d in self.disks] + [n.id for n in self.nics]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise SpecError(f"device ids must be unique; repeated: {', '.join(duplicates)}")
        for item in (*self.disks, *self.nics):
            if not isinstance(item, (DiskSpec, NicSpec)):
                raise SpecError(f"disks and nics must be DiskSpec / NicSpec values, not {type(item).__name__}")

    def command_line(self, *, qemu_binary: str, run_dir: Path, accel: Accelerator) -> list[str]:
        """QEMU's argv. The monitor is a unix socket in ``run_dir``, so a restarted control plane
        can attach again; QEMU starts paused (``-S``) until vmctl has connected."""
        memory = f"{self.memory_mib}M"
        if self.max_memory_mib is not None:
            memory += f",slots={self.memory_slots},maxmem={self.max_memory_mib}M"
        smp = str(self.cpus)
        if self.max_cpus is not None:
            smp += f",maxcpus={self.max_cpus}"
        argv = [
            qemu_binary,
            "-name", f"{self.name},debug-threads=on",
            "-machine", self.machine,
            "-accel", accel,
            "-m", memory,
            "-smp", smp,
            "-nodefaults",
            "-display", "none",
            "-S",
            "-pidfile", str(run_dir / PID_FILE),
            "-chardev", f"socket,id={MONITOR_CHARDEV},path={_escape(str(run_dir / QMP_SOCKET))},server=on,wait=off",
            "-mon", f"chardev={MONITOR_CHARDEV},mode=control",
        ]  # fmt: skip
        if self.serial_console:
            argv += ["-chardev", f"ringbuf,id={CONSOLE_CHARDEV},size=1M", "-serial", f"chardev:{CONSOLE_CHARDEV}"]
        if self.shell_serial:
            if not self.serial_console:
                argv += ["-serial", "null"]  # the shell is always the second port, ttyS1
            shell_path = _escape(str(run_dir / SHELL_SOCKET))
            argv += ["-chardev", f"socket,id={SHELL_CHARDEV},path={shell_path},server=on,wait=off"]
            argv += ["-serial", f"chardev:{SHELL_CHARDEV}"]
        if self.kernel:
            argv += ["-kernel", self.kernel]
        if self.initrd:
            argv += ["-initrd", self.initrd]
        if self.append:
            argv += ["-append", self.append]
        if self.no_shutdown:
            argv.append("-no-shutdown")
        if self.balloon:
            argv += ["-device", f"virtio-balloon-pci,id={BALLOON_DEVICE}"]
        if any(disk.bus == "scsi" for disk in self.disks):
            argv += ["-device", f"virtio-scsi-pci,id={SCSI_CONTROLLER}"]
        for disk in self.disks:
            argv += disk.arguments()
        for nic in self.nics:
            argv += nic.arguments()
        argv += list(self.extra_args)
        return argv

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMSpec:
        try:
            fields = dict(data)
            fields["disks"] = tuple(DiskSpec(**d) for d in fields.get("disks", ()))
            fields["nics"] = tuple(NicSpec(**n) for n in fields.get("nics", ()))
            fields["extra_args"] = tuple(fields.get("extra_args", ()))
            return cls(**fields)
        except TypeError as exc:
            raise SpecError(f"not a VM spec: {exc}") from None


def _escape(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")
