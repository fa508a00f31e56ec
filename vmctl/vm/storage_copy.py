"""Non-shared storage for migration: mirror each disk into the target's NBD export first.

The target exports its (empty) disks over NBD; the source mirrors each disk into them; once all
mirrors are READY the RAM migration runs; at the switchover the mirrors are ended in sync without
pivoting (the source keeps its own disks until it quits) and the exports go.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import attrs

from vmctl.errors import QMPError, VmctlError
from vmctl.model import DiskSpec
from vmctl.model.names import nbd_client_node as client_node
from vmctl.model.tls import TLSCreds
from vmctl.ops import nbd as nbd_ops
from vmctl.ops.blockjobs import Job
from vmctl.ops.nodes import block_nodes
from vmctl.qmp import Monitor
from vmctl.vm import tls as tls_ops
from vmctl.vm.blocks import Blocks


@attrs.define
class StorageCopy:
    """The disks being copied: the source's mirrors into the target's NBD exports (``tls``: over TLS)."""

    source: Monitor
    target: Blocks
    jobs: list[Job]
    disk_ids: list[str]
    _log: Any
    tls: bool = attrs.field(default=False, kw_only=True)

    @classmethod
    def start(
        cls,
        source: Monitor,
        target: Blocks,
        disks: Sequence[DiskSpec],
        *,
        address: nbd_ops.NbdAddress | None,
        timeout: float,
        log: Any,
        tls: tuple[str, TLSCreds] | None = None,
    ) -> StorageCopy:
        """``tls``: the source's client credentials object (loaded) and the target's credentials."""
        copy = cls(source, target, [], [d.id for d in disks], log, tls=tls is not None)
        try:
            for disk in disks:
                export = target.export_disk(disk.id, address=address, writable=True, tls=tls[1] if tls else None)
                assert target.nbd_address is not None
                client: dict[str, Any] = {
                    "driver": "nbd",
                    "node-name": client_node(disk.id),
                    "server": nbd_ops.socket_address(target.nbd_address),
                    "export": export.name,
                }
                if tls is not None:
                    client["tls-creds"] = tls[0]
                source.execute("blockdev-add", client)
                arguments = {
                    "job-id": f"{disk.id}-copy",
                    "device": disk.active_node,
                    "target": client_node(disk.id),
                    "sync": "full",
                }
                copy.jobs.append(Job.start(source, log, "blockdev-mirror", arguments, job_type="mirror"))
            for job in copy.jobs:
                job.wait_ready(timeout)
        except BaseException:
            copy.abort()
            raise
        log.info("storage_copy.ready", disks=copy.disk_ids)
        return copy

    def finish(self) -> None:
        """At switchover: end each mirror in sync (no pivot), then drop the NBD plumbing."""
        for job in self.jobs:
            job.cancel()  # a READY mirror cancelled without force completes in sync
        self._drop()

    def abort(self) -> None:
        """Undo the copy (its mirrors, client nodes and exports) as far as QEMU lets it; never
        raises, so that the error that made the migration abort is the one its caller sees."""
        for job in self.jobs:
            job.abandon()
        with contextlib.suppress(VmctlError):
            self._drop()

    def _drop(self) -> None:
        nodes = block_nodes(self.source)
        for disk_id in self.disk_ids:
            if client_node(disk_id) in nodes:
                with contextlib.suppress(QMPError):
                    self.source.execute("blockdev-del", {"node-name": client_node(disk_id)})
            with contextlib.suppress(VmctlError):  # not exported yet, or gone
                self.target.unexport_disk(disk_id)
        if self.tls:
            with contextlib.suppress(QMPError):
                tls_ops.unload(self.source, "nbd", "client")
