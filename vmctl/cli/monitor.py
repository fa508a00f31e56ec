"""``vmctl qmp`` and ``vmctl events``: one QMP monitor, vmctl's socket or a libvirt domain's
(through libvirtd, or the ``virsh`` command), driven by hand or tailed."""

from __future__ import annotations

import json
import sys
import threading

from vmctl.cli import qmpshell
from vmctl.errors import InvalidArgument
from vmctl.qmp import Event, QMPMonitor, connect


def open_monitor(socket: str, *, libvirt: str | None, virsh: bool) -> QMPMonitor:
    """The monitor at ``socket``; with ``libvirt`` (a URI), ``socket`` names a domain instead."""
    if libvirt is None:
        if virsh:
            raise InvalidArgument("--virsh needs --libvirt URI")
        return connect(socket, name="cli", timeout=5)
    # libvirt-python is an optional dependency: imported only when asked for.
    from vmctl.libvirt import LibvirtMonitor, VirshMonitor

    if virsh:
        return VirshMonitor(libvirt, socket)
    return LibvirtMonitor.open(libvirt, socket)


def run_qmp(monitor: QMPMonitor, command: str | None, arguments: str | None) -> int:
    """The interactive shell, or ``command`` with ``arguments`` (a JSON object) run once."""
    try:
        if command is None:
            return qmpshell.interactive(monitor)
        parsed = json.loads(arguments) if arguments else {}
        if not isinstance(parsed, dict):
            raise InvalidArgument("the arguments must be a JSON object")
        return qmpshell.run_one(monitor, command, parsed, sys.stdout)
    finally:
        monitor.close()


def run_events(monitor: QMPMonitor) -> int:
    """Print each event as a JSON line until the monitor disconnects (or Ctrl-C)."""
    try:
        gone = threading.Event()

        def show(event: Event) -> None:
            line = {"event": event.name, "data": dict(event.data), "timestamp": event.timestamp}
            print(json.dumps(line), flush=True)

        monitor.on_event(show)
        monitor.on_disconnect(lambda error: gone.set())
        gone.wait()
    finally:
        monitor.close()
    return 0
