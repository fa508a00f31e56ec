"""vmctl's QMP transport: a sans-I/O protocol core and a thread-safe synchronous monitor."""

from vmctl.qmp.events import EventFilter, Subscription, data_contains
from vmctl.qmp.messages import Event, Greeting, QEMUVersion
from vmctl.qmp.monitor import DEFAULT_QUIET_COMMANDS, DEFAULT_QUIET_EVENTS, Monitor, connect
from vmctl.qmp.protocol import DEFAULT_MAX_MESSAGE_SIZE, QMPProtocol
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.timeouts import TimeoutPolicy

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "DEFAULT_QUIET_COMMANDS",
    "DEFAULT_QUIET_EVENTS",
    "Event",
    "EventFilter",
    "Greeting",
    "Monitor",
    "QEMUVersion",
    "QMPProtocol",
    "QMPSchema",
    "Subscription",
    "TimeoutPolicy",
    "connect",
    "data_contains",
]
