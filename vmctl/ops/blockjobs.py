"""One job layer for every block job (commit, mirror, stream): started with auto-dismiss off,
followed through JOB_STATUS_CHANGE events subscribed before the start command, always dismissed."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import attrs

from vmctl.errors import BlockJobError, CommandError, CommandTimeout, VmctlError, WaitTimeout
from vmctl.ops.queries import ask, execute_checked
from vmctl.ops.waiting import events_until
from vmctl.qmp import QMPMonitor, Subscription
from vmctl.qmp.timeouts import deadline


@attrs.frozen(kw_only=True)
class JobProgress:
    id: str
    type: str
    status: str
    current: int
    total: int
    error: str | None

    @classmethod
    def from_qmp(cls, info: Mapping[str, Any]) -> JobProgress:
        return cls(
            id=str(info["id"]),
            type=str(info.get("type", "")),
            status=str(info.get("status", "")),
            current=int(info.get("current-progress", 0)),
            total=int(info.get("total-progress", 0)),
            error=info.get("error"),
        )


def query_jobs(qmp: QMPMonitor) -> list[JobProgress]:
    return [JobProgress.from_qmp(j) for j in ask(qmp, "query-jobs")]


#: A job in these states is not on its way to its end (a refused cancel leaves it so).
_RUNNING = frozenset({"created", "running", "paused", "ready", "standby"})


def end_orphan_job(qmp: QMPMonitor, job_id: str, timeout: float = 30.0) -> None:
    """Cancel and dismiss a job nobody follows any more (its control plane died), if QEMU has it."""
    ends = deadline(timeout)
    while True:
        job = next((j for j in query_jobs(qmp) if j.id == job_id), None)
        if job is None:
            return
        if job.status in ("concluded", "null"):
            with contextlib.suppress(CommandError):
                qmp.execute("job-dismiss", {"id": job_id})
            return
        if job.status in _RUNNING:
            with contextlib.suppress(CommandError):
                qmp.execute("job-cancel", {"id": job_id})
        if time.monotonic() > ends:
            raise WaitTimeout(f"block job {job_id} did not end within {timeout:g}s of its cancel")
        time.sleep(0.05)


class Job:
    """A block job. ``wait`` (or ``complete``/``cancel``) ends it; it is dismissed either way."""

    def __init__(self, qmp: QMPMonitor, job_id: str, job_type: str, events: Subscription, log: Any) -> None:
        self.qmp = qmp
        self.id = job_id
        self.type = job_type
        self._events = events
        self._log = log.bind(job=job_id)
        self.status = "created"
        self._finished = False
        self._on_success: list[Callable[[], Any]] = []
        self._on_failure: list[Callable[[], Any]] = []
        self._follow_up_lock: AbstractContextManager[Any] = contextlib.nullcontext()
        self._outcome: tuple[str | None] | None = None  # QEMU's error, once read (before dismissal)

    @classmethod
    def start(cls, qmp: QMPMonitor, log: Any, command: str, arguments: Mapping[str, Any], *, job_type: str) -> Job:
        job_id = str(arguments["job-id"])
        return cls.started_by(qmp, log, command, {**arguments, "auto-dismiss": False}, job_id, job_type=job_type)

    @classmethod
    def started_by(
        cls, qmp: QMPMonitor, log: Any, command: str, arguments: Mapping[str, Any], job_id: str, *, job_type: str
    ) -> Job:
        """Follow the job ``job_id`` that ``command`` starts (a job command, or a transaction with
        one: its arguments then say ``auto-dismiss: false`` themselves)."""
        (job,) = cls.all_started_by(qmp, log, command, arguments, [job_id], job_type=job_type)
        return job

    @classmethod
    def all_started_by(
        cls,
        qmp: QMPMonitor,
        log: Any,
        command: str,
        arguments: Mapping[str, Any],
        job_ids: Sequence[str],
        *,
        job_type: str,
    ) -> list[Job]:
        """Follow the jobs one command starts together (a transaction): each heard from its start."""
        subscriptions = [qmp.events("JOB_STATUS_CHANGE", match={"id": job_id}, maxsize=1024) for job_id in job_ids]
        try:  # a late reply: if QEMU has the jobs, they are ours to follow
            execute_checked(qmp, command, arguments, took=lambda: set(job_ids) <= {job.id for job in query_jobs(qmp)})
        except BaseException:
            for events in subscriptions:
                events.close()
            raise
        jobs = [cls(qmp, job_id, job_type, events, log) for job_id, events in zip(job_ids, subscriptions, strict=True)]
        for job in jobs:
            job._log.info("blockjob.started", type=job_type)
        return jobs

    def __enter__(self) -> Job:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        """``with vm.mirror_disk(...) as job:``: the job ends with the block. One the block leaves
        unfinished (by an error, or by not ending it) is abandoned, so nothing of it outlives it."""
        self.abandon()

    def abandon(self, timeout: float = 60.0) -> None:
        """End a job its caller gives up on, without raising: one still running is cancelled (the
        disk stays as it was); one that has ended meanwhile is concluded with its own outcome."""
        if self._finished:
            return
        with contextlib.suppress(VmctlError):
            if self.progress().status in _RUNNING:
                self.cancel(timeout)
            else:
                self.wait(timeout)

    def follow_up_under(self, lock: AbstractContextManager[Any]) -> None:
        """Hold ``lock`` while the follow-ups run (the inventory's, for a job its caller ends)."""
        self._follow_up_lock = lock

    def on_success(self, action: Callable[[], Any]) -> None:
        """Run ``action`` once the job concluded without error (e.g. update the inventory)."""
        self._on_success.append(action)

    def on_failure(self, action: Callable[[], Any]) -> None:
        """Run ``action`` once the job ended with an error or was cancelled (e.g. drop its target)."""
        self._on_failure.append(action)

    def progress(self) -> JobProgress:
        for job in query_jobs(self.qmp):
            if job.id == self.id:
                return job
        return JobProgress(id=self.id, type=self.type, status="null", current=0, total=0, error=None)

    def wait_ready(self, timeout: float) -> None:
        """Wait until a mirror or active commit is READY (source and target in sync)."""
        self._wait_for({"ready"}, timeout)
        if self.status != "ready":
            self._conclude(cancelled=False)

    def complete(self, timeout: float = 60.0) -> None:
        """Finish a READY job: a mirror pivots to its target, an active commit to its base."""
        try:
            self.qmp.execute("job-complete", {"id": self.id})
        except CommandTimeout:
            pass  # QEMU may have taken it: the job's events tell
        except CommandError:
            if self.progress().status in _RUNNING:  # refused; else it ended: its outcome says why
                raise
        self.wait(timeout)

    @property
    def finished(self) -> bool:
        """Whether the job has ended and been dismissed."""
        return self._finished

    def cancel(self, timeout: float = 60.0) -> None:
        """Stop the job; the source stays as it was. A READY mirror ends in sync, without pivoting
        (block-job-cancel without force; job-cancel would abandon in-flight writes)."""
        if self._finished:
            return
        try:
            self.qmp.execute("block-job-cancel", {"device": self.id})
        except CommandTimeout:
            pass  # QEMU may have taken it: the job's events tell
        except CommandError:
            if self.progress().status in _RUNNING:  # refused, not just ended meanwhile
                raise
            self.wait(timeout)  # it ended by itself: its own outcome stands
            return
        self._wait_for({"concluded", "null"}, timeout)
        self._conclude(cancelled=True)

    def wait(self, timeout: float) -> None:
        """Wait for the job to conclude; ``BlockJobError`` with QEMU's message if it failed."""
        if self._finished:
            return
        self._wait_for({"concluded", "null"}, timeout)
        self._conclude(cancelled=False)

    def _wait_for(self, statuses: set[str], timeout: float) -> None:
        ended = {"concluded", "null"}  # before reaching what we wanted: _conclude reports why
        if self.status in statuses | ended:
            return
        for event in events_until(self._events, timeout):
            self.status = str(event.data["status"])
            if self.status in statuses | ended:
                return
        self.status = self.progress().status  # an event may be late: ask once more
        if self.status not in statuses | ended:
            raise WaitTimeout(f"block job {self.id} is still {self.status} after {timeout:g}s")

    def _conclude(self, *, cancelled: bool) -> None:
        """Read the outcome, dismiss the job, run the follow-ups; raise if it failed."""
        if self._outcome is None:  # read once: after a dismissal, QEMU no longer has it
            self._outcome = (self.progress().error,)
        (error,) = self._outcome
        try:
            self.qmp.execute("job-dismiss", {"id": self.id})
        except (CommandError, CommandTimeout):  # gone already, or not dismissed: then once more
            if any(job.id == self.id for job in query_jobs(self.qmp)):
                self.qmp.execute("job-dismiss", {"id": self.id})
        self._finished = True
        self._events.close()
        if error or cancelled:
            self._follow_up(self._on_failure)
            self._log.info("blockjob.ended", error=error, cancelled=cancelled)
            if error and not (cancelled and "cancel" in error.lower()):
                raise BlockJobError(f"block job {self.id} failed", job_id=self.id, qemu_error=error)
            return
        self._follow_up(self._on_success)
        self._log.info("blockjob.completed")

    def _follow_up(self, actions: list[Callable[[], Any]]) -> None:
        """Run every follow-up even when one fails: the inventory must learn the job's outcome
        even if the cleanup of the nodes it left fails. The first failure is raised after."""
        failures: list[VmctlError] = []
        with self._follow_up_lock:
            for action in actions:
                try:
                    action()
                except VmctlError as exc:
                    self._log.error("blockjob.follow_up_failed", error=str(exc))
                    failures.append(exc)
        if failures:
            raise failures[0]
