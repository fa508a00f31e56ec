"""Snapshots, commit, stream and mirror of a libvirt domain's disks, through libvirt's block APIs.

libvirt runs the block jobs and reports their ends as BLOCK_JOB_2 events (by the disk's target
dev); each wait here is on those events, bounded by the caller's timeout. The chain a disk has
after a job is read back from libvirt's live XML, as every other device value of a LibvirtVM.
"""

from __future__ import annotations

import os
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Literal

from structlog.typing import FilteringBoundLogger

from vmctl.errors import BlockJobError, InvalidArgument, SnapshotError, WaitTimeout
from vmctl.libvirt.calls import bounded
from vmctl.libvirt.devices import LibvirtDevices
from vmctl.libvirt.devicexml import target_devs
from vmctl.libvirt.errors import LibvirtDeviceNotFound, LibvirtError
from vmctl.libvirt.eventloop import libvirt_module
from vmctl.libvirt.events import DomainEvent, DomainEvents, EventWait
from vmctl.logs import get_logger
from vmctl.model import DiskSpec

log: FilteringBoundLogger = get_logger(__name__)


class LibvirtBlockJob:
    """A mirror under way (``blockCopy``): ``wait_ready`` then ``complete`` pivots the guest onto
    the copy; ``cancel`` keeps the source. Either ends the job."""

    def __init__(self, blocks: LibvirtBlocks, disk_id: str, target: str, events: EventWait) -> None:
        self.id = disk_id
        self._blocks = blocks
        self._target = target
        self._events = events
        self._ready = False
        self._ended = False

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._ready:
            event = self._blocks.next_job_event(self._events, deadline, f"mirror of {self.id}")
            self._ready = self._blocks.job_status(event, self.id) == "ready"

    def complete(self, timeout: float = 60.0) -> None:
        """Pivot the guest onto the copy (``blockJobAbort(PIVOT)``)."""
        libvirt = libvirt_module()
        if not self._ready:
            raise InvalidArgument(f"mirror of {self.id}: wait_ready() first (the copy is not in step yet)")
        self._end(timeout, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)

    def cancel(self, timeout: float = 60.0) -> None:
        """End the mirror; the guest stays on its source image."""
        self._end(timeout, 0)

    def _end(self, timeout: float, flags: int) -> None:
        if self._ended:
            return
        bounded(f"end the mirror of {self.id}", timeout, self._blocks.domain.blockJobAbort, self._target, flags)
        self._ended = True
        self._blocks.events.unsubscribe(self._events)


class LibvirtBlocks:
    """The block part of a ``LibvirtVM``: it shares the devices part's lock and XML reads."""

    def __init__(self, *, name: str, domain: Any, events: DomainEvents, devices: LibvirtDevices) -> None:
        self.name = name
        self.domain = domain
        self.events = events
        self._devices = devices
        self._log = log.bind(vm=name)
        self._lock: threading.RLock = devices.lock

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_disks(
        self,
        ids: list[str],
        *,
        overlays: dict[str, str | os.PathLike[str]],
        bitmap: str | None = None,
        quiesce: bool = False,
    ) -> list[DiskSpec]:
        """External snapshots of these disks, taken atomically (``snapshotCreateXML`` DISK_ONLY |
        ATOMIC): each disk's new writes go to its overlay (a qcow2 file libvirt makes). With
        ``quiesce``, libvirt freezes the guest through its agent channel (QUIESCE)."""
        libvirt = libvirt_module()
        if bitmap is not None:
            raise InvalidArgument(
                f"{self.name}: dirty bitmaps with a snapshot need vmctl's own QEMU (libvirt: checkpoints)"
            )
        if sorted(overlays) != sorted(ids):
            raise InvalidArgument(f"{self.name}: overlays must name exactly the disks {ids}, not {sorted(overlays)}")
        with self._lock:
            targets = self._targets(ids)  # refuses unknown disks before anything is sent
            snapshot = ET.Element("domainsnapshot")
            disks = ET.SubElement(snapshot, "disks")
            for disk_id, target in target_devs(self._devices.xml()).items():
                if disk_id in overlays:
                    element = ET.SubElement(disks, "disk", name=target, snapshot="external")
                    ET.SubElement(element, "driver", type="qcow2")
                    ET.SubElement(element, "source", file=str(Path(overlays[disk_id]).absolute()))
                else:
                    ET.SubElement(disks, "disk", name=target, snapshot="no")
            flags = (
                libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_DISK_ONLY
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC
                | libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_NO_METADATA
                | (libvirt.VIR_DOMAIN_SNAPSHOT_CREATE_QUIESCE if quiesce else 0)
            )
            self._log.info("libvirt.snapshot_disks", disks=list(targets))
            try:
                bounded(f"{self.name}: snapshot {ids}", 60.0, self.domain.snapshotCreateXML,
                        ET.tostring(snapshot, encoding="unicode"), flags)  # fmt: skip
            except LibvirtError as exc:
                raise SnapshotError(f"{self.name}: the snapshot of {ids} failed, no disk changed: {exc}") from None
            by_id = {disk.id: disk for disk in self._devices.disks()}
            return [by_id[disk_id] for disk_id in ids]

    # -- block jobs -------------------------------------------------------------------------

    def commit_disk(self, id: str, *, top: int | None = None, base: int | None = None, timeout: float = 300) -> None:
        """Commit layers down (``top``/``base``: layer numbers of ``vm.disks()``' chain, 0 the base).
        Committing the active layer pivots the guest onto ``base`` (``blockCommit`` ACTIVE, then
        ``blockJobAbort`` PIVOT)."""
        libvirt = libvirt_module()
        deadline = time.monotonic() + timeout
        with self._lock:
            disk, target = self._disk(id)
            layers = [disk.path, *(overlay.path for overlay in disk.overlays)]
            top_index = len(layers) - 1 if top is None else top
            base_index = top_index - 1 if base is None else base
            if not 0 <= base_index < top_index < len(layers):
                raise InvalidArgument(f"disk {id}: commit needs base < top within layers 0..{len(layers) - 1}")
            active = top_index == len(layers) - 1
            flags = libvirt.VIR_DOMAIN_BLOCK_COMMIT_ACTIVE if active else 0
            with self._job_events(target) as events:
                self._log.info("libvirt.commit_disk", disk=id, top=top_index, base=base_index)
                bounded(f"{self.name}: commit {id}", 60.0, self.domain.blockCommit, target, layers[base_index],
                        None if active else layers[top_index], 0, flags)  # fmt: skip
                status = self._until_ends(events, id, deadline, ready_is_end=active)
                if active and status == "ready":
                    flags = libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
                    bounded(f"{self.name}: pivot {id}", max(1.0, deadline - time.monotonic()),
                            self.domain.blockJobAbort, target, flags)  # fmt: skip

    def stream_disk(self, id: str, *, base: int | None = None, timeout: float = 300) -> None:
        """Pull the backing layers' data into the active layer (``blockRebase``); all of them by default."""
        deadline = time.monotonic() + timeout
        with self._lock:
            disk, target = self._disk(id)
            layers = [disk.path, *(overlay.path for overlay in disk.overlays)]
            if base is not None and not 0 <= base < len(layers) - 1:
                raise InvalidArgument(f"disk {id}: base must be a layer below the active one (0..{len(layers) - 2})")
            with self._job_events(target) as events:
                self._log.info("libvirt.stream_disk", disk=id, base=base)
                bounded(f"{self.name}: stream {id}", 60.0, self.domain.blockRebase, target,
                        None if base is None else layers[base], 0, 0)  # fmt: skip
                self._until_ends(events, id, deadline, ready_is_end=False)

    def mirror_disk(
        self,
        id: str,
        target_path: str | os.PathLike[str],
        *,
        sync: Literal["full", "top"] = "full",
        format: Literal["qcow2", "raw"] = "qcow2",
    ) -> LibvirtBlockJob:
        """Start copying a disk to a new image (``blockCopy``); see ``LibvirtBlockJob``."""
        libvirt = libvirt_module()
        if sync not in ("full", "top"):
            raise InvalidArgument(f"sync must be full or top, not {sync!r}")
        destination = Path(target_path).absolute()
        if destination.exists():
            raise InvalidArgument(f"{destination} exists: the mirror makes its own image")
        with self._lock:
            _, target = self._disk(id)
            element = ET.Element("disk", type="file", device="disk")
            ET.SubElement(element, "driver", type=format)
            ET.SubElement(element, "source", file=str(destination))
            flags = libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB  # a persistent domain allows no other kind
            if sync == "top":
                flags |= libvirt.VIR_DOMAIN_BLOCK_COPY_SHALLOW
            events = self.events.subscribe(lambda e: e.kind == "block-job" and e.disk == target)
            try:
                self._log.info("libvirt.mirror_disk", disk=id, target=str(destination), sync=sync)
                bounded(f"{self.name}: mirror {id}", 60.0, self.domain.blockCopy, target,
                        ET.tostring(element, encoding="unicode"), None, flags)  # fmt: skip
            except BaseException:
                self.events.unsubscribe(events)
                raise
            return LibvirtBlockJob(self, id, target, events)

    # -- shared -----------------------------------------------------------------------------

    def next_job_event(self, events: EventWait, deadline: float, what: str) -> DomainEvent:
        try:
            return events.until(deadline, f"{self.name}: {what}")
        except WaitTimeout:
            raise WaitTimeout(f"{self.name}: {what} did not end in time (libvirt still runs it)") from None

    def job_status(self, event: DomainEvent, disk_id: str) -> str:
        libvirt = libvirt_module()
        names = {
            libvirt.VIR_DOMAIN_BLOCK_JOB_COMPLETED: "completed",
            libvirt.VIR_DOMAIN_BLOCK_JOB_READY: "ready",
            libvirt.VIR_DOMAIN_BLOCK_JOB_FAILED: "failed",
            libvirt.VIR_DOMAIN_BLOCK_JOB_CANCELED: "cancelled",
        }
        status = names.get(event.status, "unknown")
        if status in ("failed", "cancelled"):
            raise BlockJobError(f"{self.name}: the block job on {disk_id} {status}", job_id=disk_id, qemu_error="")
        return status

    def _until_ends(self, events: EventWait, disk_id: str, deadline: float, *, ready_is_end: bool) -> str:
        while True:
            status = self.job_status(self.next_job_event(events, deadline, f"the block job on {disk_id}"), disk_id)
            if status == "completed" or (ready_is_end and status == "ready"):
                return status

    def _job_events(self, target: str) -> Any:
        return self.events.waiting(lambda e: e.kind == "block-job" and e.disk == target)

    def _disk(self, id: str) -> tuple[DiskSpec, str]:
        targets = target_devs(self._devices.xml())
        for disk in self._devices.disks():
            if disk.id == id:
                return disk, targets[id]
        raise LibvirtDeviceNotFound(f"{self.name} has no disk {id!r}")

    def _targets(self, ids: list[str]) -> dict[str, str]:
        targets = target_devs(self._devices.xml())
        missing = [i for i in ids if i not in targets]
        if missing:
            raise LibvirtDeviceNotFound(f"{self.name} has no disks {missing}")
        return {i: targets[i] for i in ids}
