"""A uid and gid of its own for every QEMU a root vmctl starts, from a pool of ids.

The ids need no ``/etc/passwd`` entry: ``setpriv`` takes numbers, QEMU never looks its user up,
and the files it must reach are vmctl's (the run dir, chowned to the VM's gid) or passed by fd.
The default range, 900000000 and up, is above the subordinate ids ``useradd`` hands out
(``/etc/subuid``: 100000 to 600100000); a pool that meets a passwd entry or a subordinate range is
refused.

A uid is taken by locking its file under ``lock_dir`` (root's, 0700) with ``flock``. The locked
file is passed to QEMU, which keeps it open for its whole life: the lock goes when QEMU goes,
however it ends (shutdown, crash, SIGKILL), whether or not a control plane runs then, and a
restarted control plane has nothing to take over. Since a QEMU could drop that lock itself, a
uid is also never given while any process on the host runs as it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs

from vmctl.errors import LaunchError, PoolExhausted
from vmctl.logs import get_logger

log = get_logger(__name__)

DEFAULT_FIRST: Final = 900_000_000
DEFAULT_SIZE: Final = 1024
DEFAULT_LOCK_DIR: Final = Path("/run/vmctl/uid-pool")
#: The last id a pool may use: uid_t is 32 bits, and tools that read ids as signed ints agree below 2**31.
_LAST_ID: Final = 2**31 - 2
#: ``VMCTL_UID_POOL=FIRST:SIZE`` (and ``VMCTL_UID_POOL_DIR``) configure the default pool.
POOL_ENV: Final = "VMCTL_UID_POOL"
POOL_DIR_ENV: Final = "VMCTL_UID_POOL_DIR"
_SUBORDINATE_FILES = ("/etc/subuid", "/etc/subgid")


@attrs.frozen(kw_only=True)
class UidPool:
    """The ids ``first`` to ``first + size - 1``, each a uid and a gid of the same number."""

    first: int = DEFAULT_FIRST
    size: int = DEFAULT_SIZE
    lock_dir: Path = attrs.field(default=DEFAULT_LOCK_DIR, converter=Path)

    def __attrs_post_init__(self) -> None:
        for name in ("first", "size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise LaunchError(f"uid pool: {name} must be a positive whole number, not {value!r}")
        if self.first < 65536 or self.first + self.size - 1 > _LAST_ID:
            raise LaunchError(f"uid pool: ids {self.first}..{self.first + self.size - 1} must lie in 65536..{_LAST_ID}")

    @classmethod
    def from_env(cls) -> UidPool:
        """The pool ``VMCTL_UID_POOL`` (``FIRST:SIZE``) and ``VMCTL_UID_POOL_DIR`` name, else the default."""
        first, size = DEFAULT_FIRST, DEFAULT_SIZE
        configured = os.environ.get(POOL_ENV)
        if configured:
            try:
                first_text, size_text = configured.split(":")
                first, size = int(first_text), int(size_text)
            except ValueError:
                raise LaunchError(f"{POOL_ENV}={configured!r}: write FIRST:SIZE, e.g. 900000000:1024") from None
        return cls(first=first, size=size, lock_dir=Path(os.environ.get(POOL_DIR_ENV) or DEFAULT_LOCK_DIR))

    @property
    def ids(self) -> range:
        return range(self.first, self.first + self.size)

    def take(self) -> Lease:
        """A uid no live process runs as and no other VM holds, locked for the caller; it goes to
        the QEMU started with it. ``PoolExhausted`` when every id is taken."""
        self._check_range()
        directory = self._ready_lock_dir()
        busy = uids_in_use()
        for uid in self.ids:
            if uid in busy:
                continue
            fd = os.open(directory / str(uid), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            if uid in uids_in_use():  # a process took the id between the scan and the lock
                os.close(fd)
                continue
            return Lease(uid=uid, fd=fd)
        raise PoolExhausted(
            f"every id of the uid pool {self.first}..{self.first + self.size - 1} is held by a live VM; "
            f"enlarge it ({POOL_ENV}=FIRST:SIZE) or end a VM"
        )

    def holder(self, uid: int) -> bool:
        """Whether ``uid`` is taken now (its lock held)."""
        try:
            fd = os.open(self.lock_dir / str(uid), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def _check_range(self) -> None:
        named = [entry for entry in pwd.getpwall() if entry.pw_uid in self.ids]
        if named:
            raise LaunchError(
                f"uid pool {self.first}..{self.first + self.size - 1} holds the user {named[0].pw_name} "
                f"(uid {named[0].pw_uid}): choose another range ({POOL_ENV}=FIRST:SIZE)"
            )
        for path in _SUBORDINATE_FILES:
            for owner, start, count in _subordinate_ranges(Path(path)):
                if start < self.first + self.size and self.first < start + count:
                    raise LaunchError(
                        f"uid pool {self.first}..{self.first + self.size - 1} meets {owner}'s subordinate ids "
                        f"{start}..{start + count - 1} in {path}: choose another range ({POOL_ENV}=FIRST:SIZE)"
                    )

    def _ready_lock_dir(self) -> Path:
        self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(self.lock_dir)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or stat.S_IMODE(info.st_mode) & 0o077:
            raise LaunchError(f"uid pool: {self.lock_dir} must be a directory of vmctl's user, mode 0700")
        return self.lock_dir


@attrs.define(kw_only=True)
class Lease:
    """A uid (and the gid of the same number) locked for one VM; ``fd`` holds the lock."""

    uid: int
    fd: int

    @property
    def gid(self) -> int:
        return self.uid

    def close(self) -> None:
        """Let go of vmctl's copy of the lock: QEMU holds its own, or nothing started and the id is free."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def uids_in_use() -> set[int]:
    """Every uid a process on the host runs as (real, effective, saved or filesystem)."""
    found: set[int] = set()
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                for line in _lines(f"/proc/{entry.name}/status"):
                    if line.startswith("Uid:"):
                        found.update(int(field) for field in line.split()[1:])
                        break
    return found


def _lines(path: str) -> Iterator[str]:
    with open(path, encoding="ascii", errors="replace") as file:
        yield from file


def _subordinate_ranges(path: Path) -> list[tuple[str, int, int]]:
    try:
        text = path.read_text()
    except OSError:
        return []
    ranges = []
    for line in text.splitlines():
        parts = line.strip().split(":")
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            ranges.append((parts[0], int(parts[1]), int(parts[2])))
    return ranges
