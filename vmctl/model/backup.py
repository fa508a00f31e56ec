"""A backup as a control plane keeps it: its checkpoint, what it is incremental from, its files."""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

import attrs

from vmctl.errors import InvalidArgument

_NAME: Final = re.compile(r"[A-Za-z0-9_.-]{1,40}")


def check_checkpoint_name(name: object) -> str:
    """A checkpoint's name: 1 to 40 of letters, digits, ``_``, ``.`` and ``-``."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidArgument(f"a checkpoint name is 1 to 40 of A-Z a-z 0-9 _ . -, not {name!r}")
    return name


def _frozen(value: Mapping[str, str] | Mapping[str, int]) -> Mapping[str, object]:
    return MappingProxyType(dict(value))


@attrs.frozen(kw_only=True)
class Backup:
    """One backup of some of a VM's disks, all at one instant.

    ``checkpoint`` names that instant: a later ``backup(since=checkpoint)`` holds only what the
    guest wrote after it. ``since`` is the checkpoint this one is incremental from (``None``: a
    full backup). ``files`` maps each disk id to the qcow2 file written; to restore a disk, keep
    the chain: the full backup's file, then every incremental's after it, in order
    (``vmctl.restore_disk``)."""

    checkpoint: str
    since: str | None
    files: Mapping[str, str] = attrs.field(converter=_frozen)
    #: Bytes each file takes on the host (an incremental: about the changed clusters).
    sizes: Mapping[str, int] = attrs.field(converter=_frozen)
    started: float  # wall-clock time (time.time()) of the instant the backup holds
    finished: float
