"""A VM to launch, as one frozen value, and the QEMU command line it renders to."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs

from vmctl.errors import SpecError
from vmctl.model.disk import DiskSpec
from vmctl.model.names import (
    BALLOON_DEVICE,
    CONSOLE_CHARDEV,
    MONITOR_CHARDEV,
    PID_FILE,
    QMP_SOCKET,
    SCSI_CONTROLLER,
    SHELL_CHARDEV,
    SHELL_SOCKET,
)
from vmctl.model.nic import NicSpec
from vmctl.model.validate import NAME, escape_option, optional_path_text, positive

Accelerator = Literal["kvm", "tcg"]


def _disks(value: Iterable[DiskSpec]) -> tuple[DiskSpec, ...]:
    return tuple(value)


def _nics(value: Iterable[NicSpec]) -> tuple[NicSpec, ...]:
    return tuple(value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class VMSpec:
    """A VM to launch. Validated on creation: a bad spec never reaches QEMU."""

    name: str
    memory_mib: int = attrs.field(default=256, validator=positive("memory_mib"))
    max_memory_mib: int | None = attrs.field(default=None, validator=positive("max_memory_mib"))
    memory_slots: int = 0
    cpus: int = attrs.field(default=1, validator=positive("cpus"))
    max_cpus: int | None = attrs.field(default=None, validator=positive("max_cpus"))
    machine: str = "pc"
    accel: Accelerator | None = None
    kernel: str | None = attrs.field(default=None, converter=optional_path_text)
    initrd: str | None = attrs.field(default=None, converter=optional_path_text)
    append: str = ""
    disks: tuple[DiskSpec, ...] = attrs.field(default=(), converter=_disks)
    nics: tuple[NicSpec, ...] = attrs.field(default=(), converter=_nics)
    serial_console: bool = True
    shell_serial: bool = False
    no_shutdown: bool = False
    balloon: bool = False
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=_strings)

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
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
        if not NAME.fullmatch(self.machine):
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
        monitor_path = escape_option(str(run_dir / QMP_SOCKET))
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
            "-chardev", f"socket,id={MONITOR_CHARDEV},path={monitor_path},server=on,wait=off",
            "-mon", f"chardev={MONITOR_CHARDEV},mode=control",
        ]  # fmt: skip
        if self.serial_console:
            argv += ["-chardev", f"ringbuf,id={CONSOLE_CHARDEV},size=1M", "-serial", f"chardev:{CONSOLE_CHARDEV}"]
        if self.shell_serial:
            if not self.serial_console:
                argv += ["-serial", "null"]  # the shell is always the second port, ttyS1
            shell_path = escape_option(str(run_dir / SHELL_SOCKET))
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
