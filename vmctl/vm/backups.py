"""A VM's backups: push-mode backups of its disks at one instant, and the checkpoints between them.

``vm.backup(dest_dir)`` starts one and returns a ``BackupJob``; ``job.wait()`` returns the
``Backup`` a control plane keeps (its checkpoint, the files). ``since=`` makes it incremental
from an earlier checkpoint. See ``vmctl.ops.backup`` for how the instant and the checkpoints hold.
"""

from __future__ import annotations

import datetime
import functools
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from vmctl.agent.guest import GuestAgent
from vmctl.errors import CommandError, InvalidArgument
from vmctl.model import DiskSpec
from vmctl.model.backup import Backup, check_checkpoint_name
from vmctl.ops import backup as backup_ops
from vmctl.ops.blockjobs import Job, JobProgress
from vmctl.ops.deadline import Deadline
from vmctl.qmp import Monitor
from vmctl.vm.journal import BACKUP, Intent
from vmctl.vm.store import StateStore


class BackupJob:
    """A backup under way: ``wait`` for its ``Backup``, follow its ``progress``, ``cancel`` it.
    As a context manager, it cancels a backup still running when the block ends."""

    def __init__(
        self,
        *,
        qmp: Monitor,
        log: Any,
        jobs: list[Job],
        disks: Sequence[DiskSpec],
        files: dict[str, str],
        checkpoint: str,
        since: str | None,
        started: float,
        on_end: Callable[[], Any],
    ) -> None:
        self._on_end = on_end
        self._qmp = qmp
        self._log = log
        self._jobs = jobs
        self._disks = list(disks)
        self.files = dict(files)
        self.checkpoint = checkpoint
        self.since = since
        self._started = started
        self._result: Backup | None = None
        self._ended = False

    def progress(self) -> list[JobProgress]:
        """Each disk's job: bytes done of bytes to do."""
        return [job.progress() for job in self._jobs if not job.finished]

    def set_bandwidth(self, bytes_per_second: int) -> None:
        """Limit each disk's copy to ``bytes_per_second`` (0: no limit)."""
        if not isinstance(bytes_per_second, int) or isinstance(bytes_per_second, bool) or bytes_per_second < 0:
            raise InvalidArgument(f"bandwidth is a whole number of bytes per second, not {bytes_per_second!r}")
        for job in self._jobs:
            if not job.finished and job.progress().status in ("running", "paused", "ready"):
                try:
                    self._qmp.execute("block-job-set-speed", {"device": job.id, "speed": bytes_per_second})
                except CommandError:
                    if job.progress().status in ("running", "paused", "ready"):  # refused, not just ended
                        raise

    def wait(self, timeout: float) -> Backup:
        """The backup, once every disk's copy is done. If one fails, the others are cancelled, the
        files go and so does this backup's checkpoint (``BlockJobError``)."""
        if self._result is not None:
            return self._result
        limit = Deadline.after(timeout)
        try:
            for job in self._jobs:
                job.wait(limit.left(f"backup {self.checkpoint}: {job.id}"))
        except BaseException:
            self._end(succeeded=False)
            raise
        self._end(succeeded=True)
        sizes = {disk_id: os.stat(path).st_blocks * 512 for disk_id, path in self.files.items()}
        self._result = Backup(
            checkpoint=self.checkpoint,
            since=self.since,
            files=self.files,
            sizes=sizes,
            started=self._started,
            finished=time.time(),
        )
        self._log.info("backup.done", checkpoint=self.checkpoint, since=self.since, sizes=sizes)
        return self._result

    def cancel(self, timeout: float = 60.0) -> None:
        """Stop the backup: its files and its checkpoint go; every change stays in the earlier ones."""
        if self._ended:
            return
        limit = Deadline.after(timeout)
        try:
            for job in self._jobs:
                job.cancel(limit.left(f"cancel of {job.id}"))
        finally:
            self._end(succeeded=False)
        self._log.info("backup.cancelled", checkpoint=self.checkpoint)

    def _end(self, *, succeeded: bool) -> None:
        if self._ended:
            return
        self._ended = True
        for job in self._jobs:
            job.abandon()  # one still running is cancelled; it never raises
        try:
            backup_ops.finish(self._qmp, self._disks, self.checkpoint, succeeded=succeeded)
            if not succeeded:
                for path in self.files.values():
                    Path(path).unlink(missing_ok=True)
        finally:
            self._on_end()  # the journal's entry: a cleanup that failed is the next attach's

    def __enter__(self) -> BackupJob:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if not self._ended:
            self.cancel()


class Backups:
    def __init__(
        self, *, name: str, qmp: Monitor, store: StateStore, log: Any, agent: Callable[[], GuestAgent]
    ) -> None:
        self.name = name
        self._qmp = qmp
        self._store = store
        self._log = log
        self._agent = agent

    def backup(
        self,
        dest_dir: str | os.PathLike[str],
        *,
        disks: Sequence[str] | None = None,
        since: str | None = None,
        checkpoint: str | None = None,
        bandwidth: int | None = None,
        quiesce: bool = False,
    ) -> BackupJob:
        """Start a backup of ``disks`` (default: all) into ``dest_dir``, one qcow2 file per disk,
        all at one instant, which becomes the checkpoint ``checkpoint`` (default: a timestamp).
        ``since``: only what the guest wrote after that checkpoint. ``bandwidth``: bytes per
        second per disk. ``quiesce``: the guest agent freezes the guest's filesystems for the
        instant the backup starts (only for it)."""
        name = check_checkpoint_name(checkpoint or _timestamp())
        if bandwidth is not None and (not isinstance(bandwidth, int) or isinstance(bandwidth, bool) or bandwidth < 1):
            raise InvalidArgument(f"bandwidth is a positive number of bytes per second, not {bandwidth!r}")
        agent = self._agent() if quiesce else None  # AgentUnavailable before anything is done
        with self._store.lock:
            inventory = self._store.inventory
            chosen = [self._store.require_disk(i) for i in disks] if disks is not None else list(inventory.disks)
            destination = Path(dest_dir)
            backup_ops.check_request(self._qmp, chosen, destination, checkpoint=name, since=since)
            # In the state file before the first step: an attach after a killed control plane cancels it.
            paths = tuple(str(backup_ops.target_path(destination, d, name)) for d in chosen)
            self._store.begin(
                Intent(operation="backup", checkpoint=name, disk_ids=tuple(d.id for d in chosen), files=paths)
            )
            try:
                started = time.time()
                jobs, files = backup_ops.start_backup(
                    self._qmp, self._log, chosen, destination, checkpoint=name, since=since, bandwidth=bandwidth,
                    frozen=agent.frozen if agent is not None else None,
                )  # fmt: skip
            except BaseException:
                self._store.end(BACKUP)
                raise
        self._log.info("backup.started", checkpoint=name, since=since, disks=[d.id for d in chosen])
        return BackupJob(
            qmp=self._qmp, log=self._log, jobs=jobs, disks=chosen, files=files, checkpoint=name, since=since,
            started=started, on_end=functools.partial(self._store.end, BACKUP),
        )  # fmt: skip

    def checkpoints(self) -> list[str]:
        """The checkpoints every disk of the VM has, by name."""
        return backup_ops.checkpoints(self._qmp, self._store.inventory.disks)

    def remove_checkpoint(self, name: str) -> None:
        """Stop recording changes since ``name``; a backup ``since`` it is no longer possible."""
        with self._store.lock:
            backup_ops.remove_checkpoint(self._qmp, self._store.inventory.disks, name)


def _timestamp() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3]
