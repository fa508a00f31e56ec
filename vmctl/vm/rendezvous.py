"""Where two VMs of different uids meet for a migration on one host, and nowhere else.

The target's QEMU listens (migration, and the NBD server of a storage copy) on sockets in a
directory next to its run dir made for this migration: owned by the target's uid, with the
source's gid as its group, ``2710`` (setgid: the sockets the target makes there take the source's
group; QEMU's umask of 007 gives that group read-write). So the source's QEMU can connect to
exactly these sockets, the target's run dir stays closed to it, and no other VM's QEMU gets in.
Nothing is connected before the source itself connects: a setup step that fails leaves the target
waiting, as it was, and the next attempt meets it in the same directory. The directory goes when
the migration ends.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from pathlib import Path

import attrs

from vmctl.vm.privileges import process_owner


@attrs.frozen
class Rendezvous:
    path: Path

    @classmethod
    def between(cls, source_pid: int, target_pid: int, target_run_dir: Path) -> Rendezvous | None:
        """A rendezvous for QEMUs of different uids (``None`` when they share one)."""
        source_uid, source_gid = process_owner(source_pid)
        target_uid, _ = process_owner(target_pid)
        if source_uid == target_uid:
            return None
        path = target_run_dir.parent / f".{target_run_dir.name}.rv"
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(path)
            if (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (target_uid, source_gid, 0o2710):
                return cls(path)  # an earlier attempt's, where this target still listens
            shutil.rmtree(path)  # another pair's leftover
        path.mkdir(mode=0o700)
        os.chown(path, target_uid, source_gid)
        os.chmod(path, 0o2710)
        return cls(path)

    def socket(self, name: str) -> str:
        return str(self.path / name)

    def open_socket(self, name: str) -> None:
        """Let the source's group connect to a socket the target made here, should QEMU's umask
        not have (a socket not there yet is the migration's to find: its start fails)."""
        with contextlib.suppress(FileNotFoundError):
            os.chmod(self.path / name, 0o770)

    def close(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)
