"""Memory hotplug: a RAM backend object and a pc-dimm on it; unplug needs the guest's consent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs

from vmctl.errors import HotplugError, InvalidArgument, QMPError, WaitTimeout
from vmctl.model import MemorySpec, VirtioMemSpec
from vmctl.model.names import memory_backend_id as backend_id
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import device_present, not_released, remove_object, request_removal
from vmctl.ops.queries import ask, execute_idempotent
from vmctl.ops.rollback import Steps
from vmctl.ops.waiting import events_until
from vmctl.qmp import Event, QMPMonitor, Subscription

MIB = 1024 * 1024
ACPI_INSERT = 1  # ACPI_DEVICE_OST source: the guest handled an insertion
ACPI_EJECT = 3  # ACPI_DEVICE_OST source: the guest handled an eject request
#: ACPI _OST status codes that are not a refusal: success, and "ejection in progress".
_OST_NOT_REFUSED = frozenset({0, 0x84})
#: How many times an eject the guest refused is asked again.
EJECT_RETRIES = 5
T = TypeVar("T")


@attrs.frozen(kw_only=True)
class MemoryDevice:
    id: str
    size: int
    address: int
    slot: int
    hotplugged: bool

    @classmethod
    def from_qmp(cls, entry: dict[str, Any]) -> MemoryDevice:
        data = entry["data"]
        return cls(
            id=str(data.get("id", "")),
            size=int(data["size"]),
            address=int(data["addr"]),
            slot=int(data["slot"]),
            hotplugged=bool(data.get("hotplugged", False)),
        )


def hotplug_memory(
    qmp: QMPMonitor, log: Any, *, memory_id: str, size_mib: int, timeout: float | Deadline = 30.0
) -> MemorySpec:
    """Plug a DIMM of ``size_mib``, all within ``timeout``."""
    # The guest onlines memory in 128 MiB blocks: a smaller DIMM would never be usable.
    if not isinstance(size_mib, int) or isinstance(size_mib, bool) or size_mib <= 0 or size_mib % 128:
        raise InvalidArgument(f"memory {memory_id}: size must be a positive multiple of 128 MiB, not {size_mib!r}")
    limit = Deadline.after(timeout)

    def placed() -> MemorySpec:  # where QEMU put it: a migration target must put it there too
        device = next((d for d in memory_devices(limit.bind(qmp)) if d.id == memory_id), None)
        return MemorySpec(
            id=memory_id,
            size_mib=size_mib,
            slot=device.slot if device else None,
            addr=device.address if device else None,
        )

    memory = _plug(
        qmp, log, memory_id=memory_id, backend_mib=size_mib, device={"driver": "pc-dimm"}, limit=limit,
        then=placed,
    )  # fmt: skip
    log.bind(memory=memory_id).info("memory.hotplugged", size_mib=size_mib)
    return memory


def unplug_memory(qmp: QMPMonitor, log: Any, *, memory_id: str, timeout: float | Deadline = 30.0) -> None:
    """Remove a DIMM (the guest must offline it first; it does when the memory is movable),
    all within ``timeout``."""
    limit = Deadline.after(timeout)
    bound = log.bind(memory=memory_id)
    remove_dimm(qmp, bound, memory_id, limit, also_left=(f"object {backend_id(memory_id)}",))
    remove_object(limit.bind(qmp), backend_id(memory_id))
    bound.info("memory.unplugged")


def _plug(
    qmp: QMPMonitor,
    log: Any,
    *,
    memory_id: str,
    backend_mib: int,
    device: dict[str, Any],
    limit: Deadline,
    then: Callable[[], T],
) -> T:
    """A RAM backend object, then a memory device on it, then ``then()`` (what the caller asks
    of the new device), within ``limit``; if any of it fails, what was added goes again."""
    backend = backend_id(memory_id)
    forward = limit.bind(qmp)
    acpi = device["driver"] == "pc-dimm"  # a DIMM is plugged through ACPI; virtio-mem is not
    try:
        with qmp.events("ACPI_DEVICE_OST") as ost, Steps(log.bind(memory=memory_id)) as steps:
            steps.run(
                "object-add",
                lambda: forward.execute(
                    "object-add", {"qom-type": "memory-backend-ram", "id": backend, "size": backend_mib * MIB}
                ),
                lambda _: remove_object(qmp, backend),
            )
            steps.run(
                "device_add",
                lambda: forward.execute("device_add", {**device, "id": memory_id, "memdev": backend}),
                lambda _: _undo_plug(qmp, log, memory_id, ost if acpi else None, limit.timeout),
            )
            return then()
    except QMPError as exc:
        raise HotplugError(
            f"hotplug of memory {memory_id} failed and was rolled back: {exc}", remaining=tuple(steps.leftovers)
        ) from exc


def _undo_plug(qmp: QMPMonitor, log: Any, memory_id: str, ost: Subscription | None, timeout: float) -> None:
    """Remove a memory device just added. A guest asked to eject a DIMM it is still onlining
    refuses: first wait (bounded) until it reports the insertion handled."""
    if not device_present(qmp, memory_id):
        return
    if ost is not None:
        for event in events_until(ost, timeout):
            info = event.data.get("info", {})
            if info.get("device") == memory_id and info.get("source") == ACPI_INSERT:
                break
    remove_dimm(qmp, log, memory_id, timeout)


def remove_dimm(
    qmp: QMPMonitor, log: Any, memory_id: str, timeout: float | Deadline, also_left: tuple[str, ...] = ()
) -> None:
    """``remove_device`` for a DIMM, whose eject the guest may refuse for a while (it says so in
    ACPI_DEVICE_OST; it refuses one that comes while it still onlines the DIMM, which a plug
    followed at once by an unplug can meet): a refused eject is asked again, within ``timeout``."""
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    if not device_present(forward, memory_id):
        return
    refusals: list[int] = []

    def outcome(event: Event) -> bool:
        return event.name == "DEVICE_DELETED" or _refused_eject(event) is not None

    with qmp.events("DEVICE_DELETED", "ACPI_DEVICE_OST", match=_about(memory_id, outcome)) as outcomes:
        if not request_removal(forward, memory_id):
            return
        for event in events_until(outcomes, limit.remaining()):
            status = _refused_eject(event)
            if status is None:
                return  # DEVICE_DELETED
            refusals.append(status)
            if len(refusals) > EJECT_RETRIES:
                break
            log.warning("memory.eject_refused", status=status, asked=len(refusals))
            if not request_removal(forward, memory_id):
                return
    if not device_present(qmp, memory_id):  # one more look, past the deadline: the answer is the guest's
        return
    if refusals:
        statuses = ", ".join(f"{s:#x}" for s in refusals)
        raise HotplugError(
            f"the guest refused to release memory {memory_id} ({len(refusals)} times; ACPI _OST status {statuses})",
            remaining=(f"device {memory_id}", *also_left),
        )
    raise not_released("memory", memory_id, limit.timeout, also_left)


def _about(memory_id: str, wanted: Callable[[Event], bool]) -> Callable[[Event], bool]:
    def match(event: Event) -> bool:
        data = event.data if event.name == "DEVICE_DELETED" else event.data.get("info", {})
        device = data.get("device")
        return device == memory_id and wanted(event)

    return match


def _refused_eject(event: Event) -> int | None:
    """The guest's status code if ``event`` is its refusal of an eject request, else None."""
    if event.name != "ACPI_DEVICE_OST":
        return None
    info = event.data.get("info", {})
    status = info.get("status")
    if info.get("source") == ACPI_EJECT and isinstance(status, int) and status not in _OST_NOT_REFUSED:
        return status
    return None


def memory_devices(qmp: QMPMonitor) -> list[MemoryDevice]:
    return [MemoryDevice.from_qmp(e) for e in ask(qmp, "query-memory-devices") if e.get("type") == "dimm"]


def add_virtio_mem(
    qmp: QMPMonitor,
    log: Any,
    *,
    memory_id: str,
    max_size_mib: int,
    size_mib: int,
    port: int | None = None,
    timeout: float | Deadline = 30.0,
) -> VirtioMemSpec:
    """Add a virtio-mem device (on root ``port`` on q35; it cannot be unplugged again: resize
    it to 0 instead), and resize it to ``size_mib``, all within ``timeout``."""
    if not isinstance(max_size_mib, int) or max_size_mib <= 0 or max_size_mib % 128:
        raise InvalidArgument(f"virtio-mem {memory_id}: max size must be a positive multiple of 128 MiB")
    _check_virtio_mem_size(memory_id, size_mib, max_size_mib)
    spec = VirtioMemSpec(id=memory_id, max_size_mib=max_size_mib, size_mib=0, port=port)
    limit = Deadline.after(timeout)
    _plug(
        qmp, log, memory_id=memory_id, backend_mib=max_size_mib, device=spec.device_properties(), limit=limit,
        then=lambda: None,
    )  # fmt: skip
    return resize_virtio_mem(qmp, log, spec, size_mib, timeout=limit) if size_mib else spec


def resize_virtio_mem(
    qmp: QMPMonitor,
    log: Any,
    device: VirtioMemSpec,
    size_mib: int,
    *,
    wait: bool = True,
    timeout: float | Deadline = 30.0,
    requested: Callable[[VirtioMemSpec], Any] = lambda _: None,
) -> VirtioMemSpec:
    """Ask the guest to plug (or unplug) memory until the device provides ``size_mib``; with
    ``wait``, return once the guest did (MEMORY_DEVICE_SIZE_CHANGE), else ``WaitTimeout``.
    ``requested`` gets the resized device as soon as QEMU has the request (the guest may take
    its time, or fail to, but the request stands)."""
    _check_virtio_mem_size(device.id, size_mib, device.max_size_mib)
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    path = f"/machine/peripheral/{device.id}"
    resized = attrs.evolve(device, size_mib=size_mib)
    with qmp.events("MEMORY_DEVICE_SIZE_CHANGE", match={"id": device.id}) as changes:
        # Setting a size twice asks for the same thing: a late reply is answered by sending again.
        execute_idempotent(forward, "qom-set", {"path": path, "property": "requested-size", "value": size_mib * MIB})
        requested(resized)

        def reached() -> bool:
            return int(ask(forward, "qom-get", {"path": path, "property": "size"})) == size_mib * MIB

        waited = events_until(changes, limit.remaining())
        if wait and not reached() and not any(reached() for _ in waited):
            raise WaitTimeout(
                f"virtio-mem {device.id} did not reach {size_mib} MiB within {limit.timeout:g}s "
                "(is the guest's virtio_mem driver loaded?)"
            )
    log.bind(memory=device.id).info("virtio_mem.resized", size_mib=size_mib)
    return resized


def _check_virtio_mem_size(memory_id: str, size_mib: int, max_size_mib: int) -> None:
    if not isinstance(size_mib, int) or isinstance(size_mib, bool) or not 0 <= size_mib <= max_size_mib:
        raise InvalidArgument(f"virtio-mem {memory_id}: size must be 0..{max_size_mib} MiB, not {size_mib!r}")
    if size_mib % 2:
        raise InvalidArgument(f"virtio-mem {memory_id}: size must be a multiple of the 2 MiB block size")
