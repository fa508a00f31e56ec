"""Live migration of the test guest: memory and disk data survive, failures leave the source running."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from integration.conftest import REPO, TwoHosts, VMFactory, make_image
from integration.versions import MIGRATION
from vmctl import VM, RunState
from vmctl.errors import AbnormalExit, InvalidArgument, MigrationError
from vmctl.model import MigrationProgress
from vmctl.ops import migration as migration_ops
from vmctl.qmp import Monitor
from vmctl.testing import GuestShell
from vmctl.testing.workload import panic_lines

pytestmark = pytest.mark.versioned(MIGRATION)

MIB = 1024 * 1024
SLOW = 4 * MIB  # bytes/s: a 256 MiB guest then needs about a minute, time enough to interfere


def write_pattern(vm: VM) -> None:
    """Random bytes in a tmpfs file (guest RAM) and their checksum."""
    with GuestShell(vm) as shell:
        shell.run("head -c 16000000 /dev/urandom > /tmp/pattern && sha256sum /tmp/pattern > /tmp/sum", check=True)


def pattern_intact(vm: VM) -> bool:
    """The pattern's checksum matches, the guest's shell answers, and its kernel never broke."""
    with GuestShell(vm) as shell:
        intact = shell.run("sha256sum -c /tmp/sum").output.strip() == "/tmp/pattern: OK"
    return intact and panic_lines(vm.console.history) == []


def test_precopy_keeps_memory_and_hotplugged_devices(vms: VMFactory, tmp_path: Path) -> None:
    source = vms.launch(vms.spec("src", cpus=1, max_cpus=2, memory_mib=256, max_memory_mib=768, memory_slots=2))
    image = tmp_path / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    source.hotplug_disk(image, id="data1")
    source.hotplug_memory(128, id="dimm1")
    source.hotplug_cpus(1)
    with GuestShell(source) as shell:
        assert shell.block_device("data1") == "vda"
        shell.run("echo before-migration | dd of=/dev/vda conv=sync,fsync 2>/dev/null", check=True)
    write_pattern(source)
    target = vms.incoming(source, "dst")
    result = source.migrate(target, downtime_limit=300).wait(120)
    assert result.status == "completed" and result.transferred > 0 and result.total_time_ms > 0
    assert source.has_exited and source.wait(1).code == 0  # quit after handing over, not a crash
    assert target.status().run_state is RunState.RUNNING
    assert pattern_intact(target)
    assert [d.id for d in target.disks()] == ["data1"]
    assert [m.id for m in target.inventory.memory] == ["dimm1"]
    with GuestShell(target) as shell:
        assert shell.run("dd if=/dev/vda bs=17 count=1 2>/dev/null").output == "before-migration\n"
        shell.run("echo after-migration | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null", check=True)
        assert "MemTotal" in shell.run("grep MemTotal /proc/meminfo").output
    target.unplug_disk("data1")
    assert target.qmp.execute("query-fdsets") == [] or all(
        fd.get("opaque") != "vmctl:disk:data1" for s in target.qmp.execute("query-fdsets") for fd in s["fds"]
    )


def test_precopy_over_tcp_between_two_hosts(vms: VMFactory, two_hosts: TwoHosts) -> None:
    source = vms.launch(vms.spec("src"), netns=two_hosts.a)
    write_pattern(source)
    target = vms.incoming(source, "dst", netns=two_hosts.b)
    migration = source.migrate(target, listen=(two_hosts.b_address, 4444))
    assert migration.uri == f"tcp:{two_hosts.b_address}:4444"
    migration.wait(120)
    assert pattern_intact(target)


def test_postcopy(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    write_pattern(source)
    target = vms.incoming(source, "dst")
    migration = source.migrate(target, postcopy=True, bandwidth=SLOW)
    migration.wait_for_status("active", timeout=30)
    migration.start_postcopy()
    result = migration.wait(120)
    assert result.postcopy
    assert pattern_intact(target)


def test_pause_before_switchover(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    target = vms.incoming(source, "dst")
    migration = source.migrate(target, pause_before_switchover=True)
    migration.wait_for_status("pre-switchover", timeout=60)
    assert source.status().run_state is RunState.FINISH_MIGRATE  # stopped, devices not yet handed over
    migration.continue_()
    assert migration.wait(60).status == "completed"
    assert target.status().running


def test_cancel_leaves_the_source_running(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    write_pattern(source)
    target = vms.incoming(source, "dst")
    migration = source.migrate(target, bandwidth=SLOW)
    migration.wait_for_status("active", timeout=30)
    migration.cancel()
    assert migration.status == "cancelled"
    assert source.status().running and pattern_intact(source)
    caps = {c["capability"]: c["state"] for c in source.qmp.execute("query-migrate-capabilities")}
    assert caps["events"] is False  # restored
    assert source.qmp.execute("query-migrate-parameters")["max-bandwidth"] != SLOW


def test_destination_killed_midway(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    target = vms.incoming(source, "dst")
    migration = source.migrate(target, bandwidth=SLOW)
    migration.wait_for_status("active", timeout=30)
    target.kill()
    with pytest.raises(MigrationError) as info:
        migration.wait(60)
    assert info.value.status in ("failed", "cancelled")  # QEMU or vmctl sees the dead target first
    assert source.status().running and not source.has_exited


def test_link_cut_midway_fails_in_bounded_time(vms: VMFactory, two_hosts: TwoHosts) -> None:
    source = vms.launch(vms.spec("src"), netns=two_hosts.a)
    target = vms.incoming(source, "dst", netns=two_hosts.b)
    crashes: list[AbnormalExit] = []
    target.on_crash(crashes.append)
    migration = source.migrate(target, listen=(two_hosts.b_address, 4445), bandwidth=SLOW)
    migration.wait_for_status("active", timeout=30)
    two_hosts.cut()
    started = time.monotonic()
    with pytest.raises(MigrationError, match="no progress"):
        migration.wait(60, stall_timeout=3)
    assert time.monotonic() - started < 15
    assert source.status().running


def test_ten_migrations_back_and_forth(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("hop0"))
    write_pattern(vm)
    for hop in range(1, 11):
        target = vms.incoming(vm, f"hop{hop}")
        vm.migrate(target).wait(120)
        vm = target
    assert pattern_intact(vm)
    assert vm.status().running


def test_progress_reports_while_running(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    write_pattern(source)  # 16 MB that cannot be sent as zero pages: seconds at this bandwidth
    target = vms.incoming(source, "dst")
    seen: list[MigrationProgress] = []
    source.migrate(target, bandwidth=16 * MIB).wait(120, on_progress=seen.append, progress_interval=0.2)
    # Reports of the migration under way, not of its end: QEMU still said "active" when each was
    # taken, and they follow the bytes as they go.
    active = [progress for progress in seen if progress.status == "active"]
    assert len(active) >= 2, seen
    assert all(progress.total > 0 for progress in active), active
    transferred = [progress.transferred for progress in active]
    assert transferred == sorted(transferred) and transferred[0] < transferred[-1], transferred


def test_postcopy_recovers_after_the_link_breaks(vms: VMFactory, two_hosts: TwoHosts) -> None:
    source = vms.launch(vms.spec("src"), netns=two_hosts.a)
    write_pattern(source)
    target = vms.incoming(source, "dst", netns=two_hosts.b)
    migration = source.migrate(target, listen=(two_hosts.b_address, 4446), postcopy=True, bandwidth=SLOW)
    migration.wait_for_status("active", timeout=30)
    migration.start_postcopy()
    migration.wait_for_status("postcopy-active", timeout=30)
    two_hosts.cut()
    with pytest.raises(MigrationError, match="call recover") as info:
        migration.wait(60, stall_timeout=3)
    assert info.value.status == "postcopy-paused"
    assert migration.status == "postcopy-paused"
    two_hosts.restore()
    migration.recover(listen=(two_hosts.b_address, 4447))
    result = migration.wait(120)
    assert result.status == "completed" and result.postcopy
    assert pattern_intact(target)


def test_multifd_reaches_both_qemus_and_opens_its_channels(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    write_pattern(source)
    target = vms.incoming(source, "dst")
    # Three channels: QEMU's default is two, which would pass for a count that never reached it.
    migration = source.migrate(target, multifd_channels=3, pause_before_switchover=True)
    # Held before the switch-over, every channel still open: ask each QEMU what it was told.
    migration.wait_for_status("pre-switchover", timeout=60)
    for side in (source, target):
        capabilities = {c["capability"]: c["state"] for c in side.qmp.execute("query-migrate-capabilities")}
        assert capabilities["multifd"] is True, side.name
        assert side.qmp.execute("query-migrate-parameters")["multifd-channels"] == 3, side.name
    assert migration.uri.startswith("unix:")
    assert connections_accepted(migration.uri.removeprefix("unix:")) == 1 + 3  # the main channel and the multifd ones
    migration.continue_()
    assert migration.wait(120).status == "completed"
    assert pattern_intact(target)


def connections_accepted(path: str) -> int:
    """The connections a listening unix socket has accepted: in /proc/net/unix, each accepted
    socket carries its listener's path, and is connected (state 03)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[5] == "03" and line.split()[-1] == path)


def test_a_target_without_the_sources_devices_is_refused(vms: VMFactory, tmp_path: Path) -> None:
    source = vms.launch(vms.spec("src"))
    image = tmp_path / "d.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "32M"], check=True)
    source.hotplug_disk(image, id="data1")
    target = VM.launch_incoming(vms.spec("dst"), run_dir=vms.run_dir("dst"))
    vms.vms.append(target)
    with pytest.raises(InvalidArgument, match="disks missing on the target: data1"):
        source.migrate(target)
    assert source.status().running


def test_copy_storage_migration_carries_the_disk(vms: VMFactory, tmp_path: Path) -> None:
    source = vms.launch(vms.spec("src"))
    image = tmp_path / "src.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    source.hotplug_disk(image, id="data1")
    with GuestShell(source) as shell:
        assert shell.block_device("data1") == "vda"
        shell.run("head -c 4000000 /dev/urandom | dd of=/dev/vda bs=1M conv=fsync 2>/dev/null", check=True)
        guest_sum = shell.run("dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum").output.split()[0]
    copy = tmp_path / "dst.qcow2"  # the target host's own, empty image
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(copy), "64M"], check=True)
    target = VM.launch_incoming(
        source.migration_target_spec(name="dst", disk_paths={"data1": copy}),
        run_dir=vms.run_dir("dst"),
        inventory=source.inventory,
    )
    vms.vms.append(target)
    source.migrate(target, copy_storage=True).wait(180)
    assert [d.path for d in target.disks()] == [str(copy)]
    with GuestShell(target) as shell:
        shell.run("echo 3 > /proc/sys/vm/drop_caches")
        assert shell.run("dd if=/dev/vda bs=1M count=8 2>/dev/null | md5sum").output.split()[0] == guest_sum
    assert target.qmp.execute("query-block-exports") == []
    target.unplug_disk("data1")
    compare = subprocess.run(["qemu-img", "compare", str(image), str(copy)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr


@pytest.mark.parametrize("machine", ["pc-i440fx-7.2", "pc-q35-7.2"])
def test_a_guest_moves_from_qemu_7_2_to_10_0_on_a_pinned_machine_type_with_its_data(
    vms: VMFactory, tmp_path: Path, machine: str
) -> None:
    # A control plane upgrades QEMU under running guests: the machine type pins what the guest sees.
    old = shutil.which("qemu-system-x86_64")
    new = REPO / ".cache" / "qemu-10.0" / "qemu-system-x86_64"
    if old is None or not new.exists():
        pytest.fail("needs the system's QEMU 7.2 and .cache/qemu-10.0 (./run.sh setup installs both)")
    source = vms.launch(vms.spec("old", machine=machine), qemu_binary=old)
    assert (source.qmp.version.major, source.qmp.version.minor) == (7, 2)
    source.hotplug_disk(make_image(tmp_path / "data.qcow2", "qcow2"), id="data1")  # behind a root port on q35
    with GuestShell(source) as shell:
        shell.run(f"echo on-7.2 | dd of=/dev/{shell.block_device('data1')} conv=sync,fsync 2>/dev/null", check=True)
    write_pattern(source)
    target = vms.incoming(source, "new", qemu_binary=str(new))
    assert target.qmp.version.major == 10
    result = source.migrate(target).wait(120)
    assert result.status == "completed"
    assert target.status().run_state is RunState.RUNNING
    running = target.qmp.execute("qom-get", {"path": "/machine", "property": "type"})
    assert running == f"{machine}-machine"  # QEMU 10.0 emulates the 7.2 machine, not its own
    assert pattern_intact(target)  # the guest's memory arrived whole, and its shell answers
    with GuestShell(target) as shell:
        assert shell.run(f"dd if=/dev/{shell.block_device('data1')} bs=7 count=1 2>/dev/null").output == "on-7.2\n"


def test_migration_parameters_are_checked_against_this_qemus_schema(qmp: Monitor) -> None:
    # QEMU versions differ in their parameters (vcpu-dirty-limit came with 8.1): vmctl asks the schema.
    with pytest.raises(InvalidArgument, match="x-no-such-parameter"):
        migration_ops.set_parameters(qmp, {"x-no-such-parameter": 1, "downtime-limit": 123})
    assert qmp.execute("query-migrate-parameters")["downtime-limit"] != 123  # nothing was set
    previous = migration_ops.set_parameters(qmp, {"downtime-limit": 123})
    assert qmp.execute("query-migrate-parameters")["downtime-limit"] == 123 and "downtime-limit" in previous
    has_dirty_limit = qmp.schema.has_argument("migrate-set-parameters", "vcpu-dirty-limit")
    assert has_dirty_limit is ((qmp.version.major, qmp.version.minor) >= (8, 1))
    if not has_dirty_limit:
        with pytest.raises(InvalidArgument, match="vcpu-dirty-limit"):
            migration_ops.set_parameters(qmp, {"vcpu-dirty-limit": 10})
