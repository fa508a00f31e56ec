"""The devices a VM has now: those it was launched with and those hotplugged since, with every
setting vmctl changed at run time, so that attach shows them and a migration target gets them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from vmctl.model.chardev import Chardev
from vmctl.model.disk import DiskSpec
from vmctl.model.memory import MemorySpec, VirtioMemSpec
from vmctl.model.nic import NicSpec
from vmctl.model.pcie import Controller, first_free_port


@attrs.frozen(kw_only=True)
class Inventory:
    disks: tuple[DiskSpec, ...] = ()
    nics: tuple[NicSpec, ...] = ()
    memory: tuple[MemorySpec, ...] = ()
    hotplugged_cpus: tuple[str, ...] = ()
    chardevs: tuple[Chardev, ...] = ()
    virtio_mem: tuple[VirtioMemSpec, ...] = ()
    controllers: tuple[Controller, ...] = ()  # the balloon and bus controllers vmctl added
    root_ports: int = 0  # the PCIe root ports the VM was launched with (q35)
    balloon_target: int | None = None  # bytes, as last set with ``set_balloon``

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Inventory:
        balloon_target = data.get("balloon_target")
        return cls(
            disks=tuple(DiskSpec(**d) for d in data.get("disks", ())),
            nics=tuple(NicSpec(**n) for n in data.get("nics", ())),
            memory=tuple(MemorySpec(**m) for m in data.get("memory", ())),
            hotplugged_cpus=tuple(str(c) for c in data.get("hotplugged_cpus", ())),
            chardevs=tuple(Chardev(**c) for c in data.get("chardevs", ())),
            virtio_mem=tuple(VirtioMemSpec(**v) for v in data.get("virtio_mem", ())),
            controllers=tuple(Controller(**c) for c in data.get("controllers", ())),
            root_ports=int(data.get("root_ports", 0)),
            balloon_target=None if balloon_target is None else int(balloon_target),
        )

    def device_ids(self) -> set[str]:
        ids = {d.id for d in self.disks} | {n.id for n in self.nics} | {m.id for m in self.memory}
        ids |= {v.id for v in self.virtio_mem} | {c.id for c in self.controllers}
        return ids | {c.id for c in self.chardevs} | {c.port_id for c in self.chardevs if c.port_name}

    # -- PCIe root ports ------------------------------------------------------------------------

    def used_ports(self) -> set[int]:
        ports = [d.port for d in self.disks] + [n.port for n in self.nics] + [v.port for v in self.virtio_mem]
        return {port for port in ports + [c.port for c in self.controllers] if port is not None}

    def free_port(self, *, vm: str, device: str) -> int:
        """The lowest free root port; ``NoHotplugSlot`` when the pool is used up."""
        return first_free_port(self.used_ports(), self.root_ports, vm=vm, device=device)

    def controller(self, controller_id: str) -> Controller | None:
        return next((c for c in self.controllers if c.id == controller_id), None)

    def with_controller(self, controller: Controller) -> Inventory:
        if self.controller(controller.id) is not None:
            return self
        return attrs.evolve(self, controllers=(*self.controllers, controller))

    # -- disks and NICs -------------------------------------------------------------------------

    def disk(self, disk_id: str) -> DiskSpec | None:
        return next((d for d in self.disks if d.id == disk_id), None)

    def with_disk(self, disk: DiskSpec) -> Inventory:
        """This inventory with ``disk`` replacing the disk of its id (or added)."""
        if self.disk(disk.id) is None:
            return attrs.evolve(self, disks=(*self.disks, disk))
        return attrs.evolve(self, disks=tuple(disk if d.id == disk.id else d for d in self.disks))

    def without_disk(self, disk_id: str) -> Inventory:
        return attrs.evolve(self, disks=tuple(d for d in self.disks if d.id != disk_id))

    def nic(self, nic_id: str) -> NicSpec | None:
        return next((n for n in self.nics if n.id == nic_id), None)

    def with_nic(self, nic: NicSpec) -> Inventory:
        """This inventory with ``nic`` replacing the NIC of its id (or added)."""
        if self.nic(nic.id) is None:
            return attrs.evolve(self, nics=(*self.nics, nic))
        return attrs.evolve(self, nics=tuple(nic if n.id == nic.id else n for n in self.nics))

    def without_nic(self, nic_id: str) -> Inventory:
        return attrs.evolve(self, nics=tuple(n for n in self.nics if n.id != nic_id))
