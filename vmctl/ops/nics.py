"""NIC hotplug: the control plane opens the tap device and passes QEMU its fds.

Hotplug: open /dev/net/tun (TUNSETIFF; one fd per queue, multiqueue when queues > 1) -> getfd
for each fd -> netdev_add tap with those fds -> device_add. Every step has its undo beside it.
QEMU holds the tap from then on; when it lets go (netdev_del), a non-persistent tap vanishes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from vmctl.errors import (
    CommandError,
    DeviceError,
    DeviceNotFound,
    HotplugError,
    QMPError,
)
from vmctl.model import NicSpec
from vmctl.model.names import netdev_id, tap_fd_name
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import remove_device
from vmctl.ops.rollback import Steps
from vmctl.qmp import QMPMonitor

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFF_MULTI_QUEUE = 0x0100


def open_tap(name: str | None, queues: int) -> tuple[str, list[int]]:
    """Create (or attach to) a tap interface; returns its name and one fd per queue."""
    flags = _IFF_TAP | _IFF_NO_PI | (_IFF_MULTI_QUEUE if queues > 1 else 0)
    wanted = (name or "tap%d").encode()
    fds: list[int] = []
    try:
        for _ in range(queues):
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            fds.append(fd)
            request = struct.pack("16sH22x", wanted, flags)
            answer = fcntl.ioctl(fd, _TUNSETIFF, request)
            wanted = answer[:16].rstrip(b"\0")  # later queues attach to the same interface
    except OSError as exc:
        for fd in fds:
            os.close(fd)
        hint = " (creating taps needs CAP_NET_ADMIN)" if exc.errno == errno.EPERM else ""
        raise DeviceError(f"cannot open tap {name or '(new)'}: {exc.strerror}{hint}") from None
    return wanted.decode(), fds


def hotplug_nic(qmp: QMPMonitor, log: Any, nic: NicSpec, *, timeout: float | Deadline = 30.0) -> NicSpec:
    """Open ``nic``'s tap (the one it names, or a new one), pass its fds, add the netdev and the
    device (behind its root port on q35). Returns the NIC as plugged (with its tap's name)."""
    with opened_tap(nic) as (opened, fds):
        return plug_tap(qmp, log, opened, fds, timeout=timeout)


@contextlib.contextmanager
def opened_tap(wanted: NicSpec) -> Iterator[tuple[NicSpec, list[int]]]:
    """The tap of ``wanted`` opened (one fd per queue), and the NIC with the tap's name (the
    kernel's choice when ``wanted`` names none), so that a journal can record it before QEMU is
    asked for anything. The fds are closed at the end: QEMU holds its own copies by then."""
    tap_name, fds = open_tap(wanted.tap, wanted.queues)
    try:
        yield attrs.evolve(wanted, tap=tap_name), fds
    finally:
        for fd in fds:
            os.close(fd)


def plug_tap(qmp: QMPMonitor, log: Any, nic: NicSpec, fds: list[int], *, timeout: float | Deadline = 30.0) -> NicSpec:
    """Pass an opened tap's fds to QEMU, add the netdev on them and the guest's device, all
    within ``timeout`` (the undos have their own bounds: see ``vmctl.ops.deadline``)."""
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    nic_id = nic.id
    bound = log.bind(nic=nic_id, tap=nic.tap)
    netdev = netdev_id(nic_id)
    fd_names = [tap_fd_name(nic_id, i) for i in range(nic.queues)]
    try:
        with Steps(bound) as steps:
            for fd, fd_name in zip(fds, fd_names, strict=True):
                steps.run(f"getfd {fd_name}", _getfd(forward, fd, fd_name), _closefd_step(qmp, fd_name))
            netdev_arguments: dict[str, Any] = {"type": "tap", "id": netdev}
            if nic.queues == 1:
                netdev_arguments["fd"] = fd_names[0]
            else:
                netdev_arguments["fds"] = ":".join(fd_names)
            steps.run(
                "netdev_add",
                lambda: forward.execute("netdev_add", netdev_arguments),
                lambda _: _delete_netdev(qmp, netdev),
            )
            steps.run(
                "device_add",
                lambda: forward.execute("device_add", nic.device_properties()),
                lambda _: remove_device(qmp, nic_id, limit.timeout),
            )
    except QMPError as exc:
        raise HotplugError(
            f"hotplug of nic {nic_id} failed and was rolled back: {exc}", remaining=tuple(steps.leftovers)
        ) from exc
    bound.info("nic.hotplugged", mac=nic.mac, queues=nic.queues)
    return nic


def _getfd(qmp: QMPMonitor, fd: int, fd_name: str) -> Callable[[], str]:
    def give() -> str:
        qmp.execute("getfd", {"fdname": fd_name}, fds=[fd])
        return fd_name

    return give


def _closefd_step(qmp: QMPMonitor, fd_name: str) -> Callable[[object], None]:
    return lambda _: _closefd(qmp, fd_name)


def _closefd(qmp: QMPMonitor, fd_name: str) -> None:
    # netdev_add takes the named fd out of the monitor's list; then there is nothing to close.
    with contextlib.suppress(CommandError):
        qmp.execute("closefd", {"fdname": fd_name})


def unplug_nic(qmp: QMPMonitor, log: Any, *, nic_id: str, timeout: float | Deadline = 30.0) -> None:
    """Remove the NIC once the guest releases it, then its tap backend, all within ``timeout``. Idempotent."""
    limit = Deadline.after(timeout)
    bound = log.bind(nic=nic_id)
    remove_device(qmp, nic_id, limit, kind="nic", also_left=(f"netdev {netdev_id(nic_id)}",))
    _delete_netdev(limit.bind(qmp), netdev_id(nic_id))
    bound.info("nic.unplugged")


def _delete_netdev(qmp: QMPMonitor, netdev: str) -> None:
    with contextlib.suppress(DeviceNotFound):  # gone already
        qmp.execute("netdev_del", {"id": netdev})


def set_link(qmp: QMPMonitor, log: Any, *, nic_id: str, up: bool) -> None:
    """Raise or drop a NIC's link: the guest sees its carrier come or go (so does the backend)."""
    qmp.execute("set_link", {"name": nic_id, "up": up})
    log.bind(nic=nic_id).info("nic.link", up=up)
