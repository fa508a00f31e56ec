"""The devices a VM has now: those it was launched with and those hotplugged since."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from vmctl.model.chardev import Chardev
from vmctl.model.disk import DiskSpec
from vmctl.model.memory import MemorySpec, VirtioMemSpec
from vmctl.model.nic import NicSpec


@attrs.frozen(kw_only=True)
class Inventory:
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    memory: tuple[MemorySpec, ...] = ()
    hotplugged_cpus: tuple[str, ...] = ()
    chardevs: tuple[Chardev, ...] = ()
    virtio_mem: tuple[VirtioMemSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inventory:
        return cls(
            disks=tuple(DiskSpec(**d) for d in data.get("disks", ())),
            nics=tuple(NicSpec(**n) for n in data.get("nics", ())),
            memory=tuple(MemorySpec(**m) for m in data.get("memory", ())),
            hotplugged_cpus=tuple(str(c) for c in data.get("hotplugged_cpus", ())),
            chardevs=tuple(Chardev(**c) for c in data.get("chardevs", ())),
            virtio_mem=tuple(VirtioMemSpec(**v) for v in data.get("virtio_mem", ())),
        )

    def device_ids(self) -> set[str]:
        ids = {d.id for d in self.disks} | {n.id for n in self.nics} | {m.id for m in self.memory}
        ids |= {v.id for v in self.virtio_mem}
        return ids | {c.id for c in self.chardevs} | {c.port_id for c in self.chardevs if c.port_name}

    def disk(self, disk_id: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.id == disk_id), None)

    def with_disk(self, disk: DiskSpec) -> Inventory:
        """This inventory with ``disk`` replacing the disk of its id (or added)."""
        if self.disk(disk.id) is None:
            return attrs.evolve(self, disks=(*self.disks, disk))
        return attrs.evolve(self, disks=tuple(disk if d.id == disk.id else d for d in self.disks))

    def without_disk(self, disk_id: str) -> Inventory:
        return attrs.evolve(self, disks=tuple(d for d in self.disks if d.id != disk_id))
