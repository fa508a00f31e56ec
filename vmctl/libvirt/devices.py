"""Disks, NICs, vCPUs and the balloon of a libvirt domain, changed through libvirt's own APIs.

libvirt's live domain XML is the record: what a disk or NIC is, vmctl reads back from it after
each change, so the values vmctl returns are what libvirt would migrate or restart the domain
with. QMP (through libvirtd) only reads: the vCPU ids, the balloon's size.
"""

from __future__ import annotations

import os
import threading
import time
import xml.etree.ElementTree as ET
from typing import TYPE_CHECKING, Any, TypeVar

from structlog.typing import FilteringBoundLogger

from vmctl.errors import DeviceError, DeviceExists, InvalidArgument, WaitTimeout
from vmctl.libvirt.calls import bounded
from vmctl.libvirt.devicexml import (
    device_alias,
    disk_xml,
    disks_from_xml,
    next_target_dev,
    nic_xml,
    nics_from_xml,
    target_devs,
)
from vmctl.libvirt.errors import LibvirtDeviceNotFound, LibvirtHotplugError, LibvirtTimeout
from vmctl.libvirt.eventloop import libvirt_module
from vmctl.libvirt.events import DomainEvents
from vmctl.libvirt.monitor import LibvirtMonitor
from vmctl.logs import get_logger
from vmctl.model import DiskSpec, NicSpec
from vmctl.model.disk import DiskOptions
from vmctl.model.nic import NicOptions
from vmctl.ops import balloon as balloon_ops

if TYPE_CHECKING:
    from typing_extensions import Unpack

log: FilteringBoundLogger = get_logger(__name__)

Device = TypeVar("Device", DiskSpec, NicSpec)


class LibvirtDevices:
    """The devices part of a ``LibvirtVM``: it owns the device lock and the XML reads."""

    def __init__(self, *, name: str, domain: Any, events: DomainEvents, qmp: LibvirtMonitor, vhost: bool) -> None:
        self.name = name
        self._vhost = vhost  # vhost-net needs KVM
        self._domain = domain
        self._events = events
        self._qmp = qmp
        self._log = log.bind(vm=name)
        self.lock = threading.RLock()
        libvirt = libvirt_module()
        self._libvirt = libvirt
        # A persistent domain keeps its devices in its config too, as `virsh attach-device --persistent`.
        self.live_flag = libvirt.VIR_DOMAIN_AFFECT_LIVE
        self.flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
        if domain.isPersistent():
            self.flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG

    def xml(self, timeout: float = 10.0) -> str:
        """The live domain XML."""
        return str(bounded(f"{self.name}: XMLDesc", timeout, self._domain.XMLDesc, 0))

    # -- disks ------------------------------------------------------------------------------

    def disks(self) -> tuple[DiskSpec, ...]:
        return disks_from_xml(self.xml())

    def hotplug_disk(
        self, disk: DiskSpec | str | os.PathLike[str], *, timeout: float = 30.0, **options: Unpack[DiskOptions]
    ) -> DiskSpec:
        """Attach a disk (``attachDeviceFlags``): a ``DiskSpec`` or an image path with its options.
        Returns the disk as libvirt's XML now records it (with the root port libvirt chose)."""
        disk = DiskSpec.of(disk, **options)
        if disk.encryption is not None:
            raise InvalidArgument(f"disk {disk.id}: an encrypted disk needs a libvirt secret; not supported yet")
        with self.lock:
            xml = self.xml()
            self._refuse_duplicate(xml, disk.id)
            target = next_target_dev(target_devs(xml).values(), disk.bus)
            device = disk_xml(disk, target_dev=target)
            self._log.info("libvirt.hotplug_disk", disk=disk.id, target=target)
            bounded(f"{self.name}: attach disk {disk.id}", timeout, self._domain.attachDeviceFlags, device, self.flags)
            return self._require(disks_from_xml(self.xml()), disk.id)

    def unplug_disk(self, id: str, *, timeout: float = 30.0) -> None:
        """Detach a disk (``detachDeviceAlias``) and wait until the guest has let it go."""
        with self.lock:
            self._require(self.disks(), id)
            self.detach(id, timeout)

    # -- NICs -------------------------------------------------------------------------------

    def nics(self) -> tuple[NicSpec, ...]:
        return nics_from_xml(self.xml())

    def hotplug_nic(
        self, nic: NicSpec | None = None, *, timeout: float = 30.0, **options: Unpack[NicOptions]
    ) -> NicSpec:
        """Add a NIC on an existing tap (its ``tap``), or on a new tap libvirt makes: a ``NicSpec``
        or its settings by keyword; a MAC is made when none is given."""
        wanted = NicSpec.of(nic, **options)
        with self.lock:
            self._refuse_duplicate(self.xml(), wanted.id)
            device = nic_xml(wanted, vhost=self._vhost, new_tap=True)
            self._log.info("libvirt.hotplug_nic", nic=wanted.id, tap=wanted.tap)
            bounded(f"{self.name}: attach NIC {wanted.id}", timeout, self._domain.attachDeviceFlags, device, self.flags)
            return self._require(self.nics(), wanted.id)

    def unplug_nic(self, id: str, *, timeout: float = 30.0) -> None:
        with self.lock:
            self._require(self.nics(), id)
            self.detach(id, timeout)

    # -- vCPUs and the balloon --------------------------------------------------------------

    def hotplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]:
        """Add ``count`` vCPUs (``setVcpusFlags``); returns the QOM paths of the new ones."""
        return self._set_vcpus(count, timeout)

    def unplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]:
        """Remove ``count`` vCPUs (the guest must release them); returns the QOM paths removed."""
        return self._set_vcpus(-count, timeout)

    def vcpus(self) -> tuple[int, int]:
        """The domain's vCPUs now and at most, as its live XML says."""
        vcpu = ET.fromstring(self.xml()).find("vcpu")
        most = int(vcpu.text or 1) if vcpu is not None else 1
        return (int(vcpu.get("current", most)) if vcpu is not None else most), most

    def _set_vcpus(self, change: int, timeout: float) -> list[str]:
        if isinstance(change, bool) or not isinstance(change, int) or change == 0:
            raise InvalidArgument(f"the vCPU count must be a positive integer, not {abs(change)!r}")
        with self.lock:
            present, most = self.vcpus()
            if change > 0 and present + change > most:
                raise InvalidArgument(f"only {most - present} more CPU(s) fit (raise max_cpus in the VM spec)")
            if change < 0 and present + change < 1:
                raise InvalidArgument(f"{self.name} has {present} vCPU(s): {-change} cannot go")
            if change < 0 and ET.fromstring(self.xml()).get("type") == "qemu":
                # Measured on 7.2 and 10.0: under TCG QEMU sends DEVICE_DELETED for the vCPU's lapic
                # only, never for the vCPU, so libvirt times out and its XML keeps the vCPU for good.
                raise DeviceError(
                    f"{self.name}: libvirt cannot unplug vCPUs of a TCG guest (QEMU never reports the vCPU "
                    "deleted, and libvirt's XML would keep it); nothing was sent"
                )
            deadline = time.monotonic() + timeout
            wanted = present + change
            before = self._vcpu_paths()
            self._log.info("libvirt.set_vcpus", count=wanted)
            try:
                bounded(f"{self.name}: set {wanted} vCPUs", timeout, self._domain.setVcpusFlags, wanted, self.flags)
            except LibvirtTimeout:
                # libvirt waits 5 s for the guest to release a vCPU, then gives up waiting (not the
                # unplug): under TCG a guest takes longer. The rest of the caller's time is for it.
                if change > 0:
                    raise
                self._await_vcpus(wanted, deadline)
            after = self._vcpu_paths()
            # libvirt's aliases of the vCPU devices (vcpu1, ...), as vmctl's hotplug gives its ids.
            changed = after - before if change > 0 else before - after
            return sorted((path.rsplit("/", 1)[-1] for path in changed), key=_vcpu_order)

    def _vcpu_paths(self) -> set[str]:
        return {str(cpu["qom-path"]) for cpu in self._qmp.execute("query-cpus-fast")}

    def _await_vcpus(self, wanted: int, deadline: float) -> None:
        while len(self._vcpu_paths()) != wanted or self.vcpus()[0] != wanted:
            if time.monotonic() >= deadline:
                raise LibvirtHotplugError(
                    f"{self.name}: the guest did not release its vCPUs down to {wanted} in time (retry to finish)",
                    remaining=tuple(sorted(self._vcpu_paths())),
                )
            time.sleep(0.1)

    def balloon(self) -> int:
        """The guest memory in bytes as the balloon reports it."""
        return balloon_ops.balloon_bytes(self._qmp)

    def set_balloon(self, target_bytes: int, *, wait: bool = True, timeout: float = 30.0) -> int:
        """Set the balloon's target (``setMemoryFlags``); by default wait until the guest reaches it."""
        if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes < 1 << 20:
            raise InvalidArgument(f"the balloon target must be at least 1 MiB in bytes, not {target_bytes!r}")
        deadline = time.monotonic() + timeout
        with self.lock:
            kib = target_bytes // 1024
            bounded(f"{self.name}: balloon to {kib} KiB", timeout, self._domain.setMemoryFlags, kib, self.flags)
            reached = self.balloon()
            while wait and reached != target_bytes:
                if time.monotonic() >= deadline:
                    raise WaitTimeout(
                        f"{self.name}: the guest has {reached} bytes, not {target_bytes}, after {timeout:g}s"
                    )
                time.sleep(0.05)
                reached = self.balloon()
            return reached

    # -- shared -----------------------------------------------------------------------------

    def detach(self, id: str, timeout: float) -> None:
        alias = device_alias(id)
        deadline = time.monotonic() + timeout
        with self._events.waiting(lambda e: e.alias == alias) as removal:
            self._log.info("libvirt.unplug", device=id)
            bounded(f"{self.name}: detach {id}", timeout, self._domain.detachDeviceAlias, alias, self.flags)
            try:
                outcome = removal.until(deadline, f"{self.name}: detach {id}")
            except WaitTimeout:
                raise LibvirtHotplugError(
                    f"{self.name}: the guest did not release {id} within {timeout:g}s (retry to finish)",
                    remaining=(id,),
                ) from None
        if outcome.kind == "device-removal-failed":
            raise LibvirtHotplugError(f"{self.name}: QEMU could not remove {id}", remaining=(id,))

    def _refuse_duplicate(self, xml: str, id: str) -> None:
        if any(d.id == id for d in disks_from_xml(xml)) or any(n.id == id for n in nics_from_xml(xml)):
            raise DeviceExists(f"{self.name} already has a device {id!r}")

    def _require(self, devices: tuple[Device, ...], id: str) -> Device:
        for device in devices:
            if device.id == id:
                return device
        raise LibvirtDeviceNotFound(f"{self.name} has no device {id!r}")


def _vcpu_order(alias: str) -> tuple[int, str]:
    digits = "".join(c for c in alias if c.isdigit())
    return (int(digits) if digits else -1, alias)
