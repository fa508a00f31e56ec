"""QMP through libvirtd: ``qemuMonitorCommand`` for commands, ``qemuMonitorEventRegister`` for events.

libvirt keeps QEMU's monitor socket; this monitor asks libvirtd to pass each command on. Use it
to read (the read-only procedures of ``vmctl.ops`` run on it unchanged); change a domain through
libvirt's own APIs (``LibvirtVM``), or libvirt's domain XML stops saying what QEMU has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from vmctl.errors import ConnectionLost
from vmctl.libvirt.errors import DomainNotRunning, LibvirtConnectionLost, libvirt_error
from vmctl.libvirt.eventloop import libvirt_module, open_connection
from vmctl.libvirt.relay import RelayedMonitor, event_from_relay
from vmctl.qmp.timeouts import TimeoutPolicy


class LibvirtMonitor(RelayedMonitor):
    """The QMP monitor of one libvirt domain. ``open(uri, name)`` makes one with its own connection."""

    def __init__(
        self,
        domain: Any,
        *,
        timeouts: TimeoutPolicy | None = None,
        owns_connection: bool = False,
        watch_lifecycle: bool = True,
    ) -> None:
        """``watch_lifecycle=False`` when the caller already watches the domain's lifecycle on this
        connection (libvirt takes one such callback per domain and connection) and calls
        ``domain_stopped`` itself."""
        libvirt = libvirt_module()
        # One fd per command, from libvirt 8.2 (qemuMonitorCommandWithFiles).
        max_fds = 1 if libvirt.getVersion() >= 8_002_000 else 0
        super().__init__(domain.name(), timeouts=timeouts, max_fds=max_fds)
        self._libvirt = libvirt
        self._domain = domain
        self._conn = domain.connect()
        self._owns_connection = owns_connection
        import libvirt_qemu

        self._libvirt_qemu = libvirt_qemu
        self._event_callback: int | None = None
        self._lifecycle_callback: int | None = None
        self._close_callback_set = False
        try:
            self._event_callback = libvirt_qemu.qemuMonitorEventRegister(
                self._conn, domain, None, self._on_qemu_event, None, 0
            )
            if watch_lifecycle:
                # QEMU gone (destroyed, crashed, shut down): waiters learn it now, not at their timeouts.
                self._lifecycle_callback = self._conn.domainEventRegisterAny(
                    domain, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_lifecycle, None
                )
            if owns_connection:
                self._conn.registerCloseCallback(self._on_connection_closed, None)
                self._close_callback_set = True
        except libvirt.libvirtError as exc:
            self._owns_connection = False  # the caller closes what it opened
            self._close_relay()
            self._workers.shutdown(wait=False)
            raise libvirt_error(exc, f"{self.name}: cannot hear QEMU's events") from None

    @classmethod
    def open(cls, uri: str, name: str, *, timeouts: TimeoutPolicy | None = None) -> LibvirtMonitor:
        """Connect to ``uri`` and take the monitor of the domain called ``name``."""
        with domain_at(uri, name) as (_, domain):
            return cls(domain, timeouts=timeouts, owns_connection=True)

    @property
    def domain(self) -> Any:
        """The ``libvirt.virDomain`` this monitor talks to."""
        return self._domain

    def _relay(self, message: str, fds: Sequence[int], timeout: float) -> str:
        try:
            if fds:
                reply, _ = self._libvirt_qemu.qemuMonitorCommandWithFiles(self._domain, message, list(fds), 0)
                return str(reply)
            return str(self._libvirt_qemu.qemuMonitorCommand(self._domain, message, 0))
        except self._libvirt.libvirtError as exc:
            error = libvirt_error(exc, f"{self.name}: libvirt did not pass the command on")
            if isinstance(error, ConnectionLost):
                self._lost(error)
            raise error from None

    def _on_qemu_event(
        self, conn: Any, domain: Any, name: str, seconds: int, micros: int, details: str | None, opaque: Any
    ) -> None:
        # On libvirt's event-loop thread: deliver and return (callbacks run on vmctl's own thread).
        try:
            self._deliver(event_from_relay(name, seconds, micros, details))
        except Exception:
            self._log.exception("qmp.event_delivery_failed", name=name)

    def _on_lifecycle(self, conn: Any, domain: Any, event: int, detail: int, opaque: Any) -> None:
        if event == self._libvirt.VIR_DOMAIN_EVENT_STOPPED:
            self.domain_stopped()

    def domain_stopped(self) -> None:
        """The domain's QEMU is gone: waiters and later commands get ``DomainNotRunning``."""
        self._lost(DomainNotRunning(f"{self.name}: the domain stopped"), expected=True)

    def _on_connection_closed(self, conn: Any, reason: int, opaque: Any) -> None:
        self._lost(LibvirtConnectionLost(f"{self.name}: the connection to libvirtd closed", code=reason))

    def _close_relay(self) -> None:
        # A connection that is gone took the callbacks along: nothing to undo then.
        if self._event_callback is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._libvirt_qemu.qemuMonitorEventDeregister(self._conn, self._event_callback)
        if self._lifecycle_callback is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(self._lifecycle_callback)
        if self._owns_connection:
            with contextlib.suppress(self._libvirt.libvirtError):
                if self._close_callback_set:
                    self._conn.unregisterCloseCallback()
                self._conn.close()


@contextlib.contextmanager
def domain_at(uri: str, name: str) -> Iterator[tuple[Any, Any]]:
    """A new connection to ``uri`` and its domain called ``name``; the connection is closed if the
    lookup, or what the caller makes of them, raises (else it is the caller's)."""
    conn = open_connection(uri)
    try:
        try:
            domain = conn.lookupByName(name)
        except libvirt_module().libvirtError as exc:
            raise libvirt_error(exc, f"no domain {name!r} at {uri}") from None
        yield conn, domain
    except BaseException:
        conn.close()
        raise
