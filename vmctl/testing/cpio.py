"""Write a Linux initramfs: a gzip-compressed cpio archive in the "newc" format.

Written here rather than with the ``cpio`` tool so that building the test guest needs no root
(device nodes are entries in the archive, not files on disk) and no extra package.
"""

from __future__ import annotations

import gzip
import stat
from typing import BinaryIO

import attrs

_TRAILER = "TRAILER!!!"


@attrs.frozen(kw_only=True)
class Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


class NewcArchive:
    def __init__(self) -> None:
        self._entries: list[Entry] = []
        self._names: set[str] = set()

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._add(Entry(name=name, mode=stat.S_IFDIR | mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self._add(Entry(name=name, mode=stat.S_IFREG | mode, data=data))

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self._add(Entry(name=name, mode=stat.S_IFLNK | 0o777, data=target.encode()))

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self._add(Entry(name=name, mode=stat.S_IFCHR | mode, rdev=(major, minor)))

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            parent = "/".join(parts[:depth])
            if parent not in self._names:
                self.directory(parent)

    def _add(self, entry: Entry) -> None:
        if entry.name in self._names:
            raise ValueError(f"duplicate archive entry {entry.name}")
        self._names.add(entry.name)
        self._entries.append(entry)

    def write_gzip(self, out: BinaryIO) -> None:
        with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=6, mtime=0) as compressed:
            for inode, entry in enumerate([*self._entries, Entry(name=_TRAILER, mode=0)], start=1):
                compressed.write(_header(entry, inode if entry.name != _TRAILER else 0))
                compressed.write(entry.data)
                compressed.write(b"\0" * (-len(entry.data) % 4))


def _header(entry: Entry, inode: int) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = [
        inode,
        entry.mode,
        0,  # uid
        0,  # gid
        2 if stat.S_ISDIR(entry.mode) else 1,  # nlink
        0,  # mtime
        len(entry.data),
        0,  # devmajor
        0,  # devminor
        entry.rdev[0],
        entry.rdev[1],
        len(name),
        0,  # check
    ]
    header = b"070701" + b"".join(b"%08X" % value for value in fields) + name
    return header + b"\0" * (-len(header) % 4)
