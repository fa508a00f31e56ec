"""What goes out to QEMU, and when: the send side of the connection core (no I/O).

Commands wait here in order until a face asks for bytes to write. Two rules live here:
an fd-passing command is handed out only while no other is between its send and its reply
(QEMU keeps the fds of its last read in one slot, replaced by the next read carrying fds), and
the write in progress is tracked to the byte, so that a partial write is resumed exactly where
it stopped, its fds having gone with its first byte.
"""

from __future__ import annotations

import collections
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from vmctl.errors import InvalidArgument, QMPError
from vmctl.qmp.timeouts import deadline


class Waker(Protocol):
    """How the core tells a face that a command is done (it is called exactly once)."""

    def wake(self) -> None: ...


class Command:
    """One command, from queueing to its outcome."""

    __slots__ = (
        "abandoned",
        "arguments",
        "data",
        "deadline",
        "done",
        "failure",
        "fds",
        "id",
        "name",
        "sent",
        "started",
        "timeout",
        "value",
        "waker",
    )

    def __init__(
        self,
        *,
        command_id: str,
        name: str,
        arguments: Mapping[str, Any] | None,
        data: bytes,
        fds: tuple[int, ...],
        timeout: float,
        waker: Waker,
    ) -> None:
        self.id = command_id
        self.name = name
        self.arguments = arguments
        self.data = data
        self.fds = fds  # our duplicates, owned until QEMU answered
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = deadline(timeout, now=self.started)
        self.waker = waker
        self.sent = False  # handed out for writing: from here on it reaches QEMU or the connection fails
        self.done = False
        self.abandoned = False
        self.value: Any = None
        self.failure: QMPError | None = None

    def result(self) -> Any:
        if self.failure is not None:
            raise self.failure
        return self.value


class Outbox:
    """Commands not yet handed out, the fd slot, and the write in progress."""

    def __init__(self, on_hand_out: Callable[[Command], None]) -> None:
        self._queue: collections.deque[Command] = collections.deque()
        self._slot: Command | None = None  # the fd-passing command between send and reply
        self._raw: bytes | None = None  # bytes of no command (the handshake)
        self._out = b""  # the write in progress: bytes handed out, of which _offset are written
        self._offset = 0
        self._out_fds: tuple[int, ...] = ()
        self._on_hand_out = on_hand_out

    def push(self, command: Command) -> None:
        self._queue.append(command)

    def push_raw(self, data: bytes) -> None:
        self._raw = data

    def drop(self, command: Command) -> None:
        """Take back a command not yet handed out: it is never sent."""
        self._queue.remove(command)

    def release(self, command: Command) -> None:
        """QEMU answered (or never will): free the fd slot and close the command's fd duplicates."""
        if self._slot is command:
            self._slot = None
        if command.fds:
            close_all(command.fds)
            command.fds = ()

    def clear(self) -> None:
        self._queue.clear()
        self._slot = None
        self._out, self._offset, self._out_fds, self._raw = b"", 0, (), None

    @property
    def writing(self) -> bool:
        """Whether a write was handed out and is not complete."""
        return bool(self._out)

    @property
    def wants_write(self) -> bool:
        """Whether ``data_to_send`` has something now."""
        if self._out or self._raw is not None:
            return True
        if not self._queue:
            return False
        return self._slot is None or any(not c.fds for c in self._queue)

    def data_to_send(self) -> tuple[bytes, tuple[int, ...]] | None:
        """The bytes to write next and the fds to pass with them; follow with ``bytes_sent``."""
        if self._out:
            if self._offset:
                return self._out[self._offset :], ()
            return self._out, self._out_fds
        if self._raw is not None:
            self._out, self._raw = self._raw, None
            return self._out, ()
        queue = self._queue
        if not queue:
            return None
        if len(queue) == 1 and not queue[0].fds:  # the common case: one command, no fds
            command = queue.popleft()
            self._hand_out(command)
            self._out = command.data
            return self._out, ()
        pieces: list[bytes] = []
        fds: tuple[int, ...] = ()
        waiting: list[Command] = []
        while queue:
            command = queue[0]
            if command.fds:
                if self._slot is not None:
                    waiting.append(queue.popleft())  # keeps its place until the slot is free
                    continue
                if pieces:
                    break  # fds travel with the first byte of a write: it starts the next one
                self._slot = command
                fds = command.fds
            queue.popleft()
            self._hand_out(command)
            pieces.append(command.data)
        queue.extendleft(reversed(waiting))
        if not pieces:
            return None
        self._out = b"".join(pieces)
        self._out_fds = fds
        return self._out, fds

    def bytes_sent(self, count: int) -> None:
        """``count`` bytes of what ``data_to_send`` returned were written (the fds with the first)."""
        if count <= 0:
            return
        self._out_fds = ()
        self._offset += count
        if self._offset >= len(self._out):
            self._out = b""
            self._offset = 0

    def _hand_out(self, command: Command) -> None:
        command.sent = True
        self._on_hand_out(command)


def duplicate(fds: Sequence[int], command: str) -> tuple[int, ...]:
    dups: list[int] = []
    try:
        for fd in fds:
            dups.append(os.dup(fd))
    except OSError as exc:
        close_all(dups)
        raise InvalidArgument(f"{command}: cannot pass fd {fd}: {exc.strerror}") from None
    return tuple(dups)


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
