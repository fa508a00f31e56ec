"""libvirt's event loop: one thread per process, running before the first connection opens.

libvirt delivers domain events and QEMU's monitor events, and sends the keepalives that tell a
dead daemon from a quiet one, only from a registered event loop that someone runs.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from structlog.typing import FilteringBoundLogger

from vmctl.logs import get_logger

log: FilteringBoundLogger = get_logger(__name__)

_lock = threading.Lock()
_registered = False
_running_in: int | None = None  # the pid whose thread runs the loop (a forked child needs its own)


def libvirt_module() -> Any:
    """``import libvirt``, with a clear error when the optional extra is not installed."""
    try:
        import libvirt
    except ImportError:
        from vmctl.errors import VmctlError

        raise VmctlError("vmctl.libvirt needs libvirt-python: pip install 'vmctl[libvirt]'") from None
    return libvirt


def ensure_event_loop() -> None:
    """Register libvirt's default event loop once and keep one daemon thread running it."""
    global _registered, _running_in
    libvirt = libvirt_module()
    with _lock:
        if _running_in == os.getpid():
            return
        if not _registered:
            libvirt.virEventRegisterDefaultImpl()
            _registered = True
        threading.Thread(target=_run, args=(libvirt,), name="vmctl-libvirt-events", daemon=True).start()
        _running_in = os.getpid()


def _run(libvirt: Any) -> None:
    while True:
        try:
            libvirt.virEventRunDefaultImpl()
        except Exception:  # a callback's failure must not end event delivery for every domain
            log.exception("libvirt.event_loop_error")


def open_connection(uri: str) -> Any:
    """A read-write connection to ``uri`` with keepalives on (a dead daemon is noticed in ~15 s)."""
    from vmctl.libvirt.errors import libvirt_error

    libvirt = libvirt_module()
    ensure_event_loop()
    try:
        conn = libvirt.open(uri)
        conn.setKeepAlive(5, 3)
    except libvirt.libvirtError as exc:
        raise libvirt_error(exc, f"cannot connect to {uri}") from None
    return conn
