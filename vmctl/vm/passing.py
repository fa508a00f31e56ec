"""The files vmctl opens for QEMU and passes by fd at launch (QEMU's user may not open them).

A file in the run dir, where QEMU may write, is opened only if it is vmctl's own regular file,
never through a link that a QEMU left there.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator

from vmctl.errors import LaunchError
from vmctl.model.vm import PassedFile


@contextlib.contextmanager
def opened(files: Iterable[PassedFile]) -> Iterator[dict[str, int]]:
    """Each file opened, by tag, for the block (QEMU keeps its own copies once started)."""
    fds: dict[str, int] = {}
    try:
        for file in files:
            fds[file.tag] = open_for_qemu(file)
        yield fds
    finally:
        for fd in fds.values():
            os.close(fd)


def open_for_qemu(file: PassedFile) -> int:
    flags = file.flags | os.O_CLOEXEC | (os.O_NOFOLLOW if file.own else 0)
    try:
        fd = os.open(file.path, flags)
    except OSError as exc:
        raise LaunchError(f"cannot open {file.path} for QEMU: {exc.strerror}") from None
    if file.own:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            os.close(fd)
            raise LaunchError(f"{file.path} is not vmctl's own file (owner uid {info.st_uid}): remove it")
    return fd


class Fd:
    """An fd to close (``contextlib.closing``)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        os.close(self.fd)


def own_file(path: str, mode: int = 0o600) -> int:
    """Create ``path`` afresh for writing, as vmctl's, never through a link (``O_EXCL``)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
