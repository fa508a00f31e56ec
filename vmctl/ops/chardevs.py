"""Character devices added at run time (a unix socket or a ring buffer), optionally exposed to
the guest as a named virtio-serial port."""

from __future__ import annotations

import os
import re
from typing import Any

from vmctl.errors import HotplugError, InvalidArgument, QMPError
from vmctl.model import Chardev, ChardevKind
from vmctl.model.names import SERIAL_CONTROLLER
from vmctl.model.pcie import Controller
from vmctl.model.validate import check_unix_path
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import ensure_controller, remove_device
from vmctl.ops.queries import ask
from vmctl.ops.rollback import Steps
from vmctl.qmp import QMPMonitor

Kind = ChardevKind
_PORT_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")


def hotplug_chardev(
    qmp: QMPMonitor,
    log: Any,
    *,
    chardev_id: str,
    kind: Kind,
    path: str | os.PathLike[str] | None = None,
    size: int = 65536,
    port_name: str | None = None,
    controller: Controller | None = None,
    timeout: float | Deadline = 30.0,
) -> Chardev:
    """Add a chardev; with ``port_name``, a virtio-serial port on it (and the virtio-serial
    ``controller`` first unless the VM has one), all within ``timeout``."""
    chardev = _validated(chardev_id, kind, path, size, port_name)
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    backend: dict[str, Any]
    if chardev.kind == "socket":
        address = {"type": "unix", "data": {"path": chardev.path}}
        backend = {"type": "socket", "data": {"addr": address, "server": True, "wait": False}}
    else:
        backend = {"type": "ringbuf", "data": {"size": chardev.size}}
    bound = log.bind(chardev=chardev_id)
    try:
        with Steps(bound) as steps:
            steps.run(
                "chardev-add",
                lambda: forward.execute("chardev-add", {"id": chardev_id, "backend": backend}),
                lambda _: _remove_chardev(qmp, chardev_id),
            )
            if port_name is not None:
                ensure_controller(qmp, steps, controller or Controller.serial(), limit)
                port = {
                    "driver": "virtserialport",
                    "id": chardev.port_id,
                    "chardev": chardev_id,
                    "name": port_name,
                    "bus": f"{SERIAL_CONTROLLER}.0",
                }
                steps.run(
                    "virtserialport",
                    lambda: forward.execute("device_add", port),
                    lambda _: remove_device(qmp, chardev.port_id, limit.timeout),
                )
    except QMPError as exc:
        raise HotplugError(
            f"hotplug of chardev {chardev_id} failed and was rolled back: {exc}", remaining=tuple(steps.leftovers)
        ) from exc
    bound.info("chardev.hotplugged", kind=kind, port=port_name)
    return chardev


def unplug_chardev(qmp: QMPMonitor, log: Any, *, chardev: Chardev, timeout: float | Deadline = 30.0) -> None:
    """Remove the port (if any), then the chardev, all within ``timeout``. Idempotent."""
    limit = Deadline.after(timeout)
    if chardev.port_name is not None:
        remove_device(qmp, chardev.port_id, limit)
    _remove_chardev(limit.bind(qmp), chardev.id)
    log.bind(chardev=chardev.id).info("chardev.unplugged")


def _validated(
    chardev_id: str, kind: Kind, path: str | os.PathLike[str] | None, size: int, port: str | None
) -> Chardev:
    if not isinstance(chardev_id, str) or not _ID.fullmatch(chardev_id):
        raise InvalidArgument(f"chardev id {chardev_id!r} must start with a letter (letters, digits, _ . -)")
    if port is not None and not _PORT_NAME.fullmatch(port):
        raise InvalidArgument(f"chardev {chardev_id}: port name {port!r} is not valid")
    if kind == "socket":
        if path is None:
            raise InvalidArgument(f"chardev {chardev_id}: a socket chardev needs a path")
        text = check_unix_path(f"chardev {chardev_id}", path)
        return Chardev(id=chardev_id, kind=kind, path=text, port_name=port)
    if kind == "ringbuf":
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size & (size - 1):
            raise InvalidArgument(f"chardev {chardev_id}: ringbuf size must be a power of two, not {size!r}")
        return Chardev(id=chardev_id, kind=kind, size=size, port_name=port)
    raise InvalidArgument(f"chardev {chardev_id}: kind must be socket or ringbuf, not {kind!r}")


def _remove_chardev(qmp: QMPMonitor, chardev_id: str) -> None:
    """chardev-remove, unless it is gone already."""
    if any(c.get("label") == chardev_id for c in ask(qmp, "query-chardev")):
        qmp.execute("chardev-remove", {"id": chardev_id})


def frontend_open(qmp: QMPMonitor, chardev_id: str) -> bool:
    """Whether the guest has opened its end of the chardev's device (a virtio-serial port: a
    program in the guest holds it open). False for a chardev QEMU does not have."""
    return any(c.get("label") == chardev_id and c.get("frontend-open") for c in ask(qmp, "query-chardev"))
