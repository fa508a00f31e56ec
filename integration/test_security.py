"""QEMU as vmctl runs it by default from root: a uid of its own from the pool, no groups, no
capabilities, no new privileges, seccomp; every file it needs passed by fd; a run dir only vmctl
and that QEMU reach, where QEMU cannot touch what vmctl wrote."""

from __future__ import annotations

import os
import pwd
import signal
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from integration.conftest import VMFactory, make_image
from integration.versions import SANDBOX
from vmctl import VM, DiskSpec
from vmctl.errors import AbnormalExit, CommandError, ConnectionLost, LaunchError
from vmctl.testing import GuestShell
from vmctl.vm.uidpool import UidPool

pytestmark = pytest.mark.versioned(SANDBOX)


def status_of(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def qemu_ids(vm: VM) -> tuple[int, int]:
    """The uid and gid the VM's QEMU runs as."""
    found = status_of(vm.pid)
    return int(found["Uid"].split()[0]), int(found["Gid"].split()[0])


def as_user(ids: tuple[int, int], *argv: str) -> subprocess.CompletedProcess[str]:
    prefix = ["setpriv", f"--reuid={ids[0]}", f"--regid={ids[1]}", "--clear-groups", "--"]
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=30)


def test_a_vm_launched_by_root_runs_as_a_pool_uid_in_seccomp_with_nothing_more(vms: VMFactory) -> None:
    vm = vms.launch()
    found = status_of(vm.pid)
    uid, gid = qemu_ids(vm)
    assert uid in UidPool.from_env().ids and gid == uid
    assert found["Uid"].split() == [str(uid)] * 4
    assert found["Gid"].split() == [str(gid)] * 4
    assert found["Groups"] == ""
    assert int(found["CapEff"], 16) == int(found["CapPrm"], 16) == int(found["CapBnd"], 16) == 0
    assert found["NoNewPrivs"] == "1" and found["Seccomp"] == "2"
    assert b"-sandbox" in Path(f"/proc/{vm.pid}/cmdline").read_bytes()
    with GuestShell(vm) as shell:
        assert shell.run("echo up").output == "up\n"


def test_the_run_dir_is_shared_with_qemus_group_only_and_qemu_cannot_replace_vmctls_files(
    vms: VMFactory,
) -> None:
    vm = vms.launch()
    qemu = qemu_ids(vm)
    run_dir = vm.run_dir.stat()
    assert (run_dir.st_uid, run_dir.st_gid, stat.S_IMODE(run_dir.st_mode)) == (0, qemu[1], 0o1770)
    state = vm.run_dir / "vm.json"
    assert (state.stat().st_uid, stat.S_IMODE(state.stat().st_mode)) == (0, 0o600)
    assert (vm.run_dir / "qmp.sock").stat().st_uid == qemu[0]  # QEMU made it
    before = state.read_bytes()
    for argv in (["rm", "-f", str(state)], ["mv", str(state), f"{state}.x"], ["ln", "-sf", "/etc/shadow", str(state)]):
        assert as_user(qemu, *argv).returncode != 0, argv  # the sticky bit: only its own files
    assert as_user(qemu, "cat", str(state)).returncode != 0  # nor read it
    assert state.read_bytes() == before
    nobody = pwd.getpwnam("nobody")
    denied = as_user((nobody.pw_uid, nobody.pw_gid), "ls", str(vm.run_dir))
    assert denied.returncode != 0  # other users do not get in at all
    vm.store.save()  # and vmctl still writes its state there
    assert state.stat().st_uid == 0


def test_qemu_reads_and_writes_images_it_could_never_open_itself(vms: VMFactory) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as closed:  # root's, mode 0700
        image = make_image(Path(closed) / "data.raw", "raw", "8M")
        image.chmod(0o600)
        with open(image, "r+b") as out:
            out.write(b"written-on-the-host\n")
        vm = vms.launch(vms.spec(disks=[DiskSpec(id="d1", path=image, format="raw")]))
        assert str(image).encode() not in Path(f"/proc/{vm.pid}/cmdline").read_bytes()  # by fd only
        with GuestShell(vm) as shell:
            assert shell.run("head -c 20 /dev/vda").output == "written-on-the-host\n"
            shell.run("echo written-by-the-guest | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null", check=True)
        with open(image, "rb") as back:
            back.seek(512)
            assert back.read(22) == b"written-by-the-guest\n\0"
        vm.kill()


def test_a_sandboxed_qemu_cannot_start_a_process(vms: VMFactory) -> None:
    """QEMU 7.2's sandbox kills QEMU at the fork (SIGSYS); 10.0's refuses the fork (EPERM) and
    QEMU runs on. Either way nothing runs."""
    vm = vms.launch(wait_ready=False)
    marker = vm.run_dir / "spawned"
    try:
        vm.qmp.execute("migrate", {"uri": f"exec:touch {marker}"})
    except ConnectionLost:
        with pytest.raises(AbnormalExit, match=f"signal {int(signal.SIGSYS)}"):
            vm.wait(10)
    except CommandError as exc:
        assert "Operation not permitted" in str(exc)
        assert vm.status().run_state is not None  # still there, still answering
    else:
        pytest.fail("QEMU started a process under the sandbox")
    assert not marker.exists()


def test_run_as_none_and_no_sandbox_run_qemu_as_vmctl_itself(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec(run_as=None, sandbox=False), wait_ready=False)
    found = status_of(vm.pid)
    assert found["Uid"].split()[0] == "0" and found["Seccomp"] == "0"


def test_a_run_dir_out_of_qemus_reach_is_refused_before_qemu_starts(vms: VMFactory) -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as closed:  # root's, mode 0700
        run_dir = Path(closed) / "vm1"
        with pytest.raises(LaunchError, match=f"{closed} is mode 0o700"):
            VM.launch(vms.spec(), run_dir=run_dir)
        assert not (run_dir / "qemu.log").exists()


def test_a_kernel_qemus_user_may_not_read_is_refused_before_qemu_starts(vms: VMFactory, tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(Path(vms.guest.kernel).read_bytes())
    kernel.chmod(0o600)
    with pytest.raises(LaunchError, match=rf"{kernel} is not readable by QEMU's user \d+"):
        vms.launch(vms.spec(kernel=kernel))
    assert os.listdir(vms.run_dir("vm1")) == []
