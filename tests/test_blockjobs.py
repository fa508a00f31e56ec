"""The block job layer on the fake: event-driven waits, always dismissed, errors surfaced."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from vmctl.errors import BlockJobError, GenericError, WaitTimeout
from vmctl.ops.blockjobs import Job
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeCommandError, FakeQEMU
from vmctl.testing.faults import Fault, inject

log = structlog.get_logger("test")


class Jobs:
    """A scripted QEMU job: walks through states, optionally failing, until dismissed."""

    def __init__(self, fake: FakeQEMU, *, states: list[str], error: str | None = None) -> None:
        self.fake = fake
        self.states = states
        self.error = error
        self.status = "created"
        self.dismissed = False
        self.started_with: dict[str, Any] = {}
        fake.on("blockdev-mirror", self.start)
        fake.on("query-jobs", self.query)
        fake.on("job-dismiss", self.dismiss)
        fake.on("job-complete", self.complete)
        fake.on("block-job-cancel", self.cancel)

    def emit(self, status: str) -> None:
        self.status = status
        self.fake.emit_event("JOB_STATUS_CHANGE", {"id": "j1", "status": status})

    def start(self, call: FakeCall) -> Any:
        self.started_with = dict(call.arguments)
        for status in self.states:
            self.emit(status)
        return {}

    def query(self, call: FakeCall) -> Any:
        if self.dismissed:
            return []
        info: dict[str, Any] = {"id": "j1", "type": "mirror", "status": self.status,
                                "current-progress": 5, "total-progress": 10}  # fmt: skip
        if self.error and self.status == "concluded":
            info["error"] = self.error
        return [info]

    def dismiss(self, call: FakeCall) -> Any:
        self.dismissed = True
        self.emit("null")
        return {}

    def complete(self, call: FakeCall) -> Any:
        for status in ("waiting", "pending", "concluded"):
            self.emit(status)
        return {}

    def cancel(self, call: FakeCall) -> Any:
        for status in ("aborting", "concluded"):
            self.emit(status)
        return {}


def start(monitor: Monitor) -> Job:
    return Job.start(monitor, log, "blockdev-mirror", {"job-id": "j1", "device": "d", "target": "t"}, job_type="mirror")


def test_ready_complete_and_dismiss(monitor: Monitor, fake: FakeQEMU) -> None:
    jobs = Jobs(fake, states=["running", "ready"])
    job = start(monitor)
    assert jobs.started_with["auto-dismiss"] is False  # vmctl always dismisses itself
    done: list[str] = []
    job.on_success(lambda: done.append("success"))
    job.wait_ready(5)
    assert job.progress().current == 5
    job.complete(5)
    assert jobs.dismissed and done == ["success"]


def test_a_failed_job_raises_with_qemus_message_and_is_dismissed(monitor: Monitor, fake: FakeQEMU) -> None:
    jobs = Jobs(fake, states=["running", "aborting", "concluded"], error="No space left on device")
    job = start(monitor)
    cleaned: list[str] = []
    job.on_failure(lambda: cleaned.append("target dropped"))
    with pytest.raises(BlockJobError, match="No space left on device") as info:
        job.wait_ready(5)
    assert info.value.job_id == "j1"
    assert jobs.dismissed and cleaned == ["target dropped"]


def test_cancel_runs_the_failure_follow_ups(monitor: Monitor, fake: FakeQEMU) -> None:
    jobs = Jobs(fake, states=["running", "ready"])
    job = start(monitor)
    cleaned: list[str] = []
    job.on_failure(lambda: cleaned.append("target dropped"))
    job.wait_ready(5)
    job.cancel()
    assert jobs.dismissed and cleaned == ["target dropped"]
    job.cancel()  # idempotent


def test_a_job_that_never_gets_ready_times_out(monitor: Monitor, fake: FakeQEMU) -> None:
    Jobs(fake, states=["running"])
    job = start(monitor)
    with pytest.raises(WaitTimeout, match="still running"):
        job.wait_ready(0.2)


def test_a_cancel_refused_because_the_job_just_succeeded_runs_the_success_follow_ups(
    monitor: Monitor, fake: FakeQEMU
) -> None:
    jobs = Jobs(fake, states=["running", "concluded"])  # ends by itself, as a stream or commit does

    def refused(call: FakeCall) -> Any:
        raise FakeCommandError("GenericError", "Job 'j1' in state 'concluded' cannot accept command verb 'cancel'")

    fake.on("block-job-cancel", refused)
    job = start(monitor)
    done: list[str] = []
    job.on_success(lambda: done.append("success"))
    job.on_failure(lambda: done.append("failure"))
    job.cancel(5)
    assert done == ["success"] and jobs.dismissed


def test_a_failed_jobs_outcome_survives_a_dismissal_whose_reply_was_late(monitor: Monitor, fake: FakeQEMU) -> None:
    jobs = Jobs(fake, states=["running", "concluded"], error="Input/output error")
    job = start(monitor)
    done: list[str] = []
    job.on_success(lambda: done.append("success"))
    job.on_failure(lambda: done.append("failure"))
    # The outcome is read (1), the dismissal's reply is late (2), and asking whether the job is
    # still there fails twice (3, 4): the call fails, though QEMU dismissed the job.
    with (
        inject(monitor, Fault.TIMEOUT, at=2),
        inject(monitor, Fault.ERROR, at=3),
        inject(monitor, Fault.ERROR, at=4),
        pytest.raises(GenericError),
    ):
        job.wait(5)
    assert jobs.dismissed and not job.finished
    with pytest.raises(BlockJobError, match="Input/output error"):  # asked again: QEMU has no job now
        job.wait(5)
    assert done == ["failure"]


def test_a_job_left_by_a_with_block_is_cancelled(monitor: Monitor, fake: FakeQEMU) -> None:
    jobs = Jobs(fake, states=["running", "ready"])
    cleaned: list[str] = []
    with start(monitor) as job:
        job.on_failure(lambda: cleaned.append("target dropped"))
        job.wait_ready(5)
    assert job.finished and jobs.dismissed and cleaned == ["target dropped"]
