"""The convergence policy acting on its own, on the fake: from the source's MIGRATION_PASS events
and its deadline, while nobody is inside ``wait()``; and not after the migration has ended."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vmctl.logs import get_logger
from vmctl.model.migration import ConvergencePolicy, Step
from vmctl.ops.convergence import Convergence, Plan
from vmctl.ops.convergence_driver import ConvergenceDriver
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeQEMU

MiB = 1 << 20
RAM = 256 * MiB
BW = 16 * MiB  # bytes per second: a pass of 16 MiB needs 1000 ms of downtime
#: The policy may only raise the downtime limit, up to 2000 ms.
DOWNTIME_ONLY = Plan(throttle=False, postcopy=False, skipped=())


class Source:
    """A source QEMU's migration: ``query-migrate`` tells the pass it is on; a guest rewriting
    16 MiB as fast as the link carries it, so that the memory left never shrinks."""

    def __init__(self, fake: FakeQEMU) -> None:
        self.fake = fake
        self.passes = 1
        self.status = "active"
        fake.on("query-migrate", self.query)
        fake.on("migrate-set-parameters", returns={})
        fake.on("migrate_cancel", self.cancel)

    def query(self, call: FakeCall) -> Any:
        left = RAM if self.passes == 1 else 16 * MiB
        ram = {
            "transferred": RAM + (self.passes - 1) * 16 * MiB,
            "remaining": left,
            "total": RAM,
            "dirty-pages-rate": BW // 4096,
            "page-size": 4096,
            "mbps": BW * 8 / 1e6,
            "dirty-sync-count": self.passes,
        }
        return {"status": self.status, "total-time": 1000, "ram": ram}

    def cancel(self, call: FakeCall) -> Any:
        self.status = "cancelled"
        self.fake.emit_event("MIGRATION", {"status": "cancelled"})
        return {}

    def next_pass(self) -> None:
        self.passes += 1
        self.fake.emit_event("MIGRATION_PASS", {"pass": self.passes})


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time given"
        time.sleep(0.01)


def callbacks_caught_up(monitor: Monitor, fake: FakeQEMU) -> None:
    """Return once every event emitted so far has been through the callback thread (it runs
    them in order, so a marker event's callback comes after theirs)."""
    seen = threading.Event()
    remove = monitor.on_event(lambda event: seen.set(), "VMCTL_TEST_MARK")
    fake.emit_event("VMCTL_TEST_MARK")
    try:
        assert seen.wait(5)
    finally:
        remove()


@pytest.fixture
def driving(monitor: Monitor) -> Iterator[Callable[..., ConvergenceDriver]]:
    drivers: list[ConvergenceDriver] = []

    def start(**policy: Any) -> ConvergenceDriver:
        convergence = Convergence(
            ConvergencePolicy(**{"finish_within": 60.0, "allow_throttle": False, "allow_compression": False, **policy}),
            DOWNTIME_ONLY,
            started=time.monotonic(),
            downtime_limit_ms=300,
        )
        driver = ConvergenceDriver(monitor, convergence, get_logger("test"))
        driver.start()
        drivers.append(driver)
        return driver

    yield start
    for driver in drivers:
        driver.stop()


def test_a_pass_start_raises_the_downtime_limit_while_nobody_waits(
    monitor: Monitor, fake: FakeQEMU, driving: Callable[..., ConvergenceDriver]
) -> None:
    source = Source(fake)
    driver = driving(max_downtime_ms=2000)
    source.next_pass()  # pass 2: 16 MiB left at 16 MiB/s needs 1000 ms, the limit is 300
    eventually(lambda: bool(fake.calls_of("migrate-set-parameters")))
    assert [call.arguments for call in fake.calls_of("migrate-set-parameters")] == [{"downtime-limit": 1500}]
    assert [e.step for e in driver.escalations] == [Step.DOWNTIME]
    assert driver.escalations[0].needed_downtime_ms == 1000


def test_at_finish_within_a_migration_nobody_waits_on_is_cancelled_with_the_figures(
    monitor: Monitor, fake: FakeQEMU, driving: Callable[..., ConvergenceDriver]
) -> None:
    source = Source(fake)
    started = time.monotonic()
    driver = driving(finish_within=0.5, max_downtime_ms=300)
    eventually(lambda: bool(fake.calls_of("migrate_cancel")))
    assert time.monotonic() - started >= 0.5
    assert source.status == "cancelled" and driver.gave_up is not None
    assert "did not finish within 0.5s" in driver.gave_up and driver.escalations == ()


def test_once_the_migration_has_ended_its_passes_and_deadline_are_no_longer_acted_on(
    monitor: Monitor, fake: FakeQEMU, driving: Callable[..., ConvergenceDriver]
) -> None:
    source = Source(fake)
    driving(finish_within=0.5, max_downtime_ms=2000)
    fake.emit_event("MIGRATION", {"status": "completed"})
    callbacks_caught_up(monitor, fake)
    source.next_pass()
    time.sleep(0.7)  # past the deadline too
    callbacks_caught_up(monitor, fake)
    assert fake.calls_of("query-migrate") == [] and fake.calls_of("migrate_cancel") == []
    assert fake.calls_of("migrate-set-parameters") == []
