"""Rebuilding a disk from its backups: the full backup's file, then each incremental's, in order.

The files are read as one chain, each incremental over the ones before it (its unwritten
clusters read through to them), given to ``qemu-img convert`` as a ``json:`` description: no
backup file is changed, and none names another.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Sequence
from typing import Any, Final, Literal

from vmctl.errors import InvalidArgument

#: How long one restore may take (qemu-img convert of a whole disk).
RESTORE_TIMEOUT: Final = 3600.0


def restore_disk(
    files: Sequence[str | os.PathLike[str]],
    dest: str | os.PathLike[str],
    *,
    format: Literal["qcow2", "raw"] = "qcow2",
    timeout: float = RESTORE_TIMEOUT,
) -> None:
    """Rebuild a disk into the new image ``dest`` from its full backup and the incrementals after
    it, in order (``Backup.files`` of each, oldest first)."""
    if not files:
        raise InvalidArgument("restore_disk needs the full backup's file, then the incrementals'")
    if format not in ("qcow2", "raw"):
        raise InvalidArgument(f"restore_disk writes qcow2 or raw, not {format!r}")
    for file in files:
        if not os.path.isfile(file):
            raise InvalidArgument(f"backup file {file} does not exist")
    if os.path.exists(dest):
        raise InvalidArgument(f"{dest} exists already: restore_disk makes a new image")
    chain: dict[str, Any] | None = None
    for file in files:
        chain = {"driver": "qcow2", "file": {"driver": "file", "filename": os.fspath(file)}, "backing": chain}
    try:
        done = subprocess.run(
            ["qemu-img", "convert", "-O", format, f"json:{json.dumps(chain)}", os.fspath(dest)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        done = None
    if done is None or done.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(dest)
        why = f"it took longer than {timeout:g}s" if done is None else done.stderr.strip()
        raise InvalidArgument(f"cannot restore into {dest}: {why}")
