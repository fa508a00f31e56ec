"""One deadline for a whole operation: ``timeout=`` on a public call bounds every command it sends.

An operation of several commands (a hotplug: add-fd, two blockdev-adds, device_add, a query)
makes one ``Deadline`` from its caller's ``timeout`` and runs its forward steps on
``deadline.bind(qmp)``: a view of the monitor whose every command and event wait gets only what
is left. Its undos run on the monitor itself, with their own bounds, so that a timeout never
leaves half a device behind for want of time to take it away.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs

from vmctl.errors import OperationTimeout
from vmctl.qmp import QMPMonitor
from vmctl.qmp.callbacks import DisconnectCallback, EventCallback
from vmctl.qmp.events import Match, Subscription
from vmctl.qmp.interface import ExecuteOptions
from vmctl.qmp.messages import Event, QEMUVersion
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.timeouts import check_timeout, deadline

if TYPE_CHECKING:
    from typing_extensions import Unpack


@attrs.frozen
class Deadline:
    """When an operation given ``timeout`` seconds must be done (``time.monotonic()``)."""

    timeout: float
    at: float

    @classmethod
    def after(cls, timeout: float | Deadline) -> Deadline:
        """A deadline ``timeout`` seconds from now (checked before anything is sent), or the one given."""
        if isinstance(timeout, Deadline):
            return timeout
        seconds = check_timeout(timeout)
        return cls(seconds, deadline(seconds))

    def left(self, step: str) -> float:
        """The seconds left for ``step``; ``OperationTimeout`` when none are."""
        remaining = self.at - time.monotonic()
        if remaining <= 0:
            raise OperationTimeout(step=step, timeout=self.timeout)
        return remaining

    def remaining(self) -> float:
        """The seconds left, 0 once none are (for a wait that ends quietly at the deadline)."""
        return max(0.0, self.at - time.monotonic())

    def bind(self, qmp: QMPMonitor) -> QMPMonitor:
        """``qmp`` as seen by this operation's forward steps: nothing waits past the deadline."""
        return _Bounded(qmp, self)


@attrs.frozen
class _Bounded:
    """A monitor whose waits end at a deadline (a command's own shorter timeout still holds)."""

    _qmp: QMPMonitor
    _deadline: Deadline

    @property
    def name(self) -> str:
        return self._qmp.name

    @property
    def version(self) -> QEMUVersion:
        return self._qmp.version

    @property
    def schema(self) -> QMPSchema:
        return self._qmp.schema

    @property
    def is_connected(self) -> bool:
        return self._qmp.is_connected

    def execute(
        self, command: str, arguments: Mapping[str, Any] | None = None, **options: Unpack[ExecuteOptions]
    ) -> Any:
        left = self._deadline.left(command)
        asked = options.get("timeout")
        options["timeout"] = left if asked is None else min(asked, left)
        return self._qmp.execute(command, arguments, **options)

    def supports(self, command: str) -> bool:
        return self._qmp.supports(command)

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> Subscription:
        return self._qmp.events(*names, match=match, maxsize=maxsize)

    def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event:
        return self._qmp.wait_event(name, match=match, timeout=min(timeout, self._deadline.left(name)))

    def on_event(self, callback: EventCallback, *names: str, match: Match = None) -> Callable[[], None]:
        return self._qmp.on_event(callback, *names, match=match)

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        return self._qmp.on_disconnect(callback)

    def close(self) -> None:
        raise TypeError("an operation's view of the monitor cannot close it")
