"""Values that describe a VM's life: QEMU's run state, resets, shutdowns, I/O errors and how QEMU ended.

``RunState`` lists QEMU's run states as QAPI names them; other lists of names (a migration's
steps, the privileges module's constants) look like it to ``duplicates`` but share only the shape.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from typing import Any

import attrs

from vmctl.model.names import disk_of_node


@attrs.frozen(kw_only=True)
class ExitStatus:
    """How QEMU ended; both fields are None for an adopted process (only its parent can know)."""

    code: int | None
    signal: int | None

    @classmethod
    def from_returncode(cls, returncode: int) -> ExitStatus:
        if returncode < 0:
            return cls(code=None, signal=-returncode)
        return cls(code=returncode, signal=None)

    def __str__(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal} ({signal.Signals(self.signal).name})"
        if self.code is not None:
            return f"exit code {self.code}"
        return "exited (status unknown: not our child)"


class RunState(enum.Enum):
    """QEMU's run states (QAPI ``RunState``)."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


@attrs.frozen(kw_only=True)
class VMStatus:
    run_state: RunState
    running: bool

    @classmethod
    def from_qmp(cls, status: dict[str, Any]) -> VMStatus:
        return cls(run_state=RunState(status["status"]), running=bool(status["running"]))


@attrs.frozen(kw_only=True)
class ResetEvent:
    """A RESET, classified: ``expected`` when vmctl asked for it (``vm.reset()``)."""

    expected: bool
    guest: bool
    reason: str
    timestamp: float


@attrs.frozen(kw_only=True)
class DiskIOError:
    """A BLOCK_IO_ERROR: a disk's image failed a guest read or write, and what QEMU did about it
    (``action``: ``stop`` pauses the guest, ``report`` passes the error to it, ``ignore``)."""

    disk_id: str | None  # None for a block node vmctl did not name
    node_name: str
    operation: str  # "read" or "write"
    action: str
    nospace: bool
    reason: str
    timestamp: float

    @classmethod
    def from_event(cls, data: Mapping[str, Any], timestamp: float) -> DiskIOError:
        node = str(data.get("node-name", ""))
        return cls(
            disk_id=disk_of_node(node),
            node_name=node,
            operation=str(data.get("operation", "")),
            action=str(data.get("action", "")),
            nospace=bool(data.get("nospace", False)),
            reason=str(data.get("reason", "")),
            timestamp=timestamp,
        )


@attrs.frozen(kw_only=True)
class ShutdownEvent:
    guest: bool
    reason: str
    timestamp: float


class ShutdownMethod(enum.Enum):
    AGENT = "agent"  # the guest powered off when its guest agent asked it to
    POWERDOWN = "powerdown"  # the guest powered off after an ACPI power button press
    QUIT = "quit"  # QEMU quit on a QMP quit
    TERMINATE = "terminate"  # QEMU exited on SIGTERM
    KILL = "kill"  # QEMU was killed with SIGKILL
    ALREADY_EXITED = "already-exited"


@attrs.frozen(kw_only=True)
class ShutdownResult:
    method: ShutdownMethod
    exit: ExitStatus
    seconds: float
