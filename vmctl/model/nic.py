"""A NIC, and the arguments it renders (the same netdev id at boot and on hotplug)."""

from __future__ import annotations

import json
import random
import re
from typing import TYPE_CHECKING, Any, Final, TypedDict

import attrs

from vmctl.errors import InvalidArgument, SpecError
from vmctl.model.names import netdev_id
from vmctl.model.pcie import check_port, device_bus
from vmctl.model.validate import check_id, check_pci_addr

if TYPE_CHECKING:
    from typing_extensions import Unpack

_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")


#: The most queues a multiqueue tap NIC may have.
MAX_QUEUES = 16


@attrs.frozen(kw_only=True)
class NicSpec:
    """A NIC; ``tap`` names a host tap interface, else QEMU's user networking is used.

    Its device is rendered once (``device_properties``), for ``-device`` and ``device_add``
    alike; only the backend differs: a tap QEMU opens by name at boot, the fds vmctl passes
    it on hotplug."""

    id: str
    mac: str | None = None
    model: str = "virtio-net-pci"
    tap: str | None = None
    queues: int = 1
    link_up: bool = True  # the link state the guest sees (``set_nic_link``); kept through migration
    port: int | None = None  # its PCIe root port on q35 (chosen at launch or hotplug)
    pci_addr: str | None = None  # on a plain PCI bus: pinned so that a migration target lays it out alike

    def __attrs_post_init__(self) -> None:
        check_id("nic", self.id)
        check_pci_addr(self.id, self.pci_addr)
        check_port(self.id, self.port, self.pci_addr)
        if not isinstance(self.link_up, bool):
            raise SpecError(f"nic {self.id}: link_up must be True or False, not {self.link_up!r}")
        if self.mac is not None and not _MAC.fullmatch(self.mac):
            raise SpecError(f"nic {self.id}: MAC {self.mac!r} is not of the form 52:54:00:12:34:56")
        if self.tap is not None and not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", self.tap):
            raise SpecError(f"nic {self.id}: tap interface name {self.tap!r} is not valid")
        if not isinstance(self.queues, int) or isinstance(self.queues, bool) or not 1 <= self.queues <= MAX_QUEUES:
            raise SpecError(f"nic {self.id}: queues must be 1..{MAX_QUEUES}, not {self.queues!r}")
        if self.queues > 1 and self.model != "virtio-net-pci":
            raise SpecError(f"nic {self.id}: multiqueue needs virtio-net-pci, not {self.model}")

    @classmethod
    def of(cls, nic: NicSpec | None = None, **options: Unpack[NicOptions]) -> NicSpec:
        """The NIC a caller asks for: a ``NicSpec``, or one made of the settings given by keyword
        (the one adapter from keywords to the value); either way with a MAC, generated when none
        is given, so that the guest keeps it through migration and re-attach."""
        unknown = set(options) - NIC_OPTIONS
        if unknown:
            known = ", ".join(sorted(NIC_OPTIONS))
            raise InvalidArgument(f"unknown NIC option(s) {', '.join(sorted(unknown))}: a NIC takes {known}")
        if nic is None:
            if "id" not in options:
                raise InvalidArgument("a NIC needs an id=")
            nic = cls(**options)
        else:
            asked = options.pop("id", nic.id)
            if asked != nic.id:
                raise InvalidArgument(f"id={asked!r} contradicts the NicSpec's id {nic.id!r}")
            if options:
                given = ", ".join(sorted(options))
                raise InvalidArgument(f"nic {nic.id}: {given} given beside a NicSpec; set them in the NicSpec")
        return nic if nic.mac is not None else attrs.evolve(nic, mac=random_mac())

    @property
    def netdev(self) -> str:
        return netdev_id(self.id)

    def device_properties(self) -> dict[str, Any]:
        """The guest's NIC, as ``device_add`` arguments (the same for ``-device``)."""
        device: dict[str, Any] = {"driver": self.model, "id": self.id, "netdev": self.netdev}
        if self.mac:
            device["mac"] = self.mac
        if self.queues > 1:
            device.update({"mq": True, "vectors": 2 * self.queues + 2})
        if self.pci_addr:
            device["addr"] = self.pci_addr
        device.update(device_bus(self.port))
        return device

    def arguments(self) -> list[str]:
        netdev = self.netdev
        if self.tap:
            backend = f"tap,id={netdev},ifname={self.tap},script=no,downscript=no"
            backend += f",queues={self.queues}" if self.queues > 1 else ""
        else:
            backend = f"user,id={netdev}"
        return ["-netdev", backend, "-device", json.dumps(self.device_properties(), separators=(",", ":"))]


class NicOptions(TypedDict, total=False):
    """A ``NicSpec``'s settings by keyword: what ``hotplug_nic(id=..., tap=...)`` takes. Declared
    once; every VM's ``hotplug_nic`` types its ``**options`` with it and hands them to
    :meth:`NicSpec.of`."""

    id: str
    mac: str | None
    model: str
    tap: str | None
    queues: int
    link_up: bool


NIC_OPTIONS: Final = frozenset(NicOptions.__annotations__)


def random_mac() -> str:
    """A MAC in QEMU's locally administered 52:54:00 range."""
    return "52:54:00:" + ":".join(f"{random.randrange(256):02x}" for _ in range(3))
