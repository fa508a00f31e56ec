"""A VM's devices: disks, NICs, CPUs, memory, balloon, chardevs. Each call runs its ``ops``
procedure under the store's lock and records the result in the inventory."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import attrs

from vmctl.errors import CommandTimeout, DeviceError, HotplugError, InvalidArgument, UnknownDevice, WaitTimeout
from vmctl.model import (
    Chardev,
    ChardevKind,
    DiskSpec,
    Inventory,
    MemorySpec,
    NicSpec,
    Throttle,
    VirtioMemSpec,
)
from vmctl.model.disk import DiskOptions
from vmctl.model.names import BALLOON_DEVICE
from vmctl.model.nic import NicOptions
from vmctl.model.pcie import Controller
from vmctl.ops import balloon as balloon_ops
from vmctl.ops import chardevs as chardev_ops
from vmctl.ops import cpus as cpu_ops
from vmctl.ops import disks as disk_ops
from vmctl.ops import memory as memory_ops
from vmctl.ops import nics as nic_ops
from vmctl.ops import stats as stats_ops
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import pin_pci_address
from vmctl.ops.queries import ask
from vmctl.qmp import Monitor
from vmctl.vm.journal import Intent
from vmctl.vm.store import StateStore

if TYPE_CHECKING:
    from typing_extensions import Unpack


def _with_controller(inventory: Inventory, controller: Controller | None) -> Inventory:
    return inventory if controller is None else inventory.with_controller(controller)


class Devices:
    def __init__(self, *, name: str, qmp: Monitor, store: StateStore, log: Any) -> None:
        self.name = name
        self._qmp = qmp
        self._store = store
        self._log = log

    # -- disks -------------------------------------------------------------------------------

    def disks(self) -> tuple[DiskSpec, ...]:
        return self._store.inventory.disks

    def hotplug_disk(
        self, disk: DiskSpec | str | os.PathLike[str], *, timeout: float = 30.0, **options: Unpack[DiskOptions]
    ) -> DiskSpec:
        """Attach a disk: a ``DiskSpec`` (the same value a VM can be launched with), or an image
        path with the disk's options. On any failure every step is undone (``HotplugError``).
        Returns the disk as the inventory records it (its PCI address pinned)."""
        limit = Deadline.after(timeout)
        disk = DiskSpec.of(disk, **options)
        with self._store.held(limit):
            self._store.refuse_duplicate(disk.id)
            controller = None
            if disk.bus == "scsi":
                controller = self._store.controller(Controller.scsi)
            elif self._store.spec.pcie and disk.pci_addr is not None:
                raise InvalidArgument(f"disk {disk.id}: q35 hotplugs behind root ports; give a port, not pci_addr")
            else:
                disk = attrs.evolve(disk, port=self._store.free_port(disk.id, disk.port))
            with self._store.intent(Intent(operation="hotplug_disk", disk=disk)) as done:
                plugged = disk_ops.hotplug_disk(
                    self._qmp,
                    self._log,
                    disk,
                    controller=controller,
                    secret=self._store.secret_object(disk),
                    timeout=limit,
                )
                plugged = pin_pci_address(limit.bind(self._qmp), plugged)
                done(lambda inventory: _with_controller(inventory.with_disk(plugged), controller))
            return plugged

    def unplug_disk(self, id: str, *, timeout: float = 30.0) -> None:
        """Detach a disk: the guest releases it, then its nodes and fdset go. Safe to retry."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            disk = self._store.require_disk(id)
            with self._store.intent(Intent(operation="unplug_disk", disk=disk)) as done:
                disk_ops.unplug_disk(
                    self._qmp, self._log, disk_id=id, encrypted=disk.encryption is not None, timeout=limit
                )
                done(lambda inventory: inventory.without_disk(id))

    def resize_disk(self, id: str, size: int, *, allow_shrink: bool = False) -> None:
        """Grow a disk to ``size`` bytes; the guest sees the new size at once."""
        with self._store.lock:
            disk = self._store.require_disk(id)
            disk_ops.resize_disk(self._qmp, self._log, disk=disk, size=size, allow_shrink=allow_shrink)

    def set_disk_throttle(self, id: str, throttle: Throttle) -> None:
        """Set (or, with ``Throttle()``, clear) a disk's I/O limits; the inventory keeps them."""
        with self._store.lock:
            disk = self._store.require_disk(id)
            try:
                disk_ops.set_throttle(self._qmp, disk_id=id, throttle=throttle, bus=disk.bus)
            except CommandTimeout:  # it may or may not have taken: it is idempotent, so once more
                disk_ops.set_throttle(self._qmp, disk_id=id, throttle=throttle, bus=disk.bus)
            self._store.update(lambda inventory: inventory.with_disk(attrs.evolve(disk, throttle=throttle)))
            self._log.info("disk.throttled", disk=id, **throttle.arguments())

    # -- NICs --------------------------------------------------------------------------------

    def nics(self) -> tuple[NicSpec, ...]:
        return self._store.inventory.nics

    def hotplug_nic(
        self, nic: NicSpec | None = None, *, timeout: float = 30.0, **options: Unpack[NicOptions]
    ) -> NicSpec:
        """Add a NIC on a tap device that vmctl opens (its ``tap`` names it; else the kernel does):
        a ``NicSpec``, or its settings by keyword. A MAC is generated when none is given, so it
        survives migration and re-attach."""
        limit = Deadline.after(timeout)
        wanted = NicSpec.of(nic, **options)
        with self._store.held(limit):
            self._store.refuse_duplicate(wanted.id)
            if self._store.spec.pcie and wanted.pci_addr is not None:
                raise InvalidArgument(f"nic {wanted.id}: q35 hotplugs behind root ports; give a port, not pci_addr")
            wanted = attrs.evolve(wanted, port=self._store.free_port(wanted.id, wanted.port))
            # The tap is opened first, so the intent names it even when the kernel chose the name
            # (an attach that finds the NIC whole takes it from the intent).
            with (
                nic_ops.opened_tap(wanted) as (opened, fds),
                self._store.intent(Intent(operation="hotplug_nic", nic=opened)) as done,
            ):
                plugged = nic_ops.plug_tap(self._qmp, self._log, opened, fds, timeout=limit)
                plugged = pin_pci_address(limit.bind(self._qmp), plugged)
                done(lambda inventory: inventory.with_nic(plugged))
            return plugged

    def unplug_nic(self, id: str, *, timeout: float = 30.0) -> None:
        """Detach a NIC: the guest releases it, then its tap backend goes (and its root port is free)."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            nic = self._require_nic(id)
            with self._store.intent(Intent(operation="unplug_nic", nic=nic)) as done:
                nic_ops.unplug_nic(self._qmp, self._log, nic_id=id, timeout=limit)
                done(lambda inventory: inventory.without_nic(id))

    def set_nic_link(self, id: str, up: bool) -> NicSpec:
        """Raise or drop a NIC's link (the guest sees its carrier change); the inventory keeps the
        state, so a migration target and a relaunch from the inventory start with it."""
        if not isinstance(up, bool):
            raise InvalidArgument(f"set_nic_link: up must be True or False, not {up!r}")
        with self._store.lock:
            nic = attrs.evolve(self._require_nic(id), link_up=up)
            nic_ops.set_link(self._qmp, self._log, nic_id=id, up=up)
            self._store.update(lambda inventory: inventory.with_nic(nic))
            return nic

    def _require_nic(self, id: str) -> NicSpec:
        nic = self._store.inventory.nic(id)
        if nic is None:
            raise UnknownDevice(f"{self.name} has no nic {id!r}")
        return nic

    def apply_settings(self) -> None:
        """Set what a freshly started QEMU cannot take as ``-device`` properties: disks' I/O
        limits and NICs' link state, from the inventory (at launch, and on a migration target
        before the guest arrives, since QEMU does not migrate them)."""
        for disk in self._store.inventory.disks:
            if disk.throttle is not None:
                disk_ops.set_throttle(self._qmp, disk_id=disk.id, throttle=disk.throttle, bus=disk.bus)
        for nic in self._store.inventory.nics:
            if not nic.link_up:
                nic_ops.set_link(self._qmp, self._log, nic_id=nic.id, up=False)
        if self._store.inventory.controller(BALLOON_DEVICE) is not None:  # for vm.stats()
            stats_ops.start_balloon_stats(self._qmp)

    # -- chardevs ----------------------------------------------------------------------------

    def hotplug_chardev(
        self,
        id: str,
        *,
        kind: ChardevKind,
        path: str | os.PathLike[str] | None = None,
        size: int = 65536,
        port_name: str | None = None,
        timeout: float = 30.0,
    ) -> Chardev:
        """Add a chardev (a unix socket QEMU listens on, or a ring buffer); with ``port_name`` the
        guest sees it as that virtio-serial port."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            self._store.refuse_duplicate(id)
            controller = self._store.controller(Controller.serial) if port_name is not None else None
            chardev = chardev_ops.hotplug_chardev(
                self._qmp, self._log, chardev_id=id, kind=kind, path=path, size=size, port_name=port_name,
                controller=controller, timeout=limit,
            )  # fmt: skip
            self._store.update(
                lambda inventory: _with_controller(
                    attrs.evolve(inventory, chardevs=(*inventory.chardevs, chardev)), controller
                )
            )
            return chardev

    def unplug_chardev(self, id: str, *, timeout: float = 30.0) -> None:
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            chardev = next((c for c in self._store.inventory.chardevs if c.id == id), None)
            if chardev is None:
                raise UnknownDevice(f"{self.name} has no chardev {id!r}")
            chardev_ops.unplug_chardev(self._qmp, self._log, chardev=chardev, timeout=limit)
            self._store.update(
                lambda inventory: attrs.evolve(inventory, chardevs=tuple(c for c in inventory.chardevs if c.id != id))
            )

    # -- CPUs and memory -----------------------------------------------------------------------

    def hotplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]:
        """Add ``count`` vCPUs (up to the spec's ``max_cpus``); the guest may need to online them."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            self._refuse_tcg_cpu_crash(count)
            try:
                added = cpu_ops.hotplug_cpus(self._qmp, self._log, count, timeout=limit)
            except HotplugError:
                self._store.vcpus_created += count  # some may have been created before the rollback
                self._store.save()
                raise
            self._store.vcpus_created += len(added)
            self._store.update(
                lambda inventory: attrs.evolve(inventory, hotplugged_cpus=(*inventory.hotplugged_cpus, *added))
            )
            return added

    def _refuse_tcg_cpu_crash(self, count: int) -> None:
        """Under TCG, QEMU gives every vCPU it ever creates one of ``max_cpus`` translation
        contexts and never frees one (``tcg_max_ctxs``): past that, a hotplug aborts QEMU (seen
        on 10.0). QEMU 7.2 already crashes (SIGSEGV) on a hotplug after an unplug. Both are
        refused before anything is sent; KVM has neither limit."""
        if ask(self._qmp, "query-kvm").get("enabled"):
            return
        created, most = self._store.vcpus_created, self._store.spec.max_cpus or self._store.spec.cpus
        present = self._store.spec.cpus + len(self._store.inventory.hotplugged_cpus)
        if count > most - present:
            return  # no room anyway: the hotplug says so itself
        if self._qmp.version.major < 8 and created > present:
            raise DeviceError(
                f"{self.name}: under TCG, QEMU {self._qmp.version.major}.{self._qmp.version.minor} crashes "
                "when a vCPU is plugged after one was unplugged (relaunch the VM, or use KVM)"
            )
        if created + count > most:
            raise DeviceError(
                f"{self.name}: under TCG, QEMU can create {most} vCPUs over its life (max_cpus; unplugged "
                f"ones count, tcg_max_ctxs) and has created {created}: {count} more would abort it"
            )

    def unplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]:
        """Remove the ``count`` most recently hotplugged vCPUs (the guest must release them)."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            removed = cpu_ops.unplug_cpus(self._qmp, self._log, count, timeout=limit)

            def without_removed(inventory: Inventory) -> Inventory:
                remaining = tuple(c for c in inventory.hotplugged_cpus if c not in removed)
                return attrs.evolve(inventory, hotplugged_cpus=remaining)

            self._store.update(without_removed)
            return removed

    def hotplug_memory(self, size_mib: int, *, id: str, timeout: float = 30.0) -> MemorySpec:
        """Add a DIMM of ``size_mib`` (a multiple of 128); needs ``max_memory_mib`` and ``memory_slots``."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            self._store.refuse_duplicate(id)
            memory = memory_ops.hotplug_memory(self._qmp, self._log, memory_id=id, size_mib=size_mib, timeout=limit)
            self._store.update(lambda inventory: attrs.evolve(inventory, memory=(*inventory.memory, memory)))
            return memory

    def unplug_memory(self, id: str, *, timeout: float = 30.0) -> None:
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            if not any(m.id == id for m in self._store.inventory.memory):
                raise UnknownDevice(f"{self.name} has no hotplugged memory {id!r}")
            memory_ops.unplug_memory(self._qmp, self._log, memory_id=id, timeout=limit)
            self._store.update(
                lambda inventory: attrs.evolve(inventory, memory=tuple(m for m in inventory.memory if m.id != id))
            )

    def add_virtio_mem(self, id: str, *, max_size_mib: int, size_mib: int = 0, timeout: float = 30.0) -> VirtioMemSpec:
        """Add a virtio-mem device the guest grows or shrinks in 2 MiB blocks (``resize_virtio_mem``)."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            self._store.refuse_duplicate(id)
            port = self._store.free_port(id)
            device = memory_ops.add_virtio_mem(
                self._qmp, self._log, memory_id=id, max_size_mib=max_size_mib, size_mib=size_mib, port=port,
                timeout=limit,
            )  # fmt: skip
            device = pin_pci_address(limit.bind(self._qmp), device)
            self._store.update(lambda inventory: attrs.evolve(inventory, virtio_mem=(*inventory.virtio_mem, device)))
            return device

    def resize_virtio_mem(self, id: str, size_mib: int, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Have the guest plug or unplug memory until the device provides ``size_mib``."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            device = next((v for v in self._store.inventory.virtio_mem if v.id == id), None)
            if device is None:
                raise UnknownDevice(f"{self.name} has no virtio-mem device {id!r}")

            def record(resized: VirtioMemSpec) -> None:  # the request, once QEMU has it
                self._store.update(
                    lambda inventory: attrs.evolve(
                        inventory, virtio_mem=tuple(resized if v.id == id else v for v in inventory.virtio_mem)
                    )
                )

            memory_ops.resize_virtio_mem(
                self._qmp, self._log, device, size_mib, wait=wait, timeout=limit, requested=record
            )

    def memory_devices(self) -> list[memory_ops.MemoryDevice]:
        return memory_ops.memory_devices(self._qmp)

    def balloon(self) -> int:
        """The guest memory in bytes as the balloon reports it."""
        return balloon_ops.balloon_bytes(self._qmp)

    def set_balloon(self, target_bytes: int, *, wait: bool = True, timeout: float = 30.0) -> int:
        """Inflate or deflate the balloon to leave the guest ``target_bytes``; waits for the guest
        by default. The inventory keeps the target (QEMU carries it through a migration)."""

        def record() -> None:
            self._store.update(lambda inventory: attrs.evolve(inventory, balloon_target=target_bytes))

        limit = Deadline.after(timeout)
        with self._store.held(limit):
            try:
                reached = balloon_ops.set_balloon(self._qmp, self._log, target_bytes, wait=wait, timeout=limit)
            except WaitTimeout:  # the target is set; the guest is slow to follow it
                record()
                raise
            record()
            return reached
