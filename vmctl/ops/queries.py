"""Asking QEMU, and commands whose reply came too late.

Queries change nothing, so one that fails or whose reply is late is asked once more before an
operation gives up on what it needed to know (a lost connection is not retried). A command whose
reply is late may or may not have taken effect: ``execute_checked`` asks QEMU which, and
``execute_idempotent`` sends again one that does the same when sent twice.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from vmctl.errors import CommandError, CommandTimeout, ConnectionLost, OutcomeUnknown, QMPError
from vmctl.qmp import QMPMonitor


def ask(qmp: QMPMonitor, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    try:
        return qmp.execute(command, arguments)
    except (CommandError, CommandTimeout):
        return qmp.execute(command, arguments)


def execute_checked(
    qmp: QMPMonitor, command: str, arguments: Mapping[str, Any] | None = None, *, took: Callable[[], bool]
) -> Any:
    """Send ``command``; if its reply is late, ``took()`` tells from QEMU's state whether it took
    effect (then it is done, and its result ``None``) or not (then the ``CommandTimeout`` stands).
    If QEMU cannot be asked either, ``OutcomeUnknown``."""
    try:
        return qmp.execute(command, arguments)
    except CommandTimeout as late:
        try:
            done = took()
        except ConnectionLost:
            raise
        except QMPError as exc:
            raise OutcomeUnknown(f"{command}: its reply was late, and asking what it did failed: {exc}") from late
        if not done:
            raise
        return None


def execute_idempotent(qmp: QMPMonitor, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    """Send a command that does the same when sent twice; if its reply is late, once more, so
    that the caller knows it took."""
    try:
        return qmp.execute(command, arguments)
    except CommandTimeout:
        return qmp.execute(command, arguments)


def barrier(qmp: QMPMonitor) -> None:
    """Return once QEMU has run every command sent before (it runs them in order): after a late
    reply, the command is then known to be done, though not whether it succeeded."""
    ask(qmp, "query-status")
