"""The pure parts of vmctl.libvirt.migration, and a LibvirtMigration on a fake domain: bad input is
refused before libvirt is asked anything, waits are bounded, libvirt's figures are mapped."""

from __future__ import annotations

import threading
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from vmctl.errors import InvalidArgument, WaitTimeout
from vmctl.libvirt import LibvirtMigrationError
from vmctl.libvirt.domainxml import domain_xml
from vmctl.libvirt.migration import (
    MIB,
    LibvirtMigration,
    bandwidth_mib,
    check_downtime_limit,
    migration_flags,
    progress_from_stats,
    result_from_stats,
    retarget_xml,
    start_migration,
)
from vmctl.model import DiskSpec, MigrationKeywords, MigrationRequest, VMSpec

libvirt = pytest.importorskip("libvirt")

#: What libvirt 9.0's jobStats said of a precopy migration under way, and of the completed one.
ACTIVE = {
    "type": 2, "operation": 5, "time_elapsed": 715, "downtime": 300, "setup_time": 2,
    "memory_total": 268967936, "memory_processed": 108591, "memory_remaining": 268009472,
    "memory_bps": 1048576, "memory_dirty_rate": 25, "memory_page_size": 4096, "memory_iteration": 2,
    "auto_converge_throttle": 20, "compression_pages": 7,
}  # fmt: skip
COMPLETED = {
    "type": 3, "operation": 4, "time_elapsed": 677, "downtime": 46, "setup_time": 2,
    "memory_total": 268967936, "memory_processed": 107957899, "memory_remaining": 0,
}  # fmt: skip


def test_bandwidth_goes_to_libvirt_in_whole_mib_per_second_rounded_up() -> None:
    assert bandwidth_mib(None) is None
    assert [bandwidth_mib(b) for b in (1, MIB, MIB + 1, 100 * MIB)] == [1, 1, 2, 100]


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "1M"])
def test_a_bandwidth_that_is_not_a_positive_whole_number_of_bytes_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="bandwidth"):
        bandwidth_mib(bad)


@pytest.mark.parametrize("bad", [0, -5, False, 2.0, 2_000_001])
def test_a_downtime_limit_outside_qemus_range_is_refused(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match="downtime_limit"):
        check_downtime_limit(bad)


def test_flags_are_live_peer_to_peer_plus_what_the_options_ask() -> None:
    base = libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_LIVE
    options = {"postcopy": False, "copy_storage": False, "persistent": False, "unsafe": False}
    assert migration_flags(libvirt, **options) == base
    persist = libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    assert migration_flags(libvirt, **(options | {"persistent": True})) == base | persist
    assert migration_flags(libvirt, **(options | {"postcopy": True})) == base | libvirt.VIR_MIGRATE_POSTCOPY
    assert migration_flags(libvirt, **(options | {"copy_storage": True})) == base | libvirt.VIR_MIGRATE_NON_SHARED_DISK
    assert migration_flags(libvirt, **(options | {"unsafe": True})) == base | libvirt.VIR_MIGRATE_UNSAFE


def spec_xml(run_dir: Path) -> str:
    spec = VMSpec(
        name="m", kernel="/k", initrd="/i", shell_serial=True,
        disks=[DiskSpec(id="data", path=run_dir / "data.qcow2"), DiskSpec(id="other", path="/images/other.qcow2")],
    )  # fmt: skip
    return domain_xml(spec, run_dir=run_dir, emulator="/usr/bin/qemu-system-x86_64")


def sources(xml: str) -> list[str]:
    return [s.get("path") or s.get("file") or "" for s in ET.fromstring(xml).iter("source")]


def test_retarget_moves_the_console_log_and_shell_socket_into_the_target_run_dir_but_not_the_disks() -> None:
    xml = retarget_xml(spec_xml(Path("/run/a")), run_dir=Path("/run/a"), target_run_dir=Path("/run/b"))
    # A disk image in the run dir is the same image on the target (shared storage): it stays.
    assert sources(xml) == [
        "/run/a/data.qcow2", "/images/other.qcow2", "/run/b/console.log", "/run/b/console.log", "/run/b/shell.sock",
    ]  # fmt: skip


def test_retarget_gives_the_named_disks_their_target_images_and_drops_their_backing_chains() -> None:
    domain = ET.fromstring(spec_xml(Path("/run/a")))
    disk = domain.find("devices/disk")
    assert disk is not None
    ET.SubElement(disk, "backingStore", type="file")
    xml = retarget_xml(ET.tostring(domain, encoding="unicode"), disks={"data": Path("/b/data.qcow2")})
    assert sources(xml)[:2] == ["/b/data.qcow2", "/images/other.qcow2"]
    assert ET.fromstring(xml).find("devices/disk/backingStore") is None


def test_retarget_refuses_a_disk_the_domain_does_not_have() -> None:
    with pytest.raises(InvalidArgument, match="no disk nope"):
        retarget_xml(spec_xml(Path("/run/a")), disks={"nope": Path("/b/x.qcow2")})


def test_job_stats_map_to_progress_and_result() -> None:
    progress = progress_from_stats(ACTIVE, status="active")
    assert (progress.transferred, progress.remaining, progress.total) == (108591, 268009472, 268967936)
    assert (progress.total_time_ms, progress.passes, progress.expected_downtime_ms) == (715, 2, 300)
    assert (progress.dirty_rate, progress.bandwidth, progress.mbps) == (25 * 4096, MIB, MIB * 8 / 1e6)
    assert (progress.throttle_percent, progress.compressed_pages) == (20, 7)
    result = result_from_stats(COMPLETED, postcopy=True)
    assert (result.status, result.total_time_ms, result.downtime_ms, result.setup_time_ms) == ("completed", 677, 46, 2)
    assert result.transferred == 107957899 and result.postcopy


class FakeDomain:
    """A libvirt domain that records every call; its migration runs until ``finish`` is set."""

    def __init__(self, *, fail: str | None = None) -> None:
        self.calls: list[str] = []
        self.finish = threading.Event()
        self.fail = fail
        self.callbacks: list[Any] = []

    def connect(self) -> FakeDomain:
        return self

    def domainEventRegisterAny(self, domain: Any, event: int, callback: Any, opaque: Any) -> int:
        self.callbacks.append(callback)
        return 1

    def domainEventDeregisterAny(self, callback: int) -> None:
        self.calls.append("deregister")

    def isActive(self) -> int:
        self.calls.append("isActive")
        return 1

    def XMLDesc(self, flags: int) -> str:
        self.calls.append("XMLDesc")
        return spec_xml(Path("/run/a"))

    def migrateSetMaxDowntime(self, downtime: int, flags: int) -> None:
        self.calls.append(f"migrateSetMaxDowntime {downtime}")

    def migrateToURI3(self, uri: str, params: dict[str, Any], flags: int) -> None:
        self.calls.append(f"migrateToURI3 {sorted(params)} {flags}")
        assert self.finish.wait(10)
        if self.fail is not None:
            raise libvirt.libvirtError(self.fail)
        for callback in self.callbacks:
            callback(self, self, dict(COMPLETED), None)

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        return dict(ACTIVE)

    def abortJob(self) -> None:
        self.calls.append("abortJob")
        self.finish.set()

    def migrateStartPostCopy(self, flags: int) -> None:
        self.calls.append("migrateStartPostCopy")


class FakeVM:
    def __init__(self, domain: FakeDomain, run_dir: Path | None = Path("/run/a")) -> None:
        self.name = "m"
        self.domain = domain
        self._run_dir = run_dir

    @property
    def known_run_dir(self) -> Path | None:
        return self._run_dir

    def reopened(self, uri: str, run_dir: Path | None) -> str:
        return f"{self.name} at {uri} in {run_dir}"


def migrate(domain: FakeDomain, run_dir: Path | None = Path("/run/a"), **options: Any) -> LibvirtMigration[str]:
    request = {name: options.pop(name) for name in MigrationKeywords.__annotations__ if name in options}
    uri = options.pop("uri", "qemu+tcp://b/system")
    return start_migration(FakeVM(domain, run_dir), uri, MigrationRequest.of(**request), **options)


@pytest.mark.parametrize(
    "options",
    [
        {"uri": "b"},
        {"uri": None},
        {"bandwidth": -1},
        {"bandwidth": True},
        {"downtime_limit": 0},
        {"postcopy": 1},
        {"persistent": "yes"},
        {"postcopy": True, "copy_storage": True},
        {"target_disks": {"data": "/b/data.qcow2"}},
        {"copy_storage": True, "target_disks": {"nope": "/b/x.qcow2"}},
        {"timeout": 0},
        {"target_run_dir": "/run/b", "run_dir": None},
    ],
)
def test_bad_input_is_refused_before_libvirt_is_asked_to_change_anything(options: dict[str, Any]) -> None:
    domain = FakeDomain()
    run_dir = options.pop("run_dir", Path("/run/a"))
    with pytest.raises(InvalidArgument):
        migrate(domain, run_dir, **options)
    assert not [call for call in domain.calls if call != "XMLDesc"], domain.calls


def test_start_postcopy_without_postcopy_is_refused_before_anything_is_sent() -> None:
    domain = FakeDomain()
    migration = migrate(domain)
    with pytest.raises(InvalidArgument, match="postcopy=True"):
        migration.start_postcopy()
    domain.finish.set()
    migration.wait(5)
    assert "migrateStartPostCopy" not in domain.calls


def test_wait_is_bounded_and_returns_the_completed_jobs_figures() -> None:
    domain = FakeDomain()
    migration = migrate(domain, bandwidth=3 * MIB + 1, downtime_limit=500, target_run_dir="/run/b")
    seen: list[str] = []
    with pytest.raises(WaitTimeout):
        migration.wait(0.3, on_progress=lambda p: seen.append(p.status), progress_interval=0.05)
    assert seen and set(seen) == {"active"} and migration.status == "active"
    domain.finish.set()
    result = migration.wait(5)
    assert (result.status, result.downtime_ms, result.transferred) == ("completed", 46, 107957899)
    assert migration.wait(1) is result and migration.status == "completed"
    flags = migration_flags(libvirt, postcopy=False, copy_storage=False, persistent=True, unsafe=False)
    assert "migrateSetMaxDowntime 500" in domain.calls
    assert f"migrateToURI3 ['bandwidth', 'destination_xml', 'persistent_xml'] {flags}" in domain.calls


def test_a_failed_migration_raises_libvirts_message_and_a_cancelled_one_says_so() -> None:
    failing = FakeDomain(fail="unsafe migration")
    failing.finish.set()
    with pytest.raises(LibvirtMigrationError, match="unsafe migration") as failure:
        migrate(failing).wait(5)
    assert failure.value.status == "failed"
    cancelled = FakeDomain(fail="operation aborted")
    migration = migrate(cancelled)
    migration.cancel(timeout=5)
    assert migration.status == "cancelled" and "abortJob" in cancelled.calls
    with pytest.raises(LibvirtMigrationError) as failure:
        migration.wait(1)
    assert failure.value.status == "cancelled"


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"finish_within": 30}, "policy"),
        ({"multifd_channels": 2}, "multifd_channels"),
        ({"listen": ("10.0.0.2", 4444), "stop_source": False}, "listen, stop_source"),
    ],
)
def test_what_libvirt_cannot_do_of_a_request_is_refused_by_name_before_libvirt_is_asked(
    options: dict[str, Any], refused: str
) -> None:
    domain = FakeDomain()
    with pytest.raises(InvalidArgument, match=f"does not take {refused}$"):
        migrate(domain, **options)
    assert domain.calls == []
