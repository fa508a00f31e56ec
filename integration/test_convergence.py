"""Migrations that finish: a guest dirtying memory as fast as the link carries it never converges
by itself; the convergence policy (``migrate(finish_within=...)``) takes it across, or gives up
in time and leaves the source running. Every test checks the guest after the move."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.conftest import TwoHosts, VMFactory
from integration.versions import CONVERGENCE
from vmctl import VM, RunState
from vmctl.errors import InvalidArgument, MigrationError, WaitTimeout
from vmctl.model import Escalation, MigrationProgress, Step
from vmctl.ops.live_migration import Migration
from vmctl.testing import GuestShell
from vmctl.testing.workload import MemoryDirtier, panic_lines

pytestmark = pytest.mark.versioned(CONVERGENCE)

MIB = 1024 * 1024
#: The link: the guest rewrites 16 MiB (one copy of its file) many times a second, and a
#: pass of 16 MiB at 16 MiB/s needs about a second of downtime, past QEMU's default 300 ms.
LINK = 16 * MIB


def busy(vms: VMFactory, name: str = "busy", *, in_place: bool = False, **launch: object) -> tuple[VM, MemoryDirtier]:
    source = vms.launch(vms.spec(name), **launch)  # type: ignore[arg-type]
    with GuestShell(source) as shell:
        return source, MemoryDirtier.start(shell, size_mib=16, in_place=in_place)


def steps(escalations: tuple[Escalation, ...]) -> list[Step]:
    return [e.step for e in escalations]


def compression_is_safe(vm: VM) -> bool:
    return vm.qmp.version.major >= 10  # the suite runs TCG: 7.2's XBZRLE breaks a guest rewriting in place


def taken(vm: VM, *later: Step) -> list[Step]:
    """The steps a policy takes: compression from the start where it is safe, then ``later``."""
    return ([Step.COMPRESSION] if compression_is_safe(vm) else []) + list(later)


def assert_intact(vm: VM, dirtier: MemoryDirtier) -> None:
    """The guest runs here, its shell answers, the data it was rewriting is whole, no panic."""
    assert vm.status().run_state is RunState.RUNNING
    with GuestShell(vm) as shell:
        assert dirtier.stop_and_check(shell) > 0
    assert panic_lines(vm.console.history) == []


def assert_cancelled_at_15s(
    source: VM, target: VM, dirtier: MemoryDirtier, reason: str, *, allow_compression: bool = True
) -> None:
    """A policy without throttle cancels at 15 s naming ``reason``, having taken no step, and the
    guest runs on the source with its data."""
    migration = source.migrate(
        target, bandwidth=LINK, finish_within=15, allow_throttle=False, allow_compression=allow_compression
    )
    with pytest.raises(MigrationError, match="did not finish within 15s") as failure:
        migration.wait(60)
    assert reason in str(failure.value) and migration.escalations == ()
    assert_intact(source, dirtier)


def throttle_is_safe(vm: VM) -> bool:
    return vm.qmp.version.major >= 10  # the suite runs TCG: 7.2's throttle corrupts the guest


def wait_for_escalation(migration: Migration, step: Step, *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while step not in [e.step for e in migration.escalations]:
        assert time.monotonic() < deadline, f"no {step.value} escalation within {timeout:g}s"
        with contextlib.suppress(WaitTimeout):
            migration.wait(0.5)


def follow_until_pass(source: VM, migration: Migration, passes: int, *, timeout: float = 60.0) -> None:
    """Follow the migration (its policy deciding as passes begin) until QEMU is on pass ``passes``."""
    deadline = time.monotonic() + timeout
    while source.qmp.execute("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < passes:
        assert time.monotonic() < deadline, f"not at pass {passes} within {timeout:g}s"
        with contextlib.suppress(WaitTimeout):
            migration.wait(0.5)


def test_a_busy_guest_finishes_with_the_longer_downtime_it_needs_and_its_data_intact(vms: VMFactory) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    started = time.monotonic()
    result = source.migrate(target, bandwidth=LINK, finish_within=60, max_downtime_ms=2500, allow_throttle=False).wait(
        90
    )
    assert result.status == "completed" and time.monotonic() - started < 60
    assert steps(result.escalations) == taken(source, Step.DOWNTIME)  # compression cannot help this guest
    escalation = result.escalations[-1]
    assert escalation.needed_downtime_ms > 300  # QEMU's default limit would never have let it end
    assert escalation.remaining > 8 * MIB and 8 * MIB < escalation.bandwidth < 24 * MIB
    assert result.downtime_ms <= 2500
    assert_intact(target, dirtier)
    assert source.has_exited


def poll_progress(migration: Migration, until: Callable[[MigrationProgress], bool], *, timeout: float) -> None:
    """What a control plane that never waits does: look at ``progress()`` now and then."""
    deadline = time.monotonic() + timeout
    while not until(migration.progress()):
        assert time.monotonic() < deadline, f"not within {timeout:g}s of polling progress()"
        time.sleep(0.5)


def test_a_control_plane_that_only_polls_progress_gets_the_longer_downtime_the_busy_guest_needs(
    vms: VMFactory,
) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    migration = source.migrate(target, bandwidth=LINK, finish_within=60, max_downtime_ms=2500, allow_throttle=False)
    poll_progress(migration, lambda _: Step.DOWNTIME in steps(migration.escalations), timeout=60)
    assert source.qmp.execute("query-migrate-parameters")["downtime-limit"] > 300  # set, with nobody in wait()
    result = migration.wait(90)  # now the hand-over: the target takes the guest, the source quits
    assert result.status == "completed" and steps(result.escalations) == taken(source, Step.DOWNTIME)
    assert_intact(target, dirtier)


def test_a_control_plane_that_only_polls_progress_sees_the_policy_cancel_at_the_deadline(vms: VMFactory) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    started = time.monotonic()
    migration = source.migrate(target, bandwidth=LINK, finish_within=15, allow_throttle=False, allow_compression=False)
    poll_progress(migration, lambda progress: progress.status == "cancelled", timeout=25)
    assert time.monotonic() - started >= 15
    with pytest.raises(MigrationError, match="did not finish within 15s") as failure:
        migration.wait(30)
    assert failure.value.status == "cancelled" and migration.escalations == ()
    assert_intact(source, dirtier)


def test_throttling_carries_a_busy_guest_where_it_is_safe_and_is_refused_on_qemu_7_2_under_tcg(
    vms: VMFactory,
) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    migration = source.migrate(target, bandwidth=LINK, finish_within=60 if throttle_is_safe(source) else 20)
    if throttle_is_safe(source):
        result = migration.wait(90)
        assert steps(result.escalations) == taken(source, Step.THROTTLE)
        assert result.downtime_ms <= 300
        assert_intact(target, dirtier)
        return
    with pytest.raises(MigrationError, match="corrupts a busy guest") as failure:
        migration.wait(90)
    assert failure.value.status == "cancelled" and steps(migration.escalations) == taken(source)
    assert source.qmp.execute("query-migrate").get("cpu-throttle-percentage", 0) == 0
    assert_intact(source, dirtier)


def test_a_policy_with_no_step_left_cancels_at_the_deadline_naming_the_figures_and_the_source_runs_on(
    vms: VMFactory,
) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    before = source.qmp.execute("query-migrate-parameters")
    started = time.monotonic()
    # No step left on any QEMU: without compression too (on from the start on 10.0, it carried
    # this guest across once two test workers slowed the guest's rewriting down).
    migration = source.migrate(target, bandwidth=LINK, finish_within=15, allow_throttle=False, allow_compression=False)
    with pytest.raises(MigrationError) as failure:
        migration.wait(60)
    assert 15 <= time.monotonic() - started < 25
    message = str(failure.value)
    assert failure.value.status == "cancelled"
    assert "did not finish within 15s" in message and "max_downtime_ms is 300" in message
    assert "MB/s" in message and "ms of downtime" in message and "postcopy: not allowed" in message
    after = source.qmp.execute("query-migrate-parameters")
    for name in ("downtime-limit", "max-bandwidth", "max-cpu-throttle", "cpu-throttle-initial", "xbzrle-cache-size"):
        assert after[name] == before[name]  # what the migration set is put back
    capabilities = {c["capability"]: c["state"] for c in source.qmp.execute("query-migrate-capabilities")}
    assert capabilities["auto-converge"] is False and capabilities["xbzrle"] is False
    assert_intact(source, dirtier)


def test_compression_carries_a_guest_rewriting_its_pages_in_place_where_safe_and_is_refused_on_qemu_7_2_under_tcg(
    vms: VMFactory,
) -> None:
    source, dirtier = busy(vms, in_place=True)
    target = vms.incoming(source)
    if not compression_is_safe(source):
        assert_cancelled_at_15s(source, target, dirtier, "XBZRLE's page deltas break")
        return
    migration = source.migrate(target, bandwidth=LINK, finish_within=60, allow_throttle=False, stop_source=False)
    result = migration.wait(90)
    assert steps(result.escalations) == [Step.COMPRESSION] and result.downtime_ms <= 300
    xbzrle = source.qmp.execute("query-migrate")["xbzrle-cache"]  # the source stayed to be asked
    assert xbzrle["cache-size"] == 64 * MIB and xbzrle["pages"] > 0  # pages went as their differences
    assert_intact(target, dirtier)


def test_without_compression_the_guest_rewriting_in_place_is_cancelled_at_the_deadline_and_runs_on(
    vms: VMFactory,
) -> None:
    source, dirtier = busy(vms, in_place=True)
    target = vms.incoming(source)
    assert_cancelled_at_15s(source, target, dirtier, "compression: not allowed", allow_compression=False)


def test_with_postcopy_allowed_a_busy_guest_moves_after_one_pass_with_its_data(vms: VMFactory) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    result = source.migrate(target, bandwidth=LINK, finish_within=60, allow_postcopy=True).wait(90)
    assert steps(result.escalations) == taken(source, Step.POSTCOPY)
    assert result.postcopy and result.total_time_ms < 15_000
    assert_intact(target, dirtier)


def test_the_target_runs_the_guest_while_postcopy_fetches_the_rest_and_postcopy_cannot_be_cancelled(
    vms: VMFactory,
) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    source.qmp.execute("migrate-set-parameters", {"max-postcopy-bandwidth": 4 * MIB})  # a long postcopy
    migration = source.migrate(target, postcopy=True, bandwidth=LINK)
    migration.wait_for_status("active", timeout=30)
    migration.start_postcopy()
    migration.wait_for_status("postcopy-active", timeout=30)
    with contextlib.suppress(WaitTimeout):
        migration.wait(0.5)  # follows it: the target gets the guest as postcopy begins
    assert target.qmp.execute("query-status")["status"] == "running"
    with GuestShell(target) as shell:
        assert shell.run("echo running on the target").output == "running on the target\n"
    assert source.qmp.execute("query-migrate")["status"] == "postcopy-active"  # still fetching
    with pytest.raises(InvalidArgument, match="cannot be cancelled"):
        migration.cancel()
    assert migration.wait(120).postcopy
    assert_intact(target, dirtier)


@pytest.mark.parametrize("step", [Step.DOWNTIME, Step.THROTTLE])
def test_a_cancel_during_an_escalation_leaves_the_source_running_with_its_data(vms: VMFactory, step: Step) -> None:
    source, dirtier = busy(vms)
    target = vms.incoming(source)
    if step is Step.DOWNTIME:  # the longer downtime ends it at once: held before the switch-over
        migration = source.migrate(
            target,
            bandwidth=LINK,
            finish_within=60,
            max_downtime_ms=2500,
            allow_throttle=False,
            pause_before_switchover=True,
        )
        wait_for_escalation(migration, Step.DOWNTIME)
        migration.wait_for_status("pre-switchover", timeout=30)
    elif throttle_is_safe(source):
        migration = source.migrate(target, bandwidth=LINK, finish_within=60)
        wait_for_escalation(migration, Step.THROTTLE)
    else:  # no throttle here: the cancel comes while the policy has no step left to take
        migration = source.migrate(target, bandwidth=LINK, finish_within=60)
        follow_until_pass(source, migration, 3)  # it decides from the second pass on: it has, and took none
        assert source.qmp.execute("query-migrate")["status"] == "active"
        assert steps(migration.escalations) == taken(source)
    migration.cancel()
    assert migration.status == "cancelled"
    assert source.qmp.execute("query-migrate").get("cpu-throttle-percentage", 0) == 0
    assert_intact(source, dirtier)


def test_the_policy_carries_a_busy_guest_over_tcp_between_two_hosts(vms: VMFactory, two_hosts: TwoHosts) -> None:
    source, dirtier = busy(vms, netns=two_hosts.a)
    target = vms.incoming(source, netns=two_hosts.b)
    migration = source.migrate(
        target, listen=(two_hosts.b_address, 4450), bandwidth=LINK, finish_within=60, max_downtime_ms=2500
    )
    result = migration.wait(90)
    assert migration.uri == f"tcp:{two_hosts.b_address}:4450"
    assert Step.DOWNTIME in steps(result.escalations)
    assert_intact(target, dirtier)


def test_policy_arguments_are_refused_before_anything_is_sent(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("args"), wait_ready=False)
    uri = f"unix:{tmp_path}/nobody-listens.sock"
    refused = [
        ({"allow_postcopy": True}, "need finish_within"),
        ({"max_downtime_ms": 500}, "need finish_within"),
        ({"allow_compression": False}, "need finish_within"),
        ({"finish_within": 0}, "finish_within must be a positive number"),
        ({"finish_within": 60, "max_downtime_ms": 0}, "max_downtime_ms must be a positive whole number"),
        ({"finish_within": 60, "auto_converge": True}, "give allow_throttle instead"),
        ({"finish_within": 60, "downtime_limit": 1000, "max_downtime_ms": 500}, "above max_downtime_ms 500"),
    ]
    for arguments, message in refused:
        with pytest.raises(InvalidArgument, match=message):
            vm.migrate(uri, **arguments)  # type: ignore[arg-type]
    assert vm.qmp.execute("query-migrate").get("status", "none") == "none"  # no migration was ever started
    capabilities = {c["capability"]: c["state"] for c in vm.qmp.execute("query-migrate-capabilities")}
    assert capabilities["auto-converge"] is False and capabilities["postcopy-ram"] is False
