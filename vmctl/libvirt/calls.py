"""libvirt calls with a bounded wait.

A libvirt call blocks in C until libvirtd answers, and libvirtd waits on QEMU (and on its own job
lock, up to 30 s) before it does. Each call here runs on a worker, so the caller waits at most its
timeout; a call that outlives it finishes on the worker, and its result is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

from vmctl.libvirt.errors import LibvirtTimeout, libvirt_error
from vmctl.libvirt.eventloop import libvirt_module
from vmctl.qmp.perprocess import PerProcess

T = TypeVar("T")

_workers = PerProcess(lambda: ThreadPoolExecutor(max_workers=8, thread_name_prefix="vmctl-libvirt"))


def bounded(what: str, timeout: float, call: Callable[..., T], *args: Any) -> T:
    """``call(*args)``, waiting at most ``timeout`` seconds; libvirt's errors become vmctl's."""
    libvirt = libvirt_module()
    future = _workers.get().submit(call, *args)
    try:
        return future.result(timeout=timeout)
    except FutureTimeout:
        raise LibvirtTimeout(f"{what}: libvirtd did not answer within {timeout:g}s") from None
    except libvirt.libvirtError as exc:
        raise libvirt_error(exc, what) from None
