"""CPU hotplug with the slots QEMU offers in ``query-hotpluggable-cpus``."""

from __future__ import annotations

from typing import Any

import attrs

from vmctl.errors import ConnectionLost, HotplugError, InvalidArgument, QMPError
from vmctl.model.names import CPU_ID_PREFIX
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import remove_device
from vmctl.ops.queries import ask
from vmctl.qmp import QMPMonitor

_ID_PREFIX = CPU_ID_PREFIX


@attrs.frozen(kw_only=True)
class CpuSlot:
    type: str
    props: dict[str, int]
    qom_path: str | None

    @classmethod
    def from_qmp(cls, entry: dict[str, Any]) -> CpuSlot:
        return cls(type=str(entry["type"]), props=dict(entry["props"]), qom_path=entry.get("qom-path"))

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(self.props.get(k, 0) for k in ("node-id", "socket-id", "die-id", "core-id", "thread-id"))

    @property
    def device_id(self) -> str:
        return _ID_PREFIX + "-" + "-".join(str(v) for v in self.key)

    @property
    def hotplugged_by_us(self) -> bool:
        return self.qom_path is not None and self.qom_path.startswith(f"/machine/peripheral/{_ID_PREFIX}")


def cpu_slots(qmp: QMPMonitor) -> list[CpuSlot]:
    return sorted((CpuSlot.from_qmp(e) for e in ask(qmp, "query-hotpluggable-cpus")), key=lambda s: s.key)


def hotplug_cpus(qmp: QMPMonitor, log: Any, count: int, *, timeout: float | Deadline = 30.0) -> list[str]:
    """Plug ``count`` CPUs into the lowest free slots, all within ``timeout``; all or none (a
    failure unplugs the added ones)."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidArgument(f"CPU count must be a positive whole number, not {count!r}")
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    free = [s for s in cpu_slots(forward) if s.qom_path is None]
    if count > len(free):
        raise InvalidArgument(f"only {len(free)} more CPU(s) fit (raise max_cpus in the VM spec)")
    added: list[str] = []
    try:
        for slot in free[:count]:
            added.append(slot.device_id)  # before it is sent: a timed-out device_add may have plugged it
            forward.execute("device_add", {"driver": slot.type, "id": slot.device_id, **slot.props})
    except QMPError as exc:
        remaining = [device for device in reversed(added) if not _remove(qmp, device, limit.timeout)]
        raise HotplugError(f"CPU hotplug failed and was rolled back: {exc}", remaining=tuple(remaining)) from exc
    log.info("cpus.hotplugged", cpus=added)
    return added


def unplug_cpus(qmp: QMPMonitor, log: Any, count: int, *, timeout: float | Deadline = 30.0) -> list[str]:
    """Unplug the ``count`` most recently plugged CPUs (those vmctl plugged), all within
    ``timeout``; the guest must release them."""
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise InvalidArgument(f"CPU count must be a positive whole number, not {count!r}")
    limit = Deadline.after(timeout)
    ours = [s for s in reversed(cpu_slots(limit.bind(qmp))) if s.hotplugged_by_us]
    if count > len(ours):
        raise InvalidArgument(f"only {len(ours)} hotplugged CPU(s) can be unplugged")
    removed = []
    for slot in ours[:count]:
        if not _remove(qmp, slot.device_id, limit):
            raise HotplugError(
                f"the guest did not release CPU {slot.device_id} within {limit.timeout:g}s",
                remaining=(slot.device_id,),
            )
        removed.append(slot.device_id)
    log.info("cpus.unplugged", cpus=removed)
    return removed


def _remove(qmp: QMPMonitor, device_id: str, timeout: float | Deadline) -> bool:
    """Whether the CPU is gone (``False`` when QEMU cannot be asked: it may still be there)."""
    try:
        remove_device(qmp, device_id, timeout)
    except ConnectionLost:
        return False
    except (HotplugError, QMPError):
        try:
            return not any(s.device_id == device_id and s.qom_path for s in cpu_slots(qmp))
        except QMPError:  # it cannot be told: it may still be there
            return False
    return True
