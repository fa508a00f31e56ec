"""A migration whose control plane died, settled on the fake, side by side."""

from __future__ import annotations

from typing import Any

import pytest

from vmctl.model import Inventory
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeQEMU
from vmctl.vm import journal
from vmctl.vm.journal import Intent


class Side:
    """One QEMU's migration state: ``migrate_cancel`` ends one before postcopy, as QEMU does,
    and a source whose own migration completed is in the "postmigrate" run state."""

    def __init__(
        self, fake: FakeQEMU, status: str, *, cancel_too_late: bool = False, migrated_away: bool = True
    ) -> None:
        self.status = status
        fake.running = False
        fake.on("query-migrate", lambda call: {"status": self.status} if self.status != "none" else {})
        fake.on("migrate_cancel", self.cancel)
        fake.on("query-status", self.query_status)
        self.fake = fake
        self.cancel_too_late = cancel_too_late
        self.migrated_away = migrated_away

    def query_status(self, call: FakeCall) -> Any:
        if self.migrated_away and self.status == "completed":
            return {"status": "postmigrate", "running": False}
        return {"status": "running" if self.fake.running else "paused", "running": self.fake.running}

    def cancel(self, call: FakeCall) -> Any:
        self.status = "completed" if self.cancel_too_late else "cancelled"
        self.fake.emit_event("MIGRATION", {"status": self.status})
        return {}


SOURCE = Intent(operation="migrate", peer="/run/vms/dst")
TARGET = Intent(operation="incoming", peer="/run/vms/src")


@pytest.mark.parametrize("status", ["setup", "active", "pre-switchover", "device"])
def test_a_source_cancels_a_migration_nobody_follows(monitor: Monitor, fake: FakeQEMU, status: str) -> None:
    side = Side(fake, status)
    settled = journal.settle(monitor, SOURCE, Inventory())
    assert side.status == "cancelled" and settled.leftovers == ()


def test_a_source_whose_cancel_came_too_late_is_left_to_quit(monitor: Monitor, fake: FakeQEMU) -> None:
    Side(fake, "device", cancel_too_late=True)
    settled = journal.settle(monitor, SOURCE, Inventory())
    assert settled.leftovers == ("migrated: the guest runs on /run/vms/dst; quit this QEMU",)


def test_a_source_that_had_migrated_in_keeps_the_guest_its_incoming_migration_completed(
    monitor: Monitor, fake: FakeQEMU
) -> None:
    """query-migrate shows the incoming migration a QEMU was started for as completed until its
    own outgoing one begins: killed before that, the control plane left the guest here."""
    side = Side(fake, "completed", migrated_away=False)
    fake.running = True
    assert journal.settle(monitor, SOURCE, Inventory()).leftovers == ()
    assert not fake.calls_of("migrate_cancel") and side.status == "completed"


@pytest.mark.parametrize("status", ["none", "failed", "cancelled"])
def test_a_source_whose_migration_ended_keeps_the_guest_and_sends_nothing(
    monitor: Monitor, fake: FakeQEMU, status: str
) -> None:
    Side(fake, status)
    assert journal.settle(monitor, SOURCE, Inventory()).leftovers == ()
    assert not fake.calls_of("migrate_cancel")


def test_a_source_in_postcopy_is_left_to_finish(monitor: Monitor, fake: FakeQEMU) -> None:
    Side(fake, "postcopy-active")
    assert journal.settle(monitor, SOURCE, Inventory()).leftovers == ("migration in postcopy-active to /run/vms/dst",)
    assert not fake.calls_of("migrate_cancel")  # postcopy cannot be cancelled: the guest is split


def test_a_target_with_the_whole_guest_resumes_it(monitor: Monitor, fake: FakeQEMU) -> None:
    Side(fake, "completed", migrated_away=False)
    assert journal.settle(monitor, TARGET, Inventory()).leftovers == ()
    assert fake.running and len(fake.calls_of("cont")) == 1


def test_a_target_told_not_to_resume_stays_paused(monitor: Monitor, fake: FakeQEMU) -> None:
    Side(fake, "completed", migrated_away=False)
    journal.settle(monitor, Intent(operation="incoming", peer="/run/vms/src", resume=False), Inventory())
    assert not fake.running and not fake.calls_of("cont")


def test_a_target_still_receiving_is_the_sources_to_end(monitor: Monitor, fake: FakeQEMU) -> None:
    Side(fake, "active")
    assert journal.settle(monitor, TARGET, Inventory()).leftovers == ("incoming migration active from /run/vms/src",)
    assert not fake.calls_of("cont")


def test_a_migration_intent_survives_the_state_file() -> None:
    assert Intent.from_dict(TARGET.to_dict()) == TARGET and TARGET.device_id == journal.MIGRATION
