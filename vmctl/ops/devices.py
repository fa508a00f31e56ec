"""Device-tree helpers shared by the device operations."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import attrs

from vmctl.errors import CommandError, CommandTimeout, DeviceNotFound, EventTimeout, HotplugError, OperationTimeout
from vmctl.model import DiskSpec, NicSpec, VirtioMemSpec
from vmctl.model.names import pci_addr_from_devfn
from vmctl.model.pcie import Controller
from vmctl.ops.deadline import Deadline
from vmctl.ops.queries import ask
from vmctl.ops.rollback import Steps
from vmctl.qmp import QMPMonitor


def device_present(qmp: QMPMonitor, device_id: str) -> bool:
    """Whether a device with this id is in QEMU's device tree (under /machine/peripheral)."""
    children = ask(qmp, "qom-list", {"path": "/machine/peripheral"})
    return any(child.get("name") == device_id for child in children)


def remove_device(
    qmp: QMPMonitor,
    device_id: str,
    timeout: float | Deadline,
    *,
    kind: str = "device",
    also_left: Sequence[str] = (),
) -> None:
    """device_del and wait for the guest to let go (DEVICE_DELETED for this id), all within
    ``timeout``. If it does not, ``HotplugError`` names the device and ``also_left`` (what the
    caller would remove after it)."""
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    if not device_present(forward, device_id):
        return
    with qmp.events("DEVICE_DELETED", match={"device": device_id}) as deleted:
        if not request_removal(forward, device_id):
            return
        try:
            deleted.get(limit.left("waiting for DEVICE_DELETED"))
        except (EventTimeout, OperationTimeout):
            if device_present(qmp, device_id):  # one more look, past the deadline: the answer is the guest's
                raise not_released(kind, device_id, limit.timeout, also_left) from None


def request_removal(qmp: QMPMonitor, device_id: str) -> bool:
    """Send device_del; False when the device is already gone. Asking again while an unplug is
    under way, or a request whose reply is late, is no error: the outcome is the guest's."""
    try:
        qmp.execute("device_del", {"id": device_id})
    except DeviceNotFound:
        return False
    except CommandTimeout:
        pass  # QEMU may have asked the guest all the same: wait for the outcome
    except CommandError as exc:
        if "in the process of unplug" not in exc.desc and "already" not in exc.desc:
            raise
    return True


def not_released(kind: str, device_id: str, timeout: float, also_left: Sequence[str]) -> HotplugError:
    return HotplugError(
        f"the guest did not release {kind} {device_id} within {timeout:g}s",
        remaining=(f"device {device_id}", *also_left),
    )


def pci_address(qmp: QMPMonitor, device_id: str) -> str:
    """The slot.function a PCI device got, as ``-device ...,addr=`` takes it."""
    devfn = qmp.execute("qom-get", {"path": f"/machine/peripheral/{device_id}", "property": "addr"})
    return pci_addr_from_devfn(int(devfn))


Placed = TypeVar("Placed", DiskSpec, NicSpec, VirtioMemSpec)


def pin_pci_address(qmp: QMPMonitor, device: Placed) -> Placed:
    """``device`` with the PCI address QEMU chose for it, so that a migration target lays out its
    bus alike; a device behind a root port (q35), one already pinned, or a SCSI disk is as it is."""
    if device.port is not None or device.pci_addr is not None or getattr(device, "bus", None) == "scsi":
        return device
    return attrs.evolve(device, pci_addr=pci_address(qmp, device.id))


def ensure_controller(qmp: QMPMonitor, steps: Steps, controller: Controller, timeout: float | Deadline) -> None:
    """Add a bus controller (virtio-scsi, virtio-serial) unless it is there, as an undoable step."""
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    if not device_present(forward, controller.id):
        steps.run(
            f"{controller.driver} controller",
            lambda: forward.execute("device_add", controller.device_properties()),
            lambda _: remove_device(qmp, controller.id, limit.timeout),
        )


def object_exists(qmp: QMPMonitor, object_id: str) -> bool:
    """Whether QEMU has the user-created object ``object_id`` (a backend, a secret, credentials)."""
    return any(o.get("name") == object_id for o in ask(qmp, "qom-list", {"path": "/objects"}))


def remove_object(qmp: QMPMonitor, object_id: str) -> None:
    """object-del, unless the object is gone already."""
    if object_exists(qmp, object_id):
        qmp.execute("object-del", {"id": object_id})
