"""A NIC, and the arguments it renders (the same netdev id at boot and on hotplug)."""

from __future__ import annotations

import re

import attrs

from vmctl.errors import SpecError
from vmctl.model.names import netdev_id
from vmctl.model.validate import check_id, check_pci_addr

_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


@attrs.frozen(kw_only=True)
class NicSpec:
    """A NIC; ``tap`` names an existing host tap interface, else QEMU's user networking is used."""

    id: str
    mac: str | None = None
    model: str = "virtio-net-pci"
    tap: str | None = None
    pci_addr: str | None = None

    def __attrs_post_init__(self) -> None:
        check_id("nic", self.id)
        check_pci_addr(self.id, self.pci_addr)
        if self.mac is not None and not _MAC.fullmatch(self.mac):
            raise SpecError(f"nic {self.id}: MAC {self.mac!r} is not of the form 52:54:00:12:34:56")
        if self.tap is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
            raise SpecError(f"nic {self.id}: tap interface name {self.tap!r} is not valid")

    @property
    def netdev(self) -> str:
        return netdev_id(self.id)

    def arguments(self) -> list[str]:
        backend = (
            f"tap,id={self.netdev},ifname={self.tap},script=no,downscript=no" if self.tap else f"user,id={self.netdev}"
        )
        device = f"{self.model},netdev={self.netdev},id={self.id}" + (f",addr={self.pci_addr}" if self.pci_addr else "")
        if self.mac:
            device += f",mac={self.mac}"
        return ["-netdev", backend, "-device", device]
