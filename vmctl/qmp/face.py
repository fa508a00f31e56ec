"""The base of both faces: the same read-only facts, read from the core, and one read from the stream."""

from __future__ import annotations

from typing import Final

from vmctl.qmp.connstate import ConnectionState
from vmctl.qmp.events import Match
from vmctl.qmp.messages import Event, Greeting, QEMUVersion
from vmctl.qmp.protocol import QMPProtocol
from vmctl.qmp.stream import Stream
from vmctl.qmp.timeouts import TimeoutPolicy

# Below malloc's mmap threshold: a larger buffer costs page faults on every read.
RECV_SIZE: Final = 64 * 1024


class Face:
    """The base of both faces: it holds the core (``QMPProtocol``) and the stream it drives."""

    def __init__(self, stream: Stream, core: QMPProtocol) -> None:
        self.name = core.name
        self._stream = stream
        self._core = core

    def _read_stream(self) -> bytes | None:
        """What QEMU sent (``b""``: the end), or None: nothing yet, or the read failed (the core knows)."""
        try:
            return self._stream.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        except OSError as exc:
            self._io_failed("reading from", exc)
            return None

    def _io_failed(self, doing: str, error: OSError) -> None:
        self._core.io_failed(doing, error)

    @property
    def connection_state(self) -> ConnectionState:
        return self._core.connection_state

    @property
    def greeting(self) -> Greeting:
        return self._core.greeting

    @property
    def version(self) -> QEMUVersion:
        return self._core.version

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The capabilities negotiated with QEMU (``oob`` when offered)."""
        return self._core.capabilities

    @property
    def timeouts(self) -> TimeoutPolicy:
        return self._core.timeouts

    @property
    def quiet_commands(self) -> frozenset[str]:
        return self._core.quiet_commands

    @property
    def is_connected(self) -> bool:
        return self._core.connection_state is ConnectionState.RUNNING

    @property
    def late_replies(self) -> int:
        """How many commands timed out and still await a reply that will be discarded."""
        return self._core.late_replies

    @property
    def oversized_events(self) -> int:
        return self._core.oversized_events

    def recent_events(self, *names: str, since: float | None = None, match: Match = None) -> list[Event]:
        """Events from the bounded history, oldest first; ``since`` is QEMU wall-clock seconds."""
        return self._core.history.query(names, since=since, match=match)

    @property
    def history_evicted(self) -> int:
        """Events that fell out of the bounded history."""
        return self._core.history.evicted
