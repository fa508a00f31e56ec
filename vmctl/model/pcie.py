"""PCI Express on q35: the pool of root ports a VM reserves at launch, and which device sits where.

PCIe has no hotplug on the root bus, so, as libvirt and Incus do, every PCI device vmctl adds
sits behind a ``pcie-root-port`` of its own, and a number of empty ports is kept for hotplug.
The ports are numbered; a device records its port number, so a migration target (or a VM
attached again) rebuilds the same topology: the same ports at the same addresses, the same
device behind each.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import attrs

from vmctl.errors import NoHotplugSlot, SpecError
from vmctl.model.names import BALLOON_DEVICE, SCSI_CONTROLLER, SERIAL_CONTROLLER, root_port_id

PCIE_ROOT_BUS = "pcie.0"
#: Root ports share slots as functions, eight per slot from slot 2 (libvirt's layout); slots
#: 2 to 0x1e leave QEMU's q35 chipset devices (0x0, 0x1f) where they are.
PORTS_PER_SLOT = 8
FIRST_PORT_SLOT = 2
#: Each port takes a bus number and a chassis number (8 bits): stay well inside both.
MAX_ROOT_PORTS = 128
#: The most free ports a spec may ask for.
MAX_HOTPLUG_SLOTS = 64


def is_pcie_machine(machine: str) -> bool:
    """Whether a machine type is q35 (PCI Express), where devices need root ports to be hotplugged."""
    return machine == "q35" or machine.startswith("pc-q35-")


def root_port_properties(index: int) -> dict[str, Any]:
    """Root port ``index`` as ``-device`` / ``device_add`` arguments."""
    slot, function = divmod(index, PORTS_PER_SLOT)
    properties: dict[str, Any] = {
        "driver": "pcie-root-port",
        "id": root_port_id(index),
        "bus": PCIE_ROOT_BUS,
        "addr": f"0x{FIRST_PORT_SLOT + slot:x}.{function}",
        "chassis": index + 1,
        "port": index,
    }
    if function == 0:
        properties["multifunction"] = True
    return properties


def check_port(device_id: str, port: int | None, pci_addr: str | None) -> None:
    if port is None:
        return
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port < MAX_ROOT_PORTS:
        raise SpecError(f"{device_id}: root port must be 0..{MAX_ROOT_PORTS - 1}, not {port!r}")
    if pci_addr is not None:
        raise SpecError(f"{device_id}: a device sits on a root port or at a PCI address, not both")


def device_bus(port: int | None) -> dict[str, Any]:
    """The ``bus`` property that puts a device behind its root port (nothing on a plain PCI bus)."""
    return {} if port is None else {"bus": root_port_id(port)}


@attrs.frozen(kw_only=True)
class Controller:
    """A PCI device vmctl adds for its own needs (the balloon, the virtio-scsi and virtio-serial
    controllers), and the root port it sits on (``None`` on a plain PCI machine)."""

    id: str
    driver: str
    port: int | None = None

    @classmethod
    def balloon(cls, port: int | None = None) -> Controller:
        return cls(id=BALLOON_DEVICE, driver="virtio-balloon-pci", port=port)

    @classmethod
    def scsi(cls, port: int | None = None) -> Controller:
        return cls(id=SCSI_CONTROLLER, driver="virtio-scsi-pci", port=port)

    @classmethod
    def serial(cls, port: int | None = None) -> Controller:
        return cls(id=SERIAL_CONTROLLER, driver="virtio-serial-pci", port=port)

    def device_properties(self) -> dict[str, Any]:
        return {"driver": self.driver, "id": self.id, **device_bus(self.port)}

    def arguments(self) -> list[str]:
        return ["-device", json.dumps(self.device_properties(), separators=(",", ":"))]


def first_free_port(used: Iterable[int], count: int, *, vm: str, device: str) -> int:
    """The lowest port of ``count`` not in ``used``; ``NoHotplugSlot`` when all are taken."""
    taken = set(used)
    for index in range(count):
        if index not in taken:
            return index
    raise NoHotplugSlot(
        f"{vm}: no free PCIe root port for {device} (all {count} are in use; "
        "launch with a larger VMSpec.hotplug_slots, or unplug a device)"
    )
