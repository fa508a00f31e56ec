"""A VM's block operations: snapshots, commit, stream, mirror, dirty bitmaps, NBD exports.

Block jobs run in QEMU; when one succeeds, the disk's new chain (``DiskSpec.layers``) replaces
the old one in the inventory. The part owns the VM's NBD server and its exports."""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import Any, Literal

import attrs

from vmctl.agent.guest import GuestAgent
from vmctl.errors import AgentError, DeviceExists, HotplugError, InvalidArgument, QMPError, UnknownDevice
from vmctl.model import DiskSpec, Inventory
from vmctl.model.names import NBD_SOCKET
from vmctl.model.tls import TLSCreds
from vmctl.ops import bitmaps as bitmap_ops
from vmctl.ops import chains as chain_ops
from vmctl.ops import nbd as nbd_ops
from vmctl.ops.blockjobs import Job, JobProgress, query_jobs
from vmctl.ops.deadline import Deadline
from vmctl.ops.rollback import Steps
from vmctl.qmp import Monitor
from vmctl.vm import tls as tls_ops
from vmctl.vm.journal import Intent
from vmctl.vm.store import StateStore


class Blocks:
    def __init__(
        self, *, name: str, qmp: Monitor, store: StateStore, log: Any, agent: Callable[[], GuestAgent]
    ) -> None:
        self.name = name
        self._agent = agent  # vm.agent: raises AgentUnavailable for a VM launched without one
        self._qmp = qmp
        self._store = store
        self._log = log
        self._nbd_address: nbd_ops.NbdAddress | None = None
        self._exports: dict[str, nbd_ops.Export] = {}
        self._nbd_tls = False

    def _replace_chain(self, disk: DiskSpec) -> None:
        """A job's new chain for the disk, onto what the inventory has of it now (its other
        settings may have changed while the job ran)."""

        def change(inventory: Inventory) -> Inventory:
            current = inventory.disk(disk.id) or disk
            return inventory.with_disk(
                attrs.evolve(
                    current, path=disk.path, format=disk.format, base_layer=disk.base_layer, overlays=disk.overlays
                )
            )

        self._store.update(change)

    def snapshot_disks(
        self,
        ids: list[str],
        *,
        overlays: dict[str, str | os.PathLike[str]],
        bitmap: str | None = None,
        quiesce: bool = False,
    ) -> list[DiskSpec]:
        """External snapshots of these disks, switched atomically (one transaction); ``overlays``
        maps each id to its new qcow2 file. On failure nothing changes (``SnapshotError``), unless its
        ``remaining`` names what is left: then ``vm.leftovers`` tells how the journal settled it.

        With ``quiesce``, the guest agent flushes and freezes the guest's filesystems for the
        switch, so each snapshot is consistent (not just crash-consistent); they are always
        thawed. A thaw that fails after the switch is an ``AgentError`` raised after the
        snapshot is recorded."""
        agent = self._agent() if quiesce else None  # AgentUnavailable before anything is done
        thaw_failures: list[AgentError] = []

        @contextlib.contextmanager
        def frozen() -> Iterator[None]:
            assert agent is not None
            switched = False
            try:
                with agent.frozen():
                    yield
                    switched = True
            except AgentError as exc:
                if not switched:
                    raise
                thaw_failures.append(exc)

        with self._store.lock, contextlib.ExitStack() as intents:
            disks = [self._store.require_disk(i) for i in ids]
            done = {}
            for disk in disks:  # each disk's intent: the disk as switched, the file to be made
                if disk.id in overlays:
                    planned = disk.with_overlay(overlays[disk.id])
                    path = planned.layer_path(planned.layers[-1])
                    files = () if os.path.exists(path) else (path, chain_ops.staging_path(path))
                    intent = Intent(operation="snapshot_disk", disk=planned, files=files)
                    done[disk.id] = intents.enter_context(self._store.intent(intent))
            updated = chain_ops.snapshot_disks(
                self._qmp, self._log, disks, overlays, bitmap=bitmap, quiesce=frozen if quiesce else None
            )
            for disk in updated:
                done[disk.id](functools.partial(Inventory.with_disk, disk=disk))
        if thaw_failures:
            raise AgentError(f"{self.name}: the snapshot was taken, but the guest was not thawed: {thaw_failures[0]}")
        return updated

    def commit_disk(self, id: str, *, top: int | None = None, base: int | None = None, timeout: float = 300) -> None:
        """Commit layers down (``top``/``base`` are layer numbers, see ``DiskSpec.layers``): an
        active commit pivots the guest back onto the base; the chain in the inventory follows.
        ``timeout`` bounds it all: the start, the copy, the pivot."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            disk = self._store.require_disk(id)
            job, result = chain_ops.start_commit(self._qmp, self._log, disk, top=top, base=base)
            job.on_success(lambda: self._replace_chain(result))
            with _cancelled_on_failure(job, limit.timeout):
                if top is None or top == disk.layers[-1]:
                    job.wait_ready(limit.left(f"commit of {id}: waiting for it to be ready"))
                    job.complete(limit.left(f"commit of {id}: the pivot"))
                else:
                    job.wait(limit.left(f"commit of {id}"))

    def stream_disk(self, id: str, *, base: int | None = None, timeout: float = 300) -> None:
        """Pull the backing layers' data into the active layer (all of them: a standalone image),
        all within ``timeout``."""
        limit = Deadline.after(timeout)
        with self._store.held(limit):
            disk = self._store.require_disk(id)
            job, result = chain_ops.start_stream(self._qmp, self._log, disk, base=base)
            job.on_success(lambda: self._replace_chain(result))
            with _cancelled_on_failure(job, limit.timeout):
                job.wait(limit.left(f"stream of {id}"))

    def mirror_disk(
        self,
        id: str,
        target_path: str | os.PathLike[str],
        *,
        sync: chain_ops.MirrorSync = "full",
        format: Literal["qcow2", "raw"] = "qcow2",
    ) -> Job:
        """Start mirroring a disk to a new image; ``job.wait_ready()`` then ``job.complete()``
        pivots the guest onto it (the inventory follows) or ``job.cancel()`` keeps the source."""
        with self._store.lock:
            disk = self._store.require_disk(id)
            job, result = chain_ops.start_mirror(self._qmp, self._log, disk, target_path, sync=sync, fmt=format)
            job.on_success(lambda: self._replace_chain(result))
            job.follow_up_under(self._store.lock)  # its caller ends it, maybe from another thread
            return job

    def block_jobs(self) -> list[JobProgress]:
        return query_jobs(self._qmp)

    def bitmaps(self, id: str) -> list[bitmap_ops.Bitmap]:
        return bitmap_ops.bitmaps(self._qmp, self._store.require_disk(id))

    def add_bitmap(self, id: str, name: str, *, persistent: bool = True, granularity: int | None = None) -> None:
        bitmap_ops.add_bitmap(
            self._qmp, self._store.require_disk(id), name, persistent=persistent, granularity=granularity
        )

    def remove_bitmap(self, id: str, name: str) -> None:
        bitmap_ops.remove_bitmap(self._qmp, self._store.require_disk(id), name)

    def clear_bitmap(self, id: str, name: str) -> None:
        bitmap_ops.clear_bitmap(self._qmp, self._store.require_disk(id), name)

    def merge_bitmaps(self, id: str, target: str, sources: list[str]) -> None:
        bitmap_ops.merge_bitmaps(self._qmp, self._store.require_disk(id), target, sources)

    def export_disk(
        self,
        id: str,
        *,
        address: nbd_ops.NbdAddress | None = None,
        writable: bool = False,
        name: str | None = None,
        tls: TLSCreds | None = None,
    ) -> nbd_ops.Export:
        """Export a disk over NBD (the VM's NBD server starts on first use: ``address`` is a unix
        socket path or (host, port); default: nbd.sock in the run dir). With ``tls`` the server
        speaks only TLS and takes only clients whose certificate the CA signed."""
        if tls is not None:
            tls.paths("server")
        with self._store.lock:
            disk = self._store.require_disk(id)
            if id in self._exports:
                raise DeviceExists(f"disk {id} is exported already")
            if self._nbd_address is not None and address is not None and address != self._nbd_address:
                raise InvalidArgument(f"the NBD server already listens on {self._nbd_address}")
            listening = self._nbd_address
            if listening is not None and (tls is not None) != self._nbd_tls:
                raise InvalidArgument(f"the NBD server already runs {'with' if self._nbd_tls else 'without'} TLS")
            wanted = listening or address or str(self._store.run_dir / NBD_SOCKET)
            try:
                with Steps(self._log) as steps:
                    creds = None
                    if listening is None and tls is not None:
                        creds = steps.run(
                            "object-add tls-creds",
                            lambda: tls_ops.load(self._qmp, tls, self._store.run_dir, "nbd", "server"),
                            lambda _: tls_ops.unload(self._qmp, "nbd", "server"),
                        )
                    if listening is None:  # the first export starts the server; its undo stops it
                        steps.run(
                            "nbd-server-start",
                            lambda: nbd_ops.start_server(self._qmp, wanted, tls_creds=creds),
                            lambda _: nbd_ops.stop_server(self._qmp),
                        )
                    export = steps.run(
                        "block-export-add",
                        lambda: nbd_ops.add_export(self._qmp, disk, wanted, writable=writable, name=name),
                        lambda _: nbd_ops.remove_export(self._qmp, id),
                    )
            except QMPError as exc:
                raise HotplugError(
                    f"the NBD export of disk {id} failed and was undone: {exc}", remaining=tuple(steps.leftovers)
                ) from exc
            self._nbd_address = wanted
            self._nbd_tls = tls is not None
            self._exports[id] = export
            self._log.info("disk.exported", disk=id, uri=export.uri, writable=writable)
            return export

    @property
    def nbd_address(self) -> nbd_ops.NbdAddress | None:
        """Where this VM's NBD server listens, while it has exports."""
        return self._nbd_address

    def unexport_disk(self, id: str) -> None:
        with self._store.lock:
            if id not in self._exports:
                raise UnknownDevice(f"disk {id} is not exported")
            # The export is forgotten only once all of it is gone, so that a retry finishes.
            nbd_ops.remove_export(self._qmp, id)
            if len(self._exports) == 1:
                nbd_ops.stop_server(self._qmp)
                if self._nbd_tls:
                    tls_ops.unload(self._qmp, "nbd", "server")
                self._nbd_address = None
            del self._exports[id]


@contextlib.contextmanager
def _cancelled_on_failure(job: Job, timeout: float) -> Iterator[None]:
    """A job a call waits for does not outlive the call's failure (see ``Job.abandon``), so
    that a retry finds no job in its way."""
    try:
        yield
    except BaseException:
        job.abandon(timeout)
        raise
