"""vmctl's QMP transport: a sans-I/O connection core and two faces on it.

``vmctl.qmp.connect`` gives the threaded ``Monitor``; ``vmctl.qmp.aio.connect`` the asyncio
``AsyncMonitor``. Both drive one ``QMPProtocol`` each, so they share every rule. ``QMPMonitor``
is what ``vmctl.ops`` asks of a monitor (``vmctl.libvirt`` has two more).
"""

from vmctl.qmp.connstate import ConnectionState
from vmctl.qmp.events import EventFilter, Subscription, data_contains
from vmctl.qmp.interface import QMPMonitor
from vmctl.qmp.messages import Event, Greeting, QEMUVersion
from vmctl.qmp.monitor import Monitor, connect
from vmctl.qmp.protocol import DEFAULT_MAX_MESSAGE_SIZE, DEFAULT_QUIET_COMMANDS, DEFAULT_QUIET_EVENTS, QMPProtocol
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.timeouts import TimeoutPolicy

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_QUIET_COMMANDS",
    "DEFAULT_QUIET_EVENTS",
    "ConnectionState",
    "Event",
    "EventFilter",
    "Greeting",
    "Monitor",
    "QEMUVersion",
    "QMPMonitor",
    "QMPProtocol",
    "QMPSchema",
    "Subscription",
    "TimeoutPolicy",
    "connect",
    "data_contains",
]
