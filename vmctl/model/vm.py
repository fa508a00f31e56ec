"""A VM to launch, as one frozen value, and the QEMU command line it renders to."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from vmctl.errors import SpecError
from vmctl.model.agent import AGENT_PORT_NAME
from vmctl.model.disk import DiskSpec
from vmctl.model.names import (
    AGENT_CHARDEV,
    AGENT_SOCKET,
    CONSOLE_CHARDEV,
    INITRD_TAG,
    KERNEL_TAG,
    MASTER_KEY_ID,
    MASTER_KEY_TAG,
    MONITOR_CHARDEV,
    PID_FILE,
    QMP_SOCKET,
    SERIAL_CONTROLLER,
    SHELL_CHARDEV,
    SHELL_SOCKET,
    TOOLS_CHARDEV,
    TOOLS_SOCKET,
    UEFI_CODE_NODE,
    UEFI_CODE_TAG,
    UEFI_VARS_FILE,
    UEFI_VARS_NODE,
    UEFI_VARS_TAG,
    VGA_DEVICE,
    chardev_port_id,
    fdset_tag,
)
from vmctl.model.nic import NicSpec
from vmctl.model.pcie import MAX_ROOT_PORTS, Controller, is_pcie_machine, root_port_properties
from vmctl.model.validate import NAME, escape_option, optional_path_text, positive

Accelerator = Literal["kvm", "tcg"]
Firmware = Literal["bios", "uefi"]

#: Debian's OVMF (package ``ovmf``): the firmware code, and the template of a VM's variable store.
OVMF_CODE = "/usr/share/OVMF/OVMF_CODE_4M.fd"
OVMF_VARS = "/usr/share/OVMF/OVMF_VARS_4M.fd"
#: QEMU's seccomp sandbox as vmctl runs it: no obsolete system calls, no setuid and the like, no
#: new processes, no scheduler or priority changes.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
_RUN_AS = re.compile(r"(auto|[A-Za-z_][A-Za-z0-9_.-]*|[0-9]+)(:([A-Za-z_][A-Za-z0-9_.-]*|[0-9]+))?")


def _disks(value: Iterable[DiskSpec]) -> tuple[DiskSpec, ...]:
    return tuple(value)


def _nics(value: Iterable[NicSpec]) -> tuple[NicSpec, ...]:
    return tuple(value)


def _strings(value: Iterable[str]) -> tuple[str, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class PassedFile:
    """A file vmctl opens for QEMU and passes by fd, tagged ``tag``. An ``own`` file is one
    vmctl made in the run dir: it must be vmctl's, never a link (QEMU may write in that dir).
    QEMU opens a ``read_by_qemu`` file again through ``/proc/self/fd``, which takes the file's
    own permissions (not the directories' above it): QEMU's user must be able to read it."""

    tag: str
    path: str
    flags: int
    own: bool = False
    read_by_qemu: bool = False


@attrs.frozen(kw_only=True)
class Layout:
    """A spec's PCI devices placed: how many root ports, and which device sits on which."""

    root_ports: int
    controllers: tuple[Controller, ...]
    disks: tuple[DiskSpec, ...]
    nics: tuple[NicSpec, ...]


@attrs.frozen(kw_only=True)
class VMSpec:
    """A VM to launch. Validated on creation: a bad spec never reaches QEMU."""

    name: str
    memory_mib: int = attrs.field(default=256, validator=positive("memory_mib"))
    max_memory_mib: int | None = attrs.field(default=None, validator=positive("max_memory_mib"))
    memory_slots: int = 0
    cpus: int = attrs.field(default=1, validator=positive("cpus"))
    max_cpus: int | None = attrs.field(default=None, validator=positive("max_cpus"))
    machine: str = "q35"
    hotplug_slots: int = 8  # q35: free PCIe root ports kept for hotplug, besides one per device at launch
    firmware: Firmware = "bios"
    uefi_code: str = attrs.field(default=OVMF_CODE, converter=str)
    uefi_vars: str | None = attrs.field(default=None, converter=optional_path_text)
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
    #: A virtio-serial port for the QEMU guest agent (``vm.agent``); the guest runs qemu-ga on it.
    guest_agent: bool = False
    #: A VGA display (for ``vm.screendump`` and ``vm.send_keys``); none shows on the host.
    vga: bool = False
    extra_args: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    #: Who QEMU runs as: "user[:group]" (names or numbers), "auto" (a uid of its own from the
    #: host's pool when vmctl is root, else vmctl's own user), or None (vmctl's own, root included).
    run_as: str | None = "auto"
    #: QEMU's seccomp sandbox (``SANDBOX``); off only to debug QEMU itself.
    sandbox: bool = True

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
        if self.run_as is not None and (not isinstance(self.run_as, str) or not _RUN_AS.fullmatch(self.run_as)):
            raise SpecError(f"run_as must be 'user[:group]', 'auto' or None, not {self.run_as!r}")
        if self.run_as is not None and self.run_as.startswith("auto:"):
            raise SpecError("run_as='auto' takes no group")
        for flag in ("guest_agent", "vga"):
            if not isinstance(getattr(self, flag), bool):
                raise SpecError(f"{flag} must be True or False, not {getattr(self, flag)!r}")
        if not isinstance(self.sandbox, bool):
            raise SpecError(f"sandbox must be True or False, not {self.sandbox!r}")
        if not NAME.fullmatch(self.machine):
            raise SpecError(f"machine type {self.machine!r} is not valid")
        if self.firmware not in ("bios", "uefi"):
            raise SpecError(f"firmware must be 'bios' or 'uefi', not {self.firmware!r}")
        if not isinstance(self.hotplug_slots, int) or not 0 <= self.hotplug_slots <= MAX_ROOT_PORTS:
            raise SpecError(f"hotplug_slots must be 0..{MAX_ROOT_PORTS}, not {self.hotplug_slots!r}")
        ids = [d.id for d in self.disks] + [n.id for n in self.nics]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise SpecError(f"device ids must be unique; repeated: {', '.join(duplicates)}")
        for item in (*self.disks, *self.nics):
            if not isinstance(item, (DiskSpec, NicSpec)):
                raise SpecError(f"disks and nics must be DiskSpec / NicSpec values, not {type(item).__name__}")
        self.layout()  # checks the ports

    @property
    def pcie(self) -> bool:
        return is_pcie_machine(self.machine)

    def layout(self) -> Layout:
        """Where the spec's PCI devices go. On q35 each sits behind a root port of its own: the
        balloon and the SCSI controller on the first ones (so a migration target, built from the
        inventory, puts them there again), then every disk and NIC without a port, in order;
        ``hotplug_slots`` more stay free. On a plain PCI machine QEMU chooses the slots."""
        controllers = [Controller.balloon()] if self.balloon else []
        if any(disk.bus == "scsi" for disk in self.disks):
            controllers.append(Controller.scsi())
        if self.guest_agent:
            controllers.append(Controller.serial())
        placeable = [d for d in self.disks if d.bus != "scsi"] + list(self.nics)
        given = [d.port for d in placeable if d.port is not None]
        if not self.pcie:
            if given:
                raise SpecError(f"root ports are for q35 machines; {self.machine} has a plain PCI bus")
            return Layout(root_ports=0, controllers=tuple(controllers), disks=self.disks, nics=self.nics)
        repeated = sorted({p for p in given if given.count(p) > 1})
        if repeated:
            raise SpecError(f"two devices on root port {repeated[0]}")
        for index, controller in enumerate(controllers):
            if index in given:
                raise SpecError(f"root port {index} is the {controller.driver}'s")
        controllers = [attrs.evolve(c, port=index) for index, c in enumerate(controllers)]
        taken = set(given) | set(range(len(controllers)))

        def placed(device: Any) -> Any:
            if device.port is not None or device.pci_addr is not None or getattr(device, "bus", None) == "scsi":
                return device
            port = min(set(range(len(taken) + 1)) - taken)
            taken.add(port)
            return attrs.evolve(device, port=port)

        disks, nics = tuple(placed(d) for d in self.disks), tuple(placed(n) for n in self.nics)
        root_ports = max(len(taken) + self.hotplug_slots, max(taken, default=-1) + 1)
        if root_ports > MAX_ROOT_PORTS:
            raise SpecError(f"{root_ports} PCIe root ports are too many (at most {MAX_ROOT_PORTS})")
        return Layout(root_ports=root_ports, controllers=tuple(controllers), disks=disks, nics=nics)

    def command_line(
        self,
        *,
        qemu_binary: str,
        run_dir: Path,
        accel: Accelerator,
        passed: Mapping[str, int] | None = None,
        objects: Sequence[Mapping[str, Any]] = (),
    ) -> list[str]:
        """QEMU's argv. The monitor is a unix socket in ``run_dir``, so a restarted control plane
        can attach again; QEMU starts paused (``-S``) until vmctl has connected.

        ``passed`` maps the tag of each file vmctl opens for QEMU (``passed_files``) to the fd
        QEMU inherits it as, so that QEMU's user needs no way to the files: a block node's
        file goes into an fdset of its own (``/dev/fdset/N``); the kernel and initrd, which QEMU
        reads once at start, are named ``/proc/self/fd/N``, and so is the master key, which
        the secret ``objects`` (encrypted with it) follow."""
        fdsets: dict[str, str] = {}
        extra: list[str] = []
        for tag, fd in sorted((passed or {}).items()):
            if tag == MASTER_KEY_TAG:
                extra[:0] = ["-object", f"secret,id={MASTER_KEY_ID},format=raw,file=/proc/self/fd/{fd}"]
                continue
            if tag in (KERNEL_TAG, INITRD_TAG):
                fdsets[tag] = f"/proc/self/fd/{fd}"
                continue
            set_id = extra.count("-add-fd")
            fdsets[tag] = f"/dev/fdset/{set_id}"
            extra += ["-add-fd", f"fd={fd},set={set_id},opaque={escape_option(tag)}"]
        for secret in objects:
            extra += ["-object", json.dumps(secret, separators=(",", ":"))]
        memory = f"{self.memory_mib}M"
        if self.max_memory_mib is not None:
            memory += f",slots={self.memory_slots},maxmem={self.max_memory_mib}M"
        smp = str(self.cpus)
        if self.max_cpus is not None:
            smp += f",maxcpus={self.max_cpus}"
        monitor_path = escape_option(str(run_dir / QMP_SOCKET))
        tools_path = escape_option(str(run_dir / TOOLS_SOCKET))
        layout = self.layout()
        machine = self.machine
        if self.firmware == "uefi":
            machine += f",pflash0={UEFI_CODE_NODE},pflash1={UEFI_VARS_NODE}"
        argv = [
            qemu_binary,
            "-name", f"{self.name},debug-threads=on",
            "-machine", machine,
            "-accel", accel,
            "-m", memory,
            "-smp", smp,
            "-nodefaults",
            "-display", "none",
            "-S",
            "-pidfile", str(run_dir / PID_FILE),
            "-chardev", f"socket,id={MONITOR_CHARDEV},path={monitor_path},server=on,wait=off",
            "-mon", f"chardev={MONITOR_CHARDEV},mode=control",
            # QEMU serves one client per monitor: operators' tools get one of their own.
            "-chardev", f"socket,id={TOOLS_CHARDEV},path={tools_path},server=on,wait=off",
            "-mon", f"chardev={TOOLS_CHARDEV},mode=control",
            *extra,
        ]  # fmt: skip
        if self.sandbox:
            argv += ["-sandbox", SANDBOX]
        if self.firmware == "uefi":
            for node, path, read_only in (
                (UEFI_CODE_NODE, fdsets.get(UEFI_CODE_TAG, self.uefi_code), True),
                (UEFI_VARS_NODE, fdsets.get(UEFI_VARS_TAG, str(run_dir / UEFI_VARS_FILE)), False),
            ):
                blockdev = {"driver": "file", "node-name": node, "filename": path, "read-only": read_only}
                argv += ["-blockdev", json.dumps(blockdev, separators=(",", ":"))]
        for index in range(layout.root_ports):
            argv += ["-device", json.dumps(root_port_properties(index), separators=(",", ":"))]
        if self.serial_console:
            argv += ["-chardev", f"ringbuf,id={CONSOLE_CHARDEV},size=1M", "-serial", f"chardev:{CONSOLE_CHARDEV}"]
        if self.shell_serial:
            if not self.serial_console:
                argv += ["-serial", "null"]  # the shell is always the second port, ttyS1
            shell_path = escape_option(str(run_dir / SHELL_SOCKET))
            argv += ["-chardev", f"socket,id={SHELL_CHARDEV},path={shell_path},server=on,wait=off"]
            argv += ["-serial", f"chardev:{SHELL_CHARDEV}"]
        if self.kernel:
            argv += ["-kernel", fdsets.get(KERNEL_TAG, self.kernel)]
        if self.initrd:
            argv += ["-initrd", fdsets.get(INITRD_TAG, self.initrd)]
        if self.append:
            argv += ["-append", self.append]
        if self.no_shutdown:
            argv.append("-no-shutdown")
        for controller in layout.controllers:
            argv += controller.arguments()
        if self.vga:
            argv += ["-device", json.dumps({"driver": "VGA", "id": VGA_DEVICE}, separators=(",", ":"))]
        if self.guest_agent:
            agent_path = escape_option(str(run_dir / AGENT_SOCKET))
            port = {"driver": "virtserialport", "id": chardev_port_id(AGENT_CHARDEV), "chardev": AGENT_CHARDEV,
                    "name": AGENT_PORT_NAME, "bus": f"{SERIAL_CONTROLLER}.0"}  # fmt: skip
            argv += ["-chardev", f"socket,id={AGENT_CHARDEV},path={agent_path},server=on,wait=off"]
            argv += ["-device", json.dumps(port, separators=(",", ":"))]
        for disk in layout.disks:
            argv += disk.arguments({layer: fdsets[fdset_tag(disk.id, layer)] for layer in disk.layers if passed})
        for nic in layout.nics:
            argv += nic.arguments()
        argv += list(self.extra_args)
        return argv

    def passed_files(self, run_dir: Path) -> list[PassedFile]:
        """The files vmctl opens and passes to QEMU by fd: the kernel and initrd, each layer of
        each disk, the UEFI firmware and the VM's variable store. QEMU opens none by path."""
        files = [
            PassedFile(tag=tag, path=path, flags=os.O_RDONLY, read_by_qemu=True)
            for tag, path in ((KERNEL_TAG, self.kernel), (INITRD_TAG, self.initrd))
            if path is not None
        ]
        files += [
            PassedFile(tag=fdset_tag(disk.id, layer), path=disk.layer_path(layer), flags=disk.open_flags())
            for disk in self.disks
            for layer in disk.layers
        ]
        if self.firmware == "uefi":
            files.append(PassedFile(tag=UEFI_CODE_TAG, path=self.uefi_code, flags=os.O_RDONLY))
            files.append(PassedFile(tag=UEFI_VARS_TAG, path=str(run_dir / UEFI_VARS_FILE), flags=os.O_RDWR, own=True))
        return files

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @property
    def uefi_vars_template(self) -> str:
        """The file a VM's variable store is first copied from (``uefi_vars``, or OVMF's template)."""
        return self.uefi_vars or OVMF_VARS

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
