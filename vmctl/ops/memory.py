"""Memory hotplug: a RAM backend object and a pc-dimm on it; unplug needs the guest's consent."""

from __future__ import annotations

from typing import Any

import attrs

from vmctl.errors import HotplugError, InvalidArgument, QMPError
from vmctl.ops.devices import remove_device
from vmctl.ops.rollback import Steps
from vmctl.qmp import Monitor

MIB = 1024 * 1024


@attrs.frozen(kw_only=True)
class MemorySpec:
    """Hotplugged memory: a pc-dimm ``id`` of ``size_mib``."""

    id: str
    size_mib: int
    slot: int | None = None  # where QEMU put it: a migration target must put it there too
    addr: int | None = None


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


def backend_id(memory_id: str) -> str:
    return f"{memory_id}-ram"


def hotplug_memory(qmp: Monitor, log: Any, *, memory_id: str, size_mib: int, timeout: float = 30.0) -> MemorySpec:
    # The guest onlines memory in 128 MiB blocks: a smaller DIMM would never be usable.
    if not isinstance(size_mib, int) or isinstance(size_mib, bool) or size_mib <= 0 or size_mib % 128:
        raise InvalidArgument(f"memory {memory_id}: size must be a positive multiple of 128 MiB, not {size_mib!r}")
    bound = log.bind(memory=memory_id)
    backend = backend_id(memory_id)
    try:
        with Steps(bound) as steps:
            steps.run(
                "object-add",
                lambda: qmp.execute(
                    "object-add", {"qom-type": "memory-backend-ram", "id": backend, "size": size_mib * MIB}
                ),
                lambda _: qmp.execute("object-del", {"id": backend}),
            )
            steps.run(
                "device_add",
                lambda: qmp.execute(
                    "device_add", {"driver": "pc-dimm", "id": memory_id, "memdev": backend}, timeout=timeout
                ),
            )
    except QMPError as exc:
        raise HotplugError(
            f"hotplug of memory {memory_id} failed and was rolled back: {exc}", remaining=tuple(steps.leftovers)
        ) from exc
    placed = next((d for d in memory_devices(qmp) if d.id == memory_id), None)
    bound.info("memory.hotplugged", size_mib=size_mib)
    return MemorySpec(
        id=memory_id,
        size_mib=size_mib,
        slot=placed.slot if placed else None,
        addr=placed.address if placed else None,
    )


def unplug_memory(qmp: Monitor, log: Any, *, memory_id: str, timeout: float = 30.0) -> None:
    """Remove a DIMM (the guest must offline it first; it does when the memory is movable)."""
    bound = log.bind(memory=memory_id)
    remove_device(qmp, memory_id, timeout, kind="memory", also_left=(f"object {backend_id(memory_id)}",))
    objects = {o["name"] for o in qmp.execute("qom-list", {"path": "/objects"})}
    if backend_id(memory_id) in objects:
        qmp.execute("object-del", {"id": backend_id(memory_id)})
    bound.info("memory.unplugged")


def memory_devices(qmp: Monitor) -> list[MemoryDevice]:
    return [MemoryDevice.from_qmp(e) for e in qmp.execute("query-memory-devices") if e.get("type") == "dimm"]
