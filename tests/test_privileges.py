"""Who QEMU runs as, its sandbox, and the files it gets by fd: rendered and checked before launch."""

from __future__ import annotations

import json
import os
import pwd
import tempfile
from pathlib import Path
from typing import Any

import pytest

from vmctl import DiskSpec, VMSpec
from vmctl.errors import LaunchError, SpecError
from vmctl.model.disk import Overlay
from vmctl.model.vm import SANDBOX, PassedFile
from vmctl.qmp.messages import QEMUVersion
from vmctl.vm import privileges
from vmctl.vm.passing import open_for_qemu, opened, own_file
from vmctl.vm.privileges import QemuUser, userfaultfd_refusal

RUN = Path("/run/vms/vm1")
NOBODY = pwd.getpwnam("nobody")


def option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def spec(**fields: Any) -> VMSpec:
    return VMSpec(**{"name": "vm1", "kernel": "/boot/vmlinuz", **fields})


def test_the_sandbox_is_on_by_default_and_off_only_when_asked() -> None:
    assert option(spec().command_line(qemu_binary="qemu", run_dir=RUN, accel="tcg"), "-sandbox") == [SANDBOX]
    assert "-sandbox" not in spec(sandbox=False).command_line(qemu_binary="qemu", run_dir=RUN, accel="tcg")


@pytest.mark.parametrize("run_as", ["root:", ":x", "a b", "auto:kvm", "-x", 5, ""])
def test_a_malformed_run_as_is_a_spec_error(run_as: Any) -> None:
    with pytest.raises(SpecError, match="run_as"):
        spec(run_as=run_as)


def test_qemu_gets_every_file_by_fd_block_nodes_in_fdsets_of_their_own() -> None:
    disk = DiskSpec(id="d1", path="/img/base.qcow2", overlays=[Overlay(layer=1, path="/img/top.qcow2")])
    vm = spec(disks=[disk], firmware="uefi", initrd="/boot/initrd")
    files = vm.passed_files(RUN)
    assert [(f.tag, f.path, f.own, f.read_by_qemu) for f in files] == [
        ("vmctl:kernel", "/boot/vmlinuz", False, True),
        ("vmctl:initrd", "/boot/initrd", False, True),
        ("vmctl:disk:d1", "/img/base.qcow2", False, False),
        ("vmctl:disk:d1:1", "/img/top.qcow2", False, False),
        ("vmctl:uefi-code", vm.uefi_code, False, False),
        ("vmctl:uefi-vars", str(RUN / "uefi-vars.fd"), True, False),
    ]
    argv = vm.command_line(
        qemu_binary="qemu", run_dir=RUN, accel="tcg", passed={f.tag: 10 + n for n, f in enumerate(files)}
    )
    assert option(argv, "-kernel") == ["/proc/self/fd/10"] and option(argv, "-initrd") == ["/proc/self/fd/11"]
    assert option(argv, "-add-fd") == [
        "fd=12,set=0,opaque=vmctl:disk:d1",
        "fd=13,set=1,opaque=vmctl:disk:d1:1",
        "fd=14,set=2,opaque=vmctl:uefi-code",
        "fd=15,set=3,opaque=vmctl:uefi-vars",
    ]
    files_of = {b["node-name"]: b.get("filename") for b in map(json.loads, option(argv, "-blockdev"))}
    assert files_of["d1-file"] == "/dev/fdset/0" and files_of["d1-o1-file"] == "/dev/fdset/1"
    assert files_of["vmctl-uefi-code"] == "/dev/fdset/2" and files_of["vmctl-uefi-vars"] == "/dev/fdset/3"


def test_without_passed_files_the_images_are_named_by_path() -> None:
    argv = spec(disks=[DiskSpec(id="d1", path="/img/a.qcow2")]).command_line(
        qemu_binary="qemu", run_dir=RUN, accel="tcg"
    )
    assert "-add-fd" not in argv
    assert json.loads(option(argv, "-blockdev")[0])["filename"] == "/img/a.qcow2"


def test_auto_is_vmctls_own_user_when_not_root_and_the_pools_as_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    assert QemuUser.resolve("auto") is None
    assert QemuUser.resolve(None) is None
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(LaunchError, match="from the pool"):
        QemuUser.resolve("auto")


def test_a_missing_user_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(LaunchError, match=r"no user 'vmctl-no-such-user' \(give a number"):
        QemuUser.resolve("vmctl-no-such-user")


def test_run_as_takes_names_numbers_and_a_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert QemuUser.resolve("nobody:0") == QemuUser(name="nobody", uid=NOBODY.pw_uid, gid=0)
    assert QemuUser.resolve("64123") == QemuUser(name="64123", uid=64123, gid=64123)  # no passwd entry
    assert QemuUser.resolve("64123:64124") == QemuUser(name="64123", uid=64123, gid=64124)
    with pytest.raises(LaunchError, match="no group"):
        QemuUser.resolve("nobody:vmctl-no-such-group")
    assert QemuUser.resolve("root") is None  # vmctl's own user: nothing to drop


def test_only_root_drops_to_another_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    with pytest.raises(LaunchError, match="only root"):
        QemuUser.resolve("nobody")


def test_setpriv_drops_uid_gid_groups_and_capabilities() -> None:
    prefix = QemuUser(name="q", uid=999, gid=995).command_prefix()
    assert prefix[0] == "setpriv" and prefix[-1] == "--"
    assert {"--reuid=999", "--regid=995", "--clear-groups", "--inh-caps=-all", "--no-new-privs"} <= set(prefix)


def test_a_run_dir_behind_a_closed_directory_is_out_of_reach() -> None:
    user = QemuUser(name="q", uid=64123, gid=64123)
    with tempfile.TemporaryDirectory(dir="/tmp") as top:  # pytest's own tmp root is closed (0700)
        os.chmod(top, 0o755)
        closed = Path(top) / "closed"
        (closed / "vm1").mkdir(parents=True)
        closed.chmod(0o700)
        with pytest.raises(LaunchError, match=f"{closed} is mode 0o700"):
            user.check_reachable(closed / "vm1", what="the run dir")
        closed.chmod(0o711)
        user.check_reachable(closed / "vm1", what="the run dir")


def test_a_kernel_qemu_reopens_must_be_readable_by_its_user_wherever_it_lies(tmp_path: Path) -> None:
    user = QemuUser(name="q", uid=64123, gid=64123)
    kernel = tmp_path / "vmlinuz"  # under pytest's closed tmp root: the fd reaches it all the same
    kernel.write_bytes(b"k")
    kernel.chmod(0o600)
    with pytest.raises(LaunchError, match="not readable by QEMU's user q"):
        user.check_readable(kernel)
    kernel.chmod(0o644)
    user.check_readable(kernel)


def test_a_run_dir_is_shared_with_qemus_group_only_and_sticky(tmp_path: Path) -> None:
    QemuUser(name="q", uid=64123, gid=64124).share_run_dir(tmp_path)
    info = tmp_path.stat()
    assert (info.st_uid, info.st_gid, info.st_mode & 0o7777) == (os.geteuid(), 64124, 0o1770)


def test_a_link_in_the_run_dir_is_never_opened_for_qemu(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    (tmp_path / "uefi-vars.fd").symlink_to(secret)
    with pytest.raises(LaunchError, match="cannot open"):
        open_for_qemu(PassedFile(tag="t", path=str(tmp_path / "uefi-vars.fd"), flags=os.O_RDWR, own=True))


def test_vmctls_own_files_are_made_afresh_never_through_a_link(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("keep")
    (tmp_path / "state.json.tmp").symlink_to(target)
    os.close(own_file(str(tmp_path / "state.json.tmp")))
    assert target.read_text() == "keep" and not (tmp_path / "state.json.tmp").is_symlink()


def test_files_opened_for_qemu_are_closed_after_the_block(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"")
    with opened([PassedFile(tag="a", path=str(tmp_path / "a"), flags=os.O_RDONLY)]) as fds:
        (fd,) = fds.values()
        os.fstat(fd)
    with pytest.raises(OSError):
        os.fstat(fd)


def test_an_unprivileged_postcopy_target_needs_a_userfaultfd_in_the_dev_it_sees(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sysctl, device = tmp_path / "sysctl", tmp_path / "userfaultfd"
    monkeypatch.setattr(privileges, "USERFAULTFD_SYSCTL", str(sysctl))
    monkeypatch.setattr(privileges, "USERFAULTFD_DEVICE", str(device))  # seen through /proc/PID/root
    owner = [(0, 0)]
    monkeypatch.setattr(privileges, "process_owner", lambda pid: owner[0])
    old, new = QEMUVersion(major=7, minor=2, micro=0), QEMUVersion(major=10, minor=0, micro=2)
    sysctl.write_text("0\n")
    device.write_bytes(b"")
    device.chmod(0o600)
    me = os.getpid()
    assert userfaultfd_refusal(me, version=old) is None  # root may
    owner[0] = (999, 995)
    assert "vm.unprivileged_userfaultfd=1" in str(userfaultfd_refusal(me, version=old))
    assert "private /dev" in str(userfaultfd_refusal(me, version=new))
    os.chown(device, 0, 995)
    device.chmod(0o660)
    assert userfaultfd_refusal(me, version=new) is None  # the device, from QEMU 8.1 on
    assert userfaultfd_refusal(me, version=old) is not None  # 7.2 knows only the syscall
    os.chown(device, 999, 0)
    device.chmod(0o600)
    assert userfaultfd_refusal(me, version=new) is None  # its own node, as in a private /dev
    sysctl.write_text("1\n")
    assert userfaultfd_refusal(me, version=old) is None
