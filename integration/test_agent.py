"""The QEMU guest agent on real QEMU: the test guest runs Debian's qemu-ga on the port
``VMSpec(guest_agent=True)`` adds. Each effect is checked inside the guest or on the images."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.conftest import DomainFactory, VMFactory, make_image
from vmctl import VM
from vmctl.agent.guest import GuestAgent
from vmctl.errors import AgentCommandError, AgentTimeout, AgentUnavailable
from vmctl.model import DiskSpec
from vmctl.model.agent import FreezeStatus
from vmctl.model.names import AGENT_CHARDEV
from vmctl.model.status import ShutdownMethod
from vmctl.testing import GuestShell
from vmctl.testing.guest import AGENT_LOG

pytestmark = pytest.mark.timeout(120)


def agent_up(vm: VM, timeout: float = 30.0) -> GuestAgent:
    """The VM's agent once it answers (qemu-ga starts a moment after the guest is up)."""
    deadline = time.monotonic() + timeout
    while not vm.agent.answers(timeout=1.0):
        assert time.monotonic() < deadline, "the guest agent never answered"
        time.sleep(0.1)
    return vm.agent


def agent_socket_held(vm: VM) -> bool:
    """Whether a client is connected to QEMU's end of the agent's port (QEMU names the chardev
    ``disconnected:...`` while none is)."""
    [chardev] = [c for c in vm.qmp.execute("query-chardev") if c["label"] == AGENT_CHARDEV]
    return not str(chardev["filename"]).startswith("disconnected:")


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout:g}s"
        time.sleep(0.01)


def agent_pid(shell: GuestShell) -> str:
    return shell.run("pidof qemu-ga", check=True).output.strip()


def ext2_disk(tmp_path: Path) -> DiskSpec:
    """A raw disk holding an ext2 filesystem (made on the host: the guest's busybox has no mkfs)."""
    image = make_image(tmp_path / "data.raw", "raw")
    subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], check=True)
    return DiskSpec(id="data", path=image, format="raw")


def mount_data(shell: GuestShell) -> None:
    device = shell.block_device("data")
    shell.run(f"mkdir -p /mnt/data && mount /dev/{device} /mnt/data", check=True)


def test_exec_returns_the_guests_output_stderr_and_exit_code(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("agent-exec", guest_agent=True))
    agent = agent_up(vm)
    result = agent.exec(["sh", "-c", "cat; echo; uname -s; echo oops >&2; exit 3"], input=b"from the host")
    assert (result.exit_code, result.stdout, result.stderr) == (3, b"from the host\nLinux\n", b"oops\n")
    slow = agent.exec(["sh", "-c", "sleep 1; echo late"])  # past the first connection's polling
    assert slow.ok and slow.stdout == b"late\n"
    with pytest.raises(AgentCommandError, match="no-such-program"):
        agent.exec(["no-such-program"])
    with pytest.raises(AgentTimeout, match="did not end within 1s"):
        agent.exec(["sleep", "5"], timeout=1)
    assert agent.info().version.split(".")[0].isdigit()
    assert "guest-fsfreeze-freeze" in agent.info().commands
    assert [i.name for i in agent.network_interfaces()] == ["lo"]
    agent.set_time(1_900_000_000 * 10**9)  # 2030: the guest's clock (and its RTC) follow
    assert 1_900_000_000 <= int(agent.exec(["date", "+%s"]).stdout) < 1_900_000_060
    agent.set_time()  # back to the host's clock
    assert abs(int(agent.exec(["date", "+%s"]).stdout) - time.time()) < 60


def test_a_quiesced_snapshot_holds_what_the_guest_wrote_just_before_it(vms: VMFactory, tmp_path: Path) -> None:
    disk = ext2_disk(tmp_path)
    vm = vms.launch(vms.spec("agent-snap", guest_agent=True, disks=[disk]))
    agent = agent_up(vm)
    with GuestShell(vm) as shell:
        mount_data(shell)
        shell.run("sync; : > " + AGENT_LOG, check=True)
        shell.run("echo written-before-the-snapshot > /mnt/data/note", check=True)  # in the page cache only
        [disk] = vm.snapshot_disks(["data"], overlays={"data": tmp_path / "top.qcow2"}, quiesce=True)
        assert len(disk.layers) == 2
        # qemu-ga -v logs each request it reads, and stops logging while the guest is frozen.
        log = shell.run(f"cat {AGENT_LOG}", check=True).output
        freeze = log.index('"execute":"guest-fsfreeze-freeze"')
        assert freeze < log.index("disabling logging due to filesystem freeze")
        assert log.index("disabling logging") < log.index("logging re-enabled due to filesystem unfreeze")
        assert agent.fsfreeze_status() is FreezeStatus.THAWED
        shell.run("echo after > /mnt/data/after && sync", check=True)  # writes go on: thawed
    # The base image, now read-only under the overlay, has the note: the freeze flushed it.
    found = subprocess.run(
        ["debugfs", "-R", "cat /note", str(disk.path)], capture_output=True, text=True, check=True
    ).stdout
    assert found == "written-before-the-snapshot\n"


def test_frozen_thaws_when_its_body_raises_and_writes_wait_while_frozen(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("agent-freeze", guest_agent=True, disks=[ext2_disk(tmp_path)]))
    agent = agent_up(vm)
    with GuestShell(vm) as shell:
        mount_data(shell)
        with pytest.raises(RuntimeError, match="the body failed"), agent.frozen() as count:
            assert count >= 1
            assert agent.fsfreeze_status() is FreezeStatus.FROZEN
            # A writer in the guest waits on the frozen filesystem (/tmp is tmpfs: not frozen): it
            # is blocked in the kernel (uninterruptible sleep), not merely slow to start.
            started = shell.run(
                "(echo late > /mnt/data/late; touch /tmp/late-done) >/dev/null 2>&1 & echo $!", check=True
            )
            writer = started.output.strip()
            shell.poll(f"[ \"$(cut -d' ' -f3 /proc/{writer}/stat)\" = D ] && echo blocked")
            assert not shell.run("test -e /tmp/late-done").ok
            raise RuntimeError("the body failed")
        assert agent.fsfreeze_status() is FreezeStatus.THAWED
        shell.poll("test -e /tmp/late-done && cat /mnt/data/late")


def test_attach_thaws_a_guest_a_dead_control_plane_left_frozen(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("agent-attach", guest_agent=True, disks=[ext2_disk(tmp_path)]))
    with GuestShell(vm) as shell:
        mount_data(shell)
    assert agent_up(vm).fsfreeze() == 1
    assert vm.agent.fsfreeze_status() is FreezeStatus.FROZEN
    vms.vms.remove(vm)
    vm.close()  # the control plane goes, the guest stays frozen
    again = VM.attach(vm.run_dir)
    vms.vms.append(again)
    assert again.agent.fsfreeze_status() is FreezeStatus.THAWED


def test_a_stopped_agent_times_out_and_a_killed_one_is_unavailable_at_once(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("agent-dead", guest_agent=True))
    agent = agent_up(vm)
    with GuestShell(vm) as shell:
        pid = agent_pid(shell)
        shell.run(f"kill -STOP {pid}", check=True)
        with pytest.raises(AgentTimeout):
            agent.ping(timeout=1.0)
        # A call waiting on the hung agent learns at once when the agent dies (not at its timeout).
        outcome: list[BaseException] = []
        waiter = threading.Thread(target=lambda: _capture(outcome, lambda: agent.ping(timeout=60.0)), daemon=True)
        # QEMU serves one client on the agent's socket: once the timed-out call's connection is
        # gone, a connection QEMU holds is the waiter's, which passed its port check and waits.
        wait_until(lambda: not agent_socket_held(vm), "the timed-out call's connection closed")
        waiter.start()
        wait_until(lambda: agent_socket_held(vm), "the waiter connected")
        shell.run(f"kill -KILL {pid}", check=True)
        waiter.join(timeout=10.0)
        assert not waiter.is_alive()
        assert [type(e) for e in outcome] == [AgentUnavailable]
        with pytest.raises(AgentUnavailable, match="has not opened the agent's port"):
            agent.ping(timeout=60.0)
        assert not agent.answers()
        # ACPI takes over the shutdown the agent can no longer do.
        assert vm.shutdown(timeout=20).method is ShutdownMethod.POWERDOWN


def _capture(outcome: list[BaseException], call: object) -> None:
    try:
        call()  # type: ignore[operator]
    except BaseException as exc:
        outcome.append(exc)


def test_shutdown_goes_through_the_agent_when_it_answers(vms: VMFactory) -> None:
    # The guest ignores the ACPI button: only the agent can power it off gracefully.
    vm = vms.launch(vms.spec("agent-down", guest_agent=True, append="vmctl.noacpi"))
    agent_up(vm)
    result = vm.shutdown(timeout=20)
    assert result.method is ShutdownMethod.AGENT
    assert result.exit.code == 0


def test_a_vm_without_an_agent_says_so_before_anything_is_done(vms: VMFactory, tmp_path: Path) -> None:
    disk = DiskSpec(id="data", path=make_image(tmp_path / "d.qcow2", "qcow2"))
    vm = vms.launch(vms.spec("agent-none", disks=[disk]))
    with pytest.raises(AgentUnavailable, match="guest_agent=True"):
        vm.agent.ping()
    with pytest.raises(AgentUnavailable):
        vm.snapshot_disks(["data"], overlays={"data": tmp_path / "top.qcow2"}, quiesce=True)
    assert not (tmp_path / "top.qcow2").exists()
    assert [len(d.layers) for d in vm.disks()] == [1]


@pytest.mark.parametrize("domains", ["libvirt"], indirect=True)
def test_libvirt_quiesces_a_snapshot_through_its_own_agent_channel(domains: DomainFactory, tmp_path: Path) -> None:
    disk = ext2_disk(tmp_path)
    vm = domains.launch(domains.spec("agent-libvirt", guest_agent=True, disks=[disk]))
    with GuestShell(vm) as shell:
        mount_data(shell)
        shell.poll("pidof qemu-ga")
        shell.run("echo written-before-the-snapshot > /mnt/data/note", check=True)  # in the page cache only
        [snapped] = vm.snapshot_disks(["data"], overlays={"data": tmp_path / "top.qcow2"}, quiesce=True)
        assert len(snapped.layers) == 2
        log = shell.run(f"cat {AGENT_LOG}", check=True).output
        assert log.index("disabling logging due to filesystem freeze") < log.index("logging re-enabled")
        shell.run("echo after > /mnt/data/after && sync", check=True)
    found = subprocess.run(["debugfs", "-R", "cat /note", str(disk.path)], capture_output=True, text=True, check=True)
    assert found.stdout == "written-before-the-snapshot\n"
