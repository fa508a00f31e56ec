from __future__ import annotations

import gzip
import io
import stat

from vmctl.testing.cpio import NewcArchive


def parse(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """A minimal newc reader, to check what the writer produced."""
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    offset = 0
    while True:
        assert data[offset : offset + 6] == b"070701"
        fields = [int(data[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rdev = fields[1], fields[6], (fields[9], fields[10])
        name_size = fields[11]
        name_start = offset + 110
        name = data[name_start : name_start + name_size - 1].decode()
        body_start = name_start + name_size + (-(110 + name_size) % 4)
        body = data[body_start : body_start + size]
        offset = body_start + size + (-size % 4)
        if name == "TRAILER!!!":
            return entries
        entries.append((name, mode, body, rdev))


def test_archive_holds_files_dirs_links_and_devices() -> None:
    archive = NewcArchive()
    archive.file("init", b"#!/bin/sh\n", mode=0o755)
    archive.file("lib/modules/virtio.ko", b"\x7fELF" + b"x" * 5)
    archive.symlink("bin/sh", "busybox")
    archive.char_device("dev/console", 5, 1)
    out = io.BytesIO()
    archive.write_gzip(out)
    entries = {name: (mode, body, rdev) for name, mode, body, rdev in parse(gzip.decompress(out.getvalue()))}
    assert entries["init"][1] == b"#!/bin/sh\n" and stat.S_IMODE(entries["init"][0]) == 0o755
    assert stat.S_ISDIR(entries["lib"][0]) and stat.S_ISDIR(entries["lib/modules"][0])
    assert entries["lib/modules/virtio.ko"][1] == b"\x7fELFxxxxx"
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0]) and entries["dev/console"][2] == (5, 1)
