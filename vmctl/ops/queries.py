"""Queries change nothing in QEMU, so one that fails or whose reply is late is asked once more
before an operation gives up on what it needed to know (a lost connection is not retried)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmctl.errors import CommandError, CommandTimeout
from vmctl.qmp import Monitor


def ask(qmp: Monitor, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
    try:
        return qmp.execute(command, arguments)
    except (CommandError, CommandTimeout):
        return qmp.execute(command, arguments)
