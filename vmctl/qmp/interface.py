"""What ``vmctl.ops`` needs of a QMP monitor, so that its procedures run on any of them.

vmctl's own ``Monitor`` (its socket to QEMU) is one; ``vmctl.libvirt.LibvirtMonitor`` (QMP
through libvirtd's RPC) and ``vmctl.libvirt.VirshMonitor`` (through ``virsh``) are the others. All
three take their methods from ``vmctl.qmp.threaded.ThreadedMonitor``, where they are documented;
this protocol restates the signatures on purpose (a protocol declares what others define), and
keeps no docstrings that would drift from theirs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, TypedDict

from vmctl.qmp.callbacks import DisconnectCallback, EventCallback
from vmctl.qmp.events import Match, Subscription
from vmctl.qmp.messages import Event, QEMUVersion
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.transport import FileDescriptor


class ExecuteOptions(TypedDict, total=False):
    """``QMPMonitor.execute``'s keyword options, for a monitor that wraps another and passes them on."""

    fds: Sequence[FileDescriptor]
    timeout: float | None
    oob: bool


class QMPMonitor(Protocol):
    """A QMP monitor: commands with bounded waits, event subscriptions, QEMU's version and schema."""

    @property
    def name(self) -> str: ...

    @property
    def version(self) -> QEMUVersion: ...

    @property
    def schema(self) -> QMPSchema: ...

    @property
    def is_connected(self) -> bool: ...

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[FileDescriptor] = (),
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any: ...

    def supports(self, command: str) -> bool: ...

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> Subscription: ...

    def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event: ...

    def on_event(self, callback: EventCallback, *names: str, match: Match = None) -> Callable[[], None]: ...

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]: ...

    def close(self) -> None: ...
