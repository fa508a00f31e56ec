"""Who QEMU runs as: an unprivileged user by default when vmctl is root, set before exec.

vmctl drops QEMU's privileges itself (``setpriv`` between vmctl and QEMU: uid, gid, no
supplementary groups, no capabilities, no new privileges), never with QEMU's ``-runas``, which
together with ``-sandbox elevateprivileges=deny`` kills QEMU with "Bad system call". QEMU then
opens nothing of the host's by path: the kernel, initrd, images and firmware are opened by vmctl
and passed by fd (the kernel and initrd must still be readable by that user, see ``PassedFile``).

The run dir is vmctl's (root's), shared with QEMU's group only, sticky: QEMU creates its sockets
and pidfile there, but cannot replace or remove what vmctl wrote (the state file above all,
which vmctl trusts at attach).
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

import attrs

from vmctl.errors import LaunchError
from vmctl.qmp.messages import QEMUVersion

#: Root's run dir for an unprivileged QEMU: rwx for root and QEMU's group, sticky, nothing for others.
RUN_DIR_MODE = 0o1770
#: The first QEMU that asks ``/dev/userfaultfd`` for a userfaultfd (else only the syscall, which
#: an unprivileged process gets for postcopy only with ``vm.unprivileged_userfaultfd=1``).
USERFAULTFD_DEVICE_SINCE = (8, 1)
USERFAULTFD_SYSCTL = "/proc/sys/vm/unprivileged_userfaultfd"
USERFAULTFD_DEVICE = "/dev/userfaultfd"


@attrs.frozen(kw_only=True)
class QemuUser:
    """The unprivileged user and group a QEMU runs as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def resolve(cls, run_as: str | None) -> QemuUser | None:
        """The user a spec's ``run_as`` names; ``None`` when QEMU runs as vmctl's own user.
        ``"auto"`` is a uid from the pool when vmctl is root (``vmctl.vm.isolation`` takes it),
        else vmctl's own user."""
        if run_as is None:
            return None
        if run_as == "auto":
            if os.geteuid() != 0:
                return None
            raise LaunchError("run_as='auto' as root takes a uid from the pool: launch through Isolation.confine")
        user_part, _, group_part = run_as.partition(":")
        uid, gid, name = _user(user_part)
        if group_part:
            gid = _group(group_part)
        if uid == os.geteuid() and gid == os.getegid():
            return None
        if os.geteuid() != 0:
            raise LaunchError(
                f"run_as={run_as!r}: only root can start QEMU as another user (vmctl runs as {os.geteuid()})"
            )
        return cls(name=name, uid=uid, gid=gid)

    def command_prefix(self) -> list[str]:
        """What runs QEMU as this user: ``setpriv`` execs it in the same process (same pid)."""
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--no-new-privs",
            "--",
        ]

    def share_run_dir(self, directory: Path) -> None:
        """Make ``directory`` root's, shared with this user's group only, sticky."""
        os.chown(directory, os.geteuid(), self.gid)
        os.chmod(directory, RUN_DIR_MODE)

    def check_reachable(self, path: str | os.PathLike[str], *, what: str) -> None:
        """``LaunchError`` unless this user can reach ``path``: every directory above it
        searchable (QEMU makes its sockets there)."""
        target = Path(path).resolve()
        for directory in reversed(target.parents):
            if not self._may(directory, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
                raise LaunchError(
                    f"{what} {path} is out of reach of QEMU's user {self.name} (uid {self.uid}): "
                    f"{directory} is mode {_mode(directory)}; let it in (o+x), or use another run_as"
                )

    def check_readable(self, path: str | os.PathLike[str]) -> None:
        """``LaunchError`` unless this user may read the file ``path`` itself (QEMU reopens it
        through the fd vmctl passes, so the directories above do not matter). A missing file is
        left to the open, which says so."""
        if Path(path).exists() and not self._may(Path(path), stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
            raise LaunchError(
                f"{path} is not readable by QEMU's user {self.name} (uid {self.uid}): mode {_mode(Path(path))}"
            )

    def _may(self, path: Path, owner: int, group: int, other: int) -> bool:
        try:
            info = path.stat()
        except OSError:
            return False
        if info.st_uid == self.uid:
            return bool(info.st_mode & owner)
        if info.st_gid == self.gid:  # QEMU has no supplementary groups
            return bool(info.st_mode & group)
        return bool(info.st_mode & other)


def userfaultfd_refusal(pid: int, *, version: QEMUVersion) -> str | None:
    """Why the QEMU ``pid`` cannot be a postcopy target (it needs a userfaultfd that handles
    kernel faults), or ``None`` if it can. Its /dev is the one it sees (``/proc/PID/root/dev``):
    its own, under a private /dev."""
    uid, gid = process_owner(pid)
    if uid == 0:
        return None
    try:
        sysctl = Path(USERFAULTFD_SYSCTL).read_text().strip()
    except OSError:
        sysctl = "0"
    if sysctl == "1":
        return None
    device = (version.major, version.minor) >= USERFAULTFD_DEVICE_SINCE
    if device:
        try:
            info = os.stat(f"/proc/{pid}/root{USERFAULTFD_DEVICE}")
        except OSError:
            pass
        else:
            rw = stat.S_IRUSR | stat.S_IWUSR
            if info.st_uid == uid:
                allowed = info.st_mode & rw == rw
            elif info.st_gid == gid:
                allowed = info.st_mode & (rw >> 3) == rw >> 3
            else:
                allowed = info.st_mode & (rw >> 6) == rw >> 6
            if allowed:
                return None
    how = (
        f"give it a private /dev (vmctl as root does: its own {USERFAULTFD_DEVICE}), or its group read-write "
        f"access to {USERFAULTFD_DEVICE} (chgrp {gid} {USERFAULTFD_DEVICE}; chmod 0660 {USERFAULTFD_DEVICE}), "
        "or set vm.unprivileged_userfaultfd=1"
        if device
        else f"QEMU {version} has only the syscall: set vm.unprivileged_userfaultfd=1 (sysctl)"
    )
    return f"the target's QEMU runs as uid {uid} and cannot get a userfaultfd for postcopy: {how}"


def process_owner(pid: int) -> tuple[int, int]:
    """The uid and gid a process runs as."""
    info = os.stat(f"/proc/{pid}")
    return info.st_uid, info.st_gid


def _user(text: str) -> tuple[int, int, str]:
    try:
        entry = pwd.getpwuid(int(text)) if text.isdigit() else pwd.getpwnam(text)
    except KeyError:
        if text.isdigit():  # a uid without a passwd entry (one per VM, say): its own gid
            return int(text), int(text), text
        raise LaunchError(f"run_as: there is no user {text!r} (give a number, or create the user)") from None
    return entry.pw_uid, entry.pw_gid, entry.pw_name


def _group(text: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return grp.getgrnam(text).gr_gid
    except KeyError:
        raise LaunchError(f"run_as: there is no group {text!r}") from None


def _mode(path: Path) -> str:
    try:
        return oct(stat.S_IMODE(path.stat().st_mode))
    except OSError as exc:
        return f"unknown ({exc.strerror})"
