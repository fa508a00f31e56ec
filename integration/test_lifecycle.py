"""VM lifecycle against real QEMU running the test guest under TCG."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from integration.conftest import BOOT_TIMEOUT, DomainFactory, VMFactory
from vmctl import VM, DiskSpec, RunState, ShutdownMethod, VMSpec
from vmctl.errors import AbnormalExit, LaunchError, SpecError, StaleState
from vmctl.testing import READY_MARKER, GuestShell


def test_boot_to_ready_and_run_a_command(vms: VMFactory) -> None:
    vm = vms.launch()
    assert vm.status().run_state is RunState.RUNNING
    with GuestShell(vm) as shell:
        result = shell.run("uname -r && cat /proc/cmdline")
    assert result.ok
    assert "cloud-amd64" in result.output
    assert "console=ttyS0" in result.output


def test_pause_and_resume_with_events_and_status(domains: DomainFactory) -> None:
    vm = domains.launch()
    with vm.qmp.events("STOP", "RESUME") as events:
        vm.pause()
        assert vm.status().run_state is RunState.PAUSED
        assert events.get(5).name == "STOP"
        vm.resume()
        assert vm.status().run_state is RunState.RUNNING
        assert events.get(5).name == "RESUME"
    with GuestShell(vm) as shell:
        assert shell.run("echo alive").output == "alive\n"


def test_host_reset_is_expected_and_guest_reboot_is_not(vms: VMFactory) -> None:
    vm = vms.launch()
    unexpected: list[object] = []
    got_unexpected = threading.Event()

    def on_unexpected(reset: object) -> None:
        unexpected.append(reset)
        got_unexpected.set()

    vm.on_unexpected_reset(on_unexpected)
    mark = vm.console.position
    vm.reset()
    vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT, since=mark)
    assert [r.expected for r in vm.resets] == [True]
    assert not unexpected
    with GuestShell(vm) as shell:
        mark = vm.console.position
        shell.send("reboot -f")
        assert got_unexpected.wait(30)
    assert unexpected[0].guest is True  # type: ignore[attr-defined]
    assert [r.expected for r in vm.resets] == [True, False]
    vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT, since=mark)
    assert vm.status().running


def test_acpi_powerdown_shuts_the_guest_down(vms: VMFactory) -> None:
    vm = vms.launch()
    shutdowns: list[object] = []
    vm.on_shutdown(shutdowns.append)
    result = vm.shutdown(timeout=30)
    assert result.method is ShutdownMethod.POWERDOWN
    assert result.exit.code == 0
    assert vm.wait(1).code == 0
    assert shutdowns and shutdowns[0].guest is True  # type: ignore[attr-defined]


def test_powerdown_with_no_shutdown_quits_qemu(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec(no_shutdown=True))
    result = vm.shutdown(timeout=30)
    assert result.method is ShutdownMethod.POWERDOWN
    assert vm.process.poll() is not None


def test_guest_ignoring_acpi_escalates_in_bounded_time(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec(append="vmctl.noacpi"))
    started = time.monotonic()
    result = vm.shutdown(timeout=2, step_timeout=5)
    assert result.method is ShutdownMethod.QUIT
    assert time.monotonic() - started < 10
    assert vm.wait(1).code == 0


def test_sigkill_is_an_abnormal_exit_with_the_log_tail(vms: VMFactory) -> None:
    vm = vms.launch()
    crashes: list[AbnormalExit] = []
    crashed = threading.Event()

    def on_crash(crash: AbnormalExit) -> None:
        crashes.append(crash)
        crashed.set()

    vm.on_crash(on_crash)
    with (vm.run_dir / "qemu.log").open("a") as qemu_log:
        qemu_log.write("marker-before-crash\n")
    os.kill(vm.pid, signal.SIGKILL)
    # Reported by itself: nothing here asks vmctl anything until the callback has run (how soon
    # after the kill is a figure for bench/, not a test's to time).
    assert crashed.wait(5)
    with pytest.raises(AbnormalExit) as info:
        vm.wait(1)
    assert info.value.signal == signal.SIGKILL
    assert "marker-before-crash" in info.value.log_tail
    assert crashes[0] is info.value


def test_attach_after_the_controlling_process_exits(vms: VMFactory, tmp_path: Path) -> None:
    disk = tmp_path / "data.raw"
    disk.write_bytes(b"\0" * 1024 * 1024)
    spec = vms.spec("attached", disks=(DiskSpec(id="data0", path=disk, format="raw"),))
    run_dir = vms.run_dir("attached")
    script = f"""
import sys
from vmctl import VM, VMSpec
from vmctl.testing import READY_MARKER
spec = VMSpec.from_dict({spec.to_dict()!r})
vm = VM.launch(spec, run_dir={str(run_dir)!r})
vm.console.wait_for(READY_MARKER, timeout={BOOT_TIMEOUT})
print(vm.pid)
"""
    controller = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert controller.returncode == 0, controller.stderr
    pid = int(controller.stdout.strip().splitlines()[-1])
    vm = VM.attach(run_dir)
    vms.vms.append(vm)
    assert vm.pid == pid
    assert vm.spec == spec
    assert [d.id for d in vm.inventory.disks] == ["data0"]
    assert vm.status().running
    with GuestShell(vm) as shell:
        assert "vda" in shell.run("ls /sys/block").output
    result = vm.shutdown(timeout=30)
    assert result.method is ShutdownMethod.POWERDOWN
    assert result.exit.code is None  # not our child: only its parent could know
    with pytest.raises(StaleState):
        VM.attach(run_dir)


def test_launch_refuses_a_run_dir_with_a_live_vm(vms: VMFactory) -> None:
    vm = vms.launch(wait_ready=False)
    with pytest.raises(LaunchError, match="belongs to a running VM"):
        VM.launch(vms.spec(), run_dir=vm.run_dir)


def test_a_missing_kernel_is_a_launch_error_before_qemu_starts(vms: VMFactory, tmp_path: Path) -> None:
    spec = vms.spec(kernel=tmp_path / "no-such-kernel", initrd=None, append="")
    with pytest.raises(LaunchError, match=r"cannot open .*no-such-kernel for QEMU: No such file or directory"):
        VM.launch(spec, run_dir=vms.run_dir("missing"))  # vmctl opens it, to pass it by fd
    assert not (vms.run_dir("missing") / "qemu.log").exists()


def test_bad_qemu_argument_is_a_launch_error(vms: VMFactory, tmp_path: Path) -> None:
    spec = vms.spec(extra_args=("-device", "no-such-device"))
    with pytest.raises(LaunchError, match="no-such-device"):
        VM.launch(spec, run_dir=vms.run_dir("bad-arg"))


def test_bad_specs_are_refused_before_anything_starts(vms: VMFactory) -> None:
    with pytest.raises(SpecError, match="max_cpus"):
        vms.spec(cpus=4, max_cpus=2)
    with pytest.raises(SpecError, match="unique"):
        vms.spec(disks=(DiskSpec(id="d0", path="/a"), DiskSpec(id="d0", path="/b")))
    with pytest.raises(SpecError, match="name"):
        VMSpec(name="bad name", kernel="/k")


def test_guest_panic_is_reported(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec(extra_args=("-device", "pvpanic")))
    panics: list[object] = []
    panicked = threading.Event()

    def on_panic(event: object) -> None:
        panics.append(event)
        panicked.set()

    vm.on_panic(on_panic)
    with GuestShell(vm) as shell:
        shell.send("echo c > /proc/sysrq-trigger")
        assert panicked.wait(30)
    assert panics[0].name == "GUEST_PANICKED"  # type: ignore[attr-defined]
    assert vm.qmp.recent_events("GUEST_PANICKED")


def test_many_vms_share_two_vmctl_threads_and_a_crash_is_still_reported(vms: VMFactory) -> None:
    # Paused: the guests need not boot for QEMU to be watched.
    machines = [vms.launch(vms.spec(f"many{i}"), wait_ready=False, paused=True) for i in range(8)]
    for vm in machines:
        vm.qmp.on_event(lambda event: None, "STOP")  # every monitor with a callback, too
    # The libvirt face's own threads (its event loop, its call workers) serve earlier tests' domains.
    libvirts = ("vmctl-libvirt", "vmctl-relay", "vmctl-virsh")
    names = sorted(
        t.name for t in threading.enumerate() if t.name.startswith("vmctl-") and not t.name.startswith(libvirts)
    )
    assert names == ["vmctl-callbacks", "vmctl-io"]
    crashes: list[AbnormalExit] = []
    crashed = threading.Event()
    victim = machines[3]

    def record(crash: AbnormalExit) -> None:
        crashes.append(crash)
        crashed.set()

    victim.on_crash(record)
    os.kill(victim.pid, signal.SIGKILL)  # from outside: not asked for by vmctl
    assert crashed.wait(10)
    assert crashes[0].signal == signal.SIGKILL
    with pytest.raises(AbnormalExit):
        victim.wait(1)
    survivors = [vm for vm in machines if vm is not victim]
    assert all(not vm.has_exited and vm.status().run_state is RunState.PRELAUNCH for vm in survivors)


def test_with_2000_fds_open_vms_launch_attach_crash_and_shut_down(vms: VMFactory, tmp_path: Path) -> None:
    # A control plane with hundreds of VMs holds thousands of fds: nothing may use select().
    held = [os.open("/dev/null", os.O_RDONLY) for _ in range(2000)]
    try:
        assert min(held) < 1024 < max(held)
        first = vms.launch(vms.spec("fds1"), wait_ready=False, paused=True)
        first.close()
        again = VM.attach(first.run_dir)
        vms.vms[vms.vms.index(first)] = again
        assert again.status().run_state is RunState.PRELAUNCH
        assert again.qmp.execute("query-status")["status"] == "prelaunch"
        killed = again.kill()
        assert killed.signal is None and killed.code is None  # attached: not our child any more
        second = vms.launch(vms.spec("fds2"))
        result = second.shutdown(timeout=30)
        assert result.method is ShutdownMethod.POWERDOWN and result.exit.code == 0
        third = vms.launch(vms.spec("fds3"), wait_ready=False, paused=True)
        os.kill(third.pid, signal.SIGKILL)
        with pytest.raises(AbnormalExit):
            third.wait(10)
    finally:
        for fd in held:
            os.close(fd)
