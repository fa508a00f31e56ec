"""Memory devices as the inventory records them: DIMMs and virtio-mem devices."""

from __future__ import annotations

import attrs


@attrs.frozen(kw_only=True)
class MemorySpec:
    """A hotplugged pc-dimm ``id`` of ``size_mib``, and where QEMU put it."""

    id: str
    size_mib: int
    slot: int | None = None  # a migration target must put it in the same slot
    addr: int | None = None


@attrs.frozen(kw_only=True)
class VirtioMemSpec:
    """A virtio-mem device: up to ``max_size_mib`` the guest plugs in or out in small blocks."""

    id: str
    max_size_mib: int
    size_mib: int
    pci_addr: str | None = None
