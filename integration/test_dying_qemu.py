"""QEMU killed at the worst time: the source or the target in each phase of a migration, the VM
during a block job and during a snapshot. Every waiter raises within a second, the survivor runs
on with its data, and nothing of the dead one is left that claims it is alive."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import VMFactory, make_image
from integration.test_migration import SLOW, pattern_intact, write_pattern
from integration.versions import MIGRATION
from vmctl import VM, RunState
from vmctl.errors import MigrationError, StaleState, VmctlError, WaitTimeout
from vmctl.testing import GuestShell

pytestmark = pytest.mark.versioned(MIGRATION)

#: A waiter learns of a dead QEMU within this (the bound the issue sets, with the kill's own latency).
PROMPTLY = 1.0

PHASES = ("setup", "active", "postcopy-active", "pre-switchover", "device")


def assert_gone(vm: VM) -> None:
    """Nothing of a dead QEMU is left: its process is reaped, its monitor socket takes no one,
    and its run dir does not pass for a live VM."""
    with contextlib.suppress(VmctlError):  # its exit is an abnormal one
        vm.wait(5)
    assert vm.has_exited
    with pytest.raises(ProcessLookupError):
        os.kill(vm.pid, 0)
    for path in vm.run_dir.glob("*.sock"):
        with socket.socket(socket.AF_UNIX) as client, pytest.raises(OSError):
            client.connect(str(path))
    with pytest.raises(StaleState):
        VM.attach(vm.run_dir)


def reach(migration: Any, phase: str) -> None:
    if phase == "postcopy-active":
        migration.wait_for_status("active", timeout=30)
        migration.start_postcopy()
    if phase == "device":  # the device state follows the switchover: kill right after it is let go
        migration.wait_for_status("pre-switchover", timeout=60)
        migration.continue_()
        return
    migration.wait_for_status(phase, timeout=60)


@pytest.mark.parametrize("victim", ["source", "target"])
@pytest.mark.parametrize("phase", PHASES)
def test_a_qemu_killed_during_a_migration_phase(vms: VMFactory, phase: str, victim: str) -> None:
    source = vms.launch(vms.spec("src"))
    write_pattern(source)
    target = vms.incoming(source, "dst")
    options: dict[str, Any] = {"bandwidth": SLOW}
    if phase == "postcopy-active":
        options["postcopy"] = True
    if phase in ("pre-switchover", "device"):
        options = {"pause_before_switchover": True}
    migration = source.migrate(target, **options)
    reach(migration, phase)
    dead, survivor = (source, target) if victim == "source" else (target, source)
    target_events = target.qmp.events("MIGRATION")
    killed = time.monotonic()
    os.kill(dead.pid, signal.SIGKILL)
    try:
        outcome: Any = migration.wait(60)
    except MigrationError as exc:
        outcome = exc
    assert time.monotonic() - killed < PROMPTLY, f"the waiter took {time.monotonic() - killed:.2f}s"
    with pytest.raises(VmctlError):
        dead.wait(5)  # an abnormal exit
    assert_gone(dead)
    if not isinstance(outcome, MigrationError):  # the source died after the last byte: the target has it all
        assert victim == "source" and phase == "device", outcome
        assert survivor.status().running and pattern_intact(survivor)
    elif victim == "target" and phase != "postcopy-active":  # the source had the whole guest all along
        assert survivor.status().run_state is RunState.RUNNING, outcome
        assert pattern_intact(survivor)
        assert outcome.status in ("failed", "cancelled"), outcome  # QEMU may see the broken stream first
    elif victim == "target":  # postcopy: the guest's memory was split, it cannot run anywhere
        assert "cannot be resumed" in str(outcome) and not survivor.status().running
    else:  # the source had the guest: the target's incoming side ended and its QEMU with it,
        assert "source QEMU died" in str(outcome)
        try:
            survivor.wait(5)
        except WaitTimeout:  # or it still waits:
            if phase == "postcopy-active":  # with part of the guest, for a postcopy recovery
                # It ran the guest from the start of postcopy, so its main loop may be stuck on a
                # page that never comes (then only out-of-band commands answer): its event says it.
                assert "postcopy-paused" in [str(e.data.get("status")) for e in target_events.drain()]
            else:  # empty, the source having died before it connected
                assert survivor.status().run_state is RunState.INMIGRATE
        except VmctlError:  # its exit, an abnormal one
            assert_gone(survivor)
        else:
            assert_gone(survivor)


def test_a_vm_killed_during_a_block_job_ends_its_waiter_at_once(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("jobs"))
    vm.hotplug_disk(make_image(tmp_path / "big.qcow2", "qcow2", "1G"), id="jd1")
    with GuestShell(vm) as shell:  # data to copy, so that the mirror runs a while at its speed limit
        device = shell.block_device("jd1")  # once the guest has it (before, dd would make a file)
        shell.run(f"head -c 8000000 /dev/urandom | dd of=/dev/{device} bs=1M conv=fsync 2>/dev/null", check=True)
    job = vm.mirror_disk("jd1", tmp_path / "copy.qcow2")
    vm.qmp.execute("block-job-set-speed", {"device": job.id, "speed": 1 << 20})
    assert job.progress().status == "running"
    killed = _kill_soon(vm)
    with pytest.raises(VmctlError):
        job.wait_ready(60)
    assert time.monotonic() - killed.wait() < PROMPTLY
    assert_gone(vm)


def test_a_vm_killed_during_snapshots_ends_the_call_at_once(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("snaps"))
    vm.hotplug_disk(make_image(tmp_path / "base.qcow2", "qcow2"), id="sn1")
    failure: list[BaseException] = []
    ended = threading.Event()
    taken = threading.Event()

    def snapshots() -> None:  # as many as fit until QEMU dies under one of them
        try:
            for n in range(1000):
                vm.snapshot_disks(["sn1"], overlays={"sn1": tmp_path / f"s{n}.qcow2"})
                taken.set()
        except VmctlError as exc:
            failure.append(exc)
        finally:
            ended.set()

    thread = threading.Thread(target=snapshots)
    thread.start()
    assert taken.wait(30)  # one went through: the loop is under way, the next snapshot begun
    killed = _kill_soon(vm, after=0.0)
    assert ended.wait(10)
    thread.join(5)
    assert failure, "the snapshots outlived their QEMU"
    assert time.monotonic() - killed.wait() < PROMPTLY
    assert_gone(vm)


class _Kill:
    def __init__(self) -> None:
        self.at = 0.0
        self.done = threading.Event()

    def wait(self) -> float:
        assert self.done.wait(10)
        return self.at


def _kill_soon(vm: VM, after: float = 0.3) -> _Kill:
    """SIGKILL the VM's QEMU from another thread, while this one waits on it."""
    kill = _Kill()

    def run() -> None:
        time.sleep(after)
        kill.at = time.monotonic()
        os.kill(vm.pid, signal.SIGKILL)
        kill.done.set()

    threading.Thread(target=run, daemon=True).start()
    return kill
