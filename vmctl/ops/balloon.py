"""The memory balloon: ask the guest to give memory back (or take it again), and wait for it."""

from __future__ import annotations

from typing import Any

from vmctl.errors import BalloonUnavailable, DeviceNotActive, InvalidArgument, WaitTimeout
from vmctl.ops.deadline import Deadline
from vmctl.ops.waiting import events_until
from vmctl.qmp import QMPMonitor

PAGE = 4096


def balloon_bytes(qmp: QMPMonitor) -> int:
    """The guest's memory as the balloon sees it now (``query-balloon`` ``actual``)."""
    try:
        return int(qmp.execute("query-balloon")["actual"])
    except DeviceNotActive:
        raise BalloonUnavailable("no balloon device: launch the VM with VMSpec(balloon=True)") from None


def set_balloon(
    qmp: QMPMonitor, log: Any, target_bytes: int, *, wait: bool = True, timeout: float | Deadline = 30.0
) -> int:
    """Set the balloon target; with ``wait``, return once the guest reports reaching it (all
    within ``timeout``).

    Returns the guest memory the balloon reports. A guest without the virtio_balloon driver never
    moves the balloon: the wait then ends in ``WaitTimeout`` that says so.
    """
    if not isinstance(target_bytes, int) or isinstance(target_bytes, bool) or target_bytes < 64 * 1024 * 1024:
        raise InvalidArgument(f"balloon target must be at least 64 MiB in bytes, not {target_bytes!r}")
    limit = Deadline.after(timeout)
    forward = limit.bind(qmp)
    before = balloon_bytes(forward)
    with qmp.events("BALLOON_CHANGE") as changes:
        try:
            forward.execute("balloon", {"value": target_bytes})
        except DeviceNotActive:
            raise BalloonUnavailable("no balloon device: launch the VM with VMSpec(balloon=True)") from None
        log.info("balloon.set", target=target_bytes, before=before)
        if not wait:
            return before
        actual = before
        if abs(actual - target_bytes) >= PAGE:
            for event in events_until(changes, limit.remaining()):
                actual = int(event.data["actual"])
                if abs(actual - target_bytes) < PAGE:
                    break
            else:
                moved = "moved" if actual != before else "did not move"
                raise WaitTimeout(
                    f"the balloon {moved} but reached {actual} bytes, not {target_bytes}, within {limit.timeout:g}s"
                    + ("" if actual != before else " (is the guest's virtio_balloon driver loaded?)")
                )
    log.info("balloon.reached", actual=actual)
    return actual
