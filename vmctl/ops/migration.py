"""Live migration's commands: capabilities and parameters, the incoming side's listen, the start
(its late reply checked), what a QEMU's own migration is doing, and an orphan's cancel. A
migration under way is followed in ``live_migration``."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

from vmctl.errors import (
    CommandError,
    InvalidArgument,
    MigrationError,
    WaitTimeout,
)
from vmctl.ops.queries import ask, execute_checked, execute_idempotent
from vmctl.ops.waiting import events_until
from vmctl.qmp import QMPMonitor, Subscription

TERMINAL = frozenset({"completed", "failed", "cancelled"})
POSTCOPY = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: The run states of a source whose own migration completed ("finish-migrate" a moment before
#: QEMU moves it to "postmigrate").
_MIGRATED_AWAY = frozenset({"finish-migrate", "postmigrate"})


def wait_status(events: Subscription, status: str, timeout: float, what: str) -> None:
    """Read MIGRATION events until ``status``; a terminal status on the way is an error."""
    for event in events_until(events, timeout):
        seen = str(event.data.get("status"))
        if seen == status:
            return
        if seen in TERMINAL:
            raise MigrationError(f"{what} ended ({seen}) before reaching {status}", status=seen)
    raise WaitTimeout(f"{what} did not reach {status} within {timeout:g}s")


def wait_terminal(events: Subscription, timeout: float) -> str:
    """Read MIGRATION events until a terminal status (``WaitTimeout`` after ``timeout``)."""
    for event in events_until(events, timeout):
        seen = str(event.data.get("status"))
        if seen in TERMINAL:
            return seen
    raise WaitTimeout(f"the migration did not end within {timeout:g}s")


def set_capabilities(
    qmp: QMPMonitor, wanted: Mapping[str, bool], *, replaced: dict[str, bool] | None = None
) -> dict[str, bool]:
    """Set the capabilities this QEMU knows; returns the previous states, for restoring (also put
    in ``replaced`` before anything is sent, so that a caller can restore after any failure)."""
    current = {c["capability"]: bool(c["state"]) for c in ask(qmp, "query-migrate-capabilities")}
    unknown = [name for name, on in wanted.items() if on and name not in current]
    if unknown:
        raise InvalidArgument(f"this QEMU does not support migration capabilities: {', '.join(unknown)}")
    previous = {name: current[name] for name in wanted if name in current}
    if replaced is not None:
        replaced.update(previous)
    changes = [{"capability": name, "state": on} for name, on in wanted.items() if name in current]
    execute_idempotent(qmp, "migrate-set-capabilities", {"capabilities": changes})
    return previous


def set_parameters(
    qmp: QMPMonitor, wanted: Mapping[str, Any], *, replaced: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Set migration parameters; returns the previous values, for restoring (and puts them in
    ``replaced`` first). A parameter this QEMU's schema lacks is refused before anything is set
    (QEMU versions differ in them)."""
    if not wanted:
        return {}
    current = ask(qmp, "query-migrate-parameters")
    # What QEMU reports it knows; the schema (one large query per QEMU) only for the others.
    unknown = [
        name for name in wanted if name not in current and not qmp.schema.has_argument("migrate-set-parameters", name)
    ]
    if unknown:
        raise InvalidArgument(f"QEMU {qmp.version} has no migration parameters {', '.join(unknown)}")
    previous = {name: current[name] for name in wanted if name in current}
    if replaced is not None:
        replaced.update(previous)
    execute_idempotent(qmp, "migrate-set-parameters", dict(wanted))
    return previous


def cancel_orphan(qmp: QMPMonitor, *, timeout: float = 10.0) -> str:
    """Cancel a migration that nobody follows any more (its control plane died) and wait for it
    to end; returns how it ended. Cancelled, the source keeps the guest (QEMU resumes it if it
    was running); but a cancel can come too late: then it ``completed``."""
    with qmp.events("MIGRATION") as events:
        with contextlib.suppress(CommandError):  # it may have just ended
            qmp.execute("migrate_cancel")
        status = outgoing_status(qmp)
        return status if status in TERMINAL or status == "none" else wait_terminal(events, timeout)


def outgoing_status(qmp: QMPMonitor) -> str:
    """The status of this QEMU's own outgoing migration ("none" if it has begun none).
    ``query-migrate`` reports the incoming migration a QEMU was started for as "completed" until
    an outgoing one begins, so a guest that migrated in would pass for one that migrated away:
    only a source that sent its guest away is in a post-migration run state."""
    status = str(ask(qmp, "query-migrate").get("status", "none"))
    if status == "completed" and ask(qmp, "query-status").get("status") not in _MIGRATED_AWAY:
        return "none"
    return status


def wait_for_end(qmp: QMPMonitor, *, timeout: float, outgoing: bool) -> str:
    """Wait until this side's migration (its ``outgoing`` one, or its incoming one) is no
    longer under way; returns its status."""
    with qmp.events("MIGRATION") as events:
        status = outgoing_status(qmp) if outgoing else str(ask(qmp, "query-migrate").get("status", "none"))
        if status in TERMINAL or status == "none":
            return status
        return wait_terminal(events, timeout)


def listen_incoming(target: QMPMonitor, uri: str) -> None:
    """Make an incoming QEMU (``-incoming defer``) listen on ``uri``. QEMU takes this once: a
    retry after a late reply finds it listening already, which is fine on the same address."""
    listening = _incoming_addresses(target)
    if listening is None:
        execute_checked(target, "migrate-incoming", {"uri": uri}, took=lambda: _incoming_addresses(target) is not None)
        listening = _incoming_addresses(target) or []
    if not any(_same_address(uri, address) for address in listening):
        raise MigrationError(f"the target listens for the migration on {listening} already, not {uri}", status="setup")


def _incoming_addresses(target: QMPMonitor) -> list[dict[str, Any]] | None:
    info = ask(target, "query-migrate")
    return list(info["socket-address"]) if "socket-address" in info else None


def _same_address(uri: str, address: Mapping[str, Any]) -> bool:
    """Whether QEMU's listening ``address`` is the one ``uri`` asked for. QEMU reports the host
    numerically (and flags ipv4/ipv6), so a TCP address is matched by its port."""
    kind, _, rest = uri.partition(":")
    if kind == "unix":
        return address.get("type") == "unix" and address.get("path") == rest
    return address.get("type") == "inet" and str(address.get("port")) == rest.rpartition(":")[2]


def start(source: QMPMonitor, uri: str) -> None:
    """``migrate``; when its reply is late, QEMU's own status tells whether it has begun (then
    it is followed like any other) or not (then the caller's error stands)."""
    execute_checked(
        source,
        "migrate",
        {"uri": uri},
        took=lambda: outgoing_status(source) not in ("none", "failed", "cancelled"),
    )
