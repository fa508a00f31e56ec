"""The one state of a QMP connection, its legal transitions, and the guard that refuses calls.

Like qemu.qmp's ``Runstate`` (named apart from QEMU's own RunState): a connection is CONNECTING
until capabilities are negotiated, RUNNING while commands may be sent, DISCONNECTED once it
failed (QEMU went away or spoke garbage: the failure is kept and raised to every later call),
and CLOSED once closed locally.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from vmctl.errors import ConnectionLost, ProtocolError, QMPError, StateError


class ConnectionState(enum.Enum):
    CONNECTING = "connecting"
    RUNNING = "running"
    DISCONNECTED = "disconnected"
    CLOSED = "closed"


TRANSITIONS: Final[Mapping[ConnectionState, frozenset[ConnectionState]]] = MappingProxyType(
    {
        ConnectionState.CONNECTING: frozenset(
            {ConnectionState.RUNNING, ConnectionState.DISCONNECTED, ConnectionState.CLOSED}
        ),
        ConnectionState.RUNNING: frozenset({ConnectionState.DISCONNECTED, ConnectionState.CLOSED}),
        ConnectionState.DISCONNECTED: frozenset({ConnectionState.CLOSED}),
        ConnectionState.CLOSED: frozenset(),
    }
)


class ConnectionStateMachine:
    """Holds the connection state and, once the connection failed, why."""

    __slots__ = ("failure", "name", "state")

    def __init__(self, name: str) -> None:
        self.name = name
        self.state = ConnectionState.CONNECTING
        self.failure: tuple[type[QMPError], str] | None = None

    def transition(self, new: ConnectionState) -> bool:
        """Move to ``new``; False (and no change) when the move is not allowed from here."""
        if new not in TRANSITIONS[self.state]:
            return False
        self.state = new
        return True

    def guard(self, *allowed: ConnectionState) -> None:
        """Raise the error a call gets in the current connection state unless it is one of ``allowed``."""
        state = self.state
        if state in allowed:
            return
        if state is ConnectionState.CLOSED:
            raise StateError(f"{self.name}: the monitor is closed")
        if state is ConnectionState.DISCONNECTED and self.failure is not None:
            error_type, why = self.failure
            # A protocol error fails the call that saw it; later calls see a lost connection.
            raise ConnectionLost(why) if error_type is ProtocolError else error_type(why)
        raise StateError(f"{self.name}: the monitor is {state.value}")
