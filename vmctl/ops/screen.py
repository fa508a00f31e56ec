"""The guest's screen and keyboard: a screenshot into a file vmctl opens, keys, an NMI."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final, Literal

from vmctl.errors import InvalidArgument, QMPError
from vmctl.qmp import QMPMonitor

ImageFormat = Literal["png", "ppm"]
SCREENDUMP_TAG: Final = "vmctl:screendump"
_QCODE = re.compile(r"[a-z0-9_]{1,32}")


def screendump(qmp: QMPMonitor, log: Any, path: str | os.PathLike[str], *, format: ImageFormat = "png") -> Path:
    """Write the guest's display to ``path`` (PNG, or PPM). vmctl opens the file and passes it,
    so QEMU's user needs no way to ``path``; a failed dump leaves no file."""
    if format not in ("png", "ppm"):
        raise InvalidArgument(f"screendump format must be png or ppm, not {format!r}")
    target = Path(path).absolute()
    if not target.parent.is_dir():
        raise InvalidArgument(f"screendump: {target.parent} is not a directory")
    # QEMU picks an fd of the set by access mode: write-only, as it opens the dump itself.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    fdset: int | None = None
    done = False
    try:
        fdset = int(qmp.execute("add-fd", {"opaque": SCREENDUMP_TAG}, fds=[fd])["fdset-id"])
        arguments: dict[str, Any] = {"filename": f"/dev/fdset/{fdset}"}
        if format == "png":
            arguments["format"] = "png"  # QEMU 7.1+; PPM is the default and the only older one
        qmp.execute("screendump", arguments, timeout=30)
        done = True
    finally:
        os.close(fd)
        if fdset is not None:
            with contextlib.suppress(QMPError):
                qmp.execute("remove-fd", {"fdset-id": fdset})
        if not done:
            with contextlib.suppress(OSError):
                target.unlink()
    log.info("screen.dumped", path=str(target), format=format)
    return target


def send_keys(qmp: QMPMonitor, log: Any, keys: Sequence[str], *, hold_ms: int | None = None) -> None:
    """Press ``keys`` together and release them (``["ctrl", "alt", "delete"]``), by QEMU's key
    names (QKeyCode: ``a``, ``ret``, ``shift``, ``f1``...)."""
    if isinstance(keys, str) or not keys or not all(isinstance(k, str) and _QCODE.fullmatch(k) for k in keys):
        raise InvalidArgument(f"keys must be a non-empty list of QEMU key names (a, ret, ctrl...), not {keys!r}")
    arguments: dict[str, Any] = {"keys": [{"type": "qcode", "data": key} for key in keys]}
    if hold_ms is not None:
        if not isinstance(hold_ms, int) or isinstance(hold_ms, bool) or not 0 < hold_ms <= 10_000:
            raise InvalidArgument(f"hold_ms must be 1..10000, not {hold_ms!r}")
        arguments["hold-time"] = hold_ms
    qmp.execute("send-key", arguments)
    log.debug("screen.keys_sent", keys=list(keys))


def inject_nmi(qmp: QMPMonitor, log: Any) -> None:
    """Send a non-maskable interrupt to the guest (a hung guest's kernel may dump its state)."""
    qmp.execute("inject-nmi")
    log.info("vm.nmi_injected")
