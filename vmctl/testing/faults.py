"""Faults injected into a monitor's commands, the ways a real QEMU fails them (for tests).

``with inject(vm.qmp, Fault.TIMEOUT, at=3): vm.hotplug_disk(...)`` makes the third command
sent through that monitor inside the block fail; every part of a VM shares its monitor, so the
fault lands wherever the operation is at that step. ``record(monitor)`` lists what an operation
sends, so a test can enumerate every step of it.

- ``ERROR``: QEMU answers with an error; it did nothing (the command never reaches it).
- ``TIMEOUT``: QEMU runs the command but its reply comes too late: the caller gets
  ``CommandTimeout`` (at once, not after the real timeout) and the reply is discarded.
- ``DROP``: QEMU runs the command, then the connection breaks: ``ConnectionLost`` for this and
  every later command on this monitor.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

import attrs

from vmctl.errors import CommandTimeout, ConnectionLost, GenericError
from vmctl.qmp import Monitor


class Fault(enum.Enum):
    ERROR = "error"
    TIMEOUT = "timeout"
    DROP = "drop"


@attrs.define
class Recording:
    """The commands sent through a monitor while recording (name, arguments)."""

    commands: list[tuple[str, Any]] = attrs.Factory(list)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.commands]


@attrs.define
class Injection:
    """What an injection did: the command it failed (``None`` if the block sent fewer than ``at``)."""

    fault: Fault
    at: int
    sent: int = 0
    failed: str | None = None


@contextlib.contextmanager
def record(monitor: Monitor) -> Iterator[Recording]:
    recording = Recording()
    real = monitor.execute

    def execute(command: str, arguments: Any = None, **kwargs: Any) -> Any:
        recording.commands.append((command, arguments))
        return real(command, arguments, **kwargs)

    with _replaced(monitor, execute):
        yield recording


@contextlib.contextmanager
def inject(monitor: Monitor, fault: Fault, *, at: int) -> Iterator[Injection]:
    """Fail the ``at``-th command (1-based) sent through ``monitor`` inside the block."""
    injection = Injection(fault=fault, at=at)
    real = monitor.execute

    def execute(command: str, arguments: Any = None, **kwargs: Any) -> Any:
        injection.sent += 1
        if injection.failed is not None and fault is Fault.DROP:
            raise ConnectionLost(f"{command}: the connection was dropped (injected)")
        if injection.sent != at:
            return real(command, arguments, **kwargs)
        injection.failed = command
        if fault is Fault.ERROR:
            raise GenericError(command=command, error_class="GenericError", desc="injected fault")
        real(command, arguments, **kwargs)  # QEMU runs it...
        if fault is Fault.TIMEOUT:  # ... and its reply is too late
            raise CommandTimeout(command=command, timeout=kwargs.get("timeout") or 0.0)
        monitor.close()  # ... and the connection breaks
        raise ConnectionLost(f"{command}: the connection was dropped (injected)")

    with _replaced(monitor, execute):
        yield injection


@contextlib.contextmanager
def _replaced(monitor: Monitor, execute: Any) -> Iterator[None]:
    # The monitor's own method, shadowed on this instance for the block only. Injections nest:
    # each wraps the one outside it, and puts it back when its block ends.
    outer = vars(monitor).get("execute")
    monitor.execute = execute  # type: ignore[method-assign]
    try:
        yield
    finally:
        if outer is None:
            del monitor.execute
        else:
            monitor.execute = outer  # type: ignore[method-assign]
