"""The byte streams a face drives the core over: non-blocking send and receive, plus fds.

Like httpcore's backends, a stream only moves bytes; the faces differ in how they wait for it
(``poll()`` in the threaded face, the event loop's reader/writer callbacks in the asyncio one),
both on ``fileno()``. ``SocketStream`` wraps the monitor socket; ``MemoryStream.pair()`` gives
two connected in-memory ends for unit tests, fds included.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from typing import Protocol

from vmctl.qmp.transport import scm_rights


class Stream(Protocol):
    """What a face needs from a connection. ``send``/``recv`` never block: they raise
    ``BlockingIOError`` instead; ``recv`` returns ``b""`` at the end of the stream."""

    @property
    def passes_fds(self) -> bool: ...

    def fileno(self) -> int: ...

    def send(self, data: bytes, fds: Sequence[int] = ()) -> int: ...

    def recv(self, size: int) -> bytes: ...

    def shutdown(self) -> None: ...

    def close(self) -> None: ...


class SocketStream:
    """A connected stream socket, made non-blocking."""

    __slots__ = ("_fileno", "passes_fds", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._fileno = sock.fileno()
        self.passes_fds = sock.family == socket.AF_UNIX

    def fileno(self) -> int:
        return self._fileno

    def send(self, data: bytes, fds: Sequence[int] = ()) -> int:
        if fds:
            return self.sock.sendmsg([data], scm_rights(fds), socket.MSG_NOSIGNAL)
        return self.sock.send(data, socket.MSG_NOSIGNAL)

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


class MemoryStream:
    """One end of an in-memory stream pair: readable (its eventfd polls ready) while the other end
    has written bytes this end has not read, or after the other end shut down."""

    passes_fds = True

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._inbox = bytearray()
        self._inbox_fds: collections.deque[tuple[int, list[int]]] = collections.deque()  # (offset, fds)
        self._read_offset = 0
        self._eof = False
        self._closed = False
        self._ready = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.peer: MemoryStream | None = None

    @classmethod
    def pair(cls) -> tuple[MemoryStream, MemoryStream]:
        lock = threading.Lock()
        a, b = cls(lock), cls(lock)
        a.peer, b.peer = b, a
        return a, b

    def fileno(self) -> int:
        return self._ready

    def send(self, data: bytes, fds: Sequence[int] = ()) -> int:
        peer = self.peer
        if self._closed or peer is None:
            raise BrokenPipeError("the stream is closed")
        with self._lock:
            if peer._eof or peer._closed:
                raise BrokenPipeError("the other end is closed")
            if fds:
                peer._inbox_fds.append((peer._read_offset + len(peer._inbox), [os.dup(fd) for fd in fds]))
            peer._inbox += data
            peer._signal()
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.recv_with_fds(size)[0]

    def recv_with_fds(self, size: int) -> tuple[bytes, list[int]]:
        """Like ``recvmsg``: the fds come with the read that starts at or passes their offset."""
        with self._lock:
            if not self._inbox:
                if self._eof:
                    return b"", []
                raise BlockingIOError("no data")
            data = bytes(self._inbox[:size])
            del self._inbox[:size]
            end = self._read_offset + len(data)
            fds: list[int] = []
            while self._inbox_fds and self._inbox_fds[0][0] < end:
                fds.extend(self._inbox_fds.popleft()[1])
            self._read_offset = end
            if not self._inbox and not self._eof:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self._ready)
            return data, fds

    def shutdown(self) -> None:
        peer = self.peer
        with self._lock:
            self._eof = True
            self._signal()
            if peer is not None:
                peer._eof = True
                peer._signal()

    def close(self) -> None:
        if self._closed:
            return
        self.shutdown()
        self._closed = True
        for _, fds in self._inbox_fds:
            for fd in fds:
                os.close(fd)
        self._inbox_fds.clear()
        os.close(self._ready)

    def _signal(self) -> None:
        if not self._closed:
            os.eventfd_write(self._ready, 1)
