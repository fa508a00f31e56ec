"""Memory devices as the inventory records them: DIMMs and virtio-mem devices."""

from __future__ import annotations

import json
from typing import Any

import attrs

from vmctl.model.names import memory_backend_id
from vmctl.model.pcie import device_bus

MIB = 1 << 20


@attrs.frozen(kw_only=True)
class MemorySpec:
    """A hotplugged pc-dimm ``id`` of ``size_mib``, and where QEMU put it."""

    id: str
    size_mib: int
    slot: int | None = None  # a migration target must put it in the same slot
    addr: int | None = None

    def arguments(self) -> list[str]:
        """Its backend and DIMM on a command line (a migration target's)."""
        backend = memory_backend_id(self.id)
        dimm: dict[str, Any] = {"driver": "pc-dimm", "id": self.id, "memdev": backend}
        if self.slot is not None:
            dimm["slot"] = self.slot
        if self.addr is not None:
            dimm["addr"] = self.addr
        return [
            "-object", f"memory-backend-ram,id={backend},size={self.size_mib}M",
            "-device", json.dumps(dimm, separators=(",", ":")),
        ]  # fmt: skip


@attrs.frozen(kw_only=True)
class VirtioMemSpec:
    """A virtio-mem device: up to ``max_size_mib`` the guest plugs in or out in small blocks."""

    id: str
    max_size_mib: int
    size_mib: int
    port: int | None = None  # its PCIe root port on q35
    pci_addr: str | None = None  # on a plain PCI bus

    def device_properties(self) -> dict[str, Any]:
        """The device as ``device_add`` arguments (the same for ``-device``)."""
        device: dict[str, Any] = {
            "driver": "virtio-mem-pci",
            "id": self.id,
            "memdev": memory_backend_id(self.id),
            "requested-size": self.size_mib * MIB,
        }
        if self.pci_addr is not None:
            device["addr"] = self.pci_addr
        return {**device, **device_bus(self.port)}

    def arguments(self) -> list[str]:
        """Its backend and device on a command line (a migration target's)."""
        backend = f"memory-backend-ram,id={memory_backend_id(self.id)},size={self.max_size_mib}M"
        return ["-object", backend, "-device", json.dumps(self.device_properties(), separators=(",", ":"))]
