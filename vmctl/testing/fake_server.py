"""The fake QEMU's socket side: a unix socket server (or one end of a socketpair) serving one
client at a time, reading lines and the fds SCM_RIGHTS brings with them, writing bytes, and
acting out what a process does to its monitor (exiting: the connection drops; SIGSTOPped: it
neither reads nor answers). What the lines mean is :class:`~vmctl.testing.fake_qemu.FakeQEMU`'s."""

from __future__ import annotations

import array
import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Callable
from typing import Any


class FakeServer:
    """Serve ``on_line`` each line a client sends; ``on_connect`` runs as each client arrives."""

    def __init__(self, *, on_connect: Callable[[], None], on_line: Callable[[bytes], None]) -> None:
        self._on_connect = on_connect
        self._on_line = on_line
        #: The fds of the last read that carried some, until a command takes them.
        self.received_fds: list[int] = []
        self.closed = False
        self._write_lock = threading.Lock()
        self._conn: socket.socket | None = None
        self._thawed = threading.Event()
        self._thawed.set()
        self._threads: list[threading.Thread] = []
        self._dir = tempfile.mkdtemp(prefix="vmctl-fake-")
        self.address = os.path.join(self._dir, "qmp.sock")
        self._server: socket.socket | None = None

    @property
    def listening(self) -> bool:
        return self._server is not None

    def serve(self) -> None:
        """Listen on ``address`` and serve one client at a time."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(self.address)
        server.listen(4)
        self._server = server
        self._spawn(self._accept_loop)

    def client_socket(self) -> socket.socket:
        """A connected socket whose other end this server serves (like a socketpair-launched QEMU)."""
        ours, theirs = socket.socketpair()
        self._spawn(self._serve_connection, ours)
        return theirs

    def close(self) -> None:
        self.closed = True
        self._thawed.set()
        if self._server is not None:
            with contextlib.suppress(OSError):
                self._server.shutdown(socket.SHUT_RDWR)
            self._server.close()
        self.disconnect()
        for thread in self._threads:
            thread.join(2.0)
        with contextlib.suppress(OSError):
            os.unlink(self.address)
        with contextlib.suppress(OSError):
            os.rmdir(self._dir)

    def disconnect(self) -> None:
        """Drop the current client connection, like QEMU exiting."""
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        """Stop reading and answering, like a SIGSTOPped QEMU."""
        self._thawed.clear()

    def thaw(self) -> None:
        self._thawed.set()

    def wait_thawed(self) -> None:
        self._thawed.wait()

    def send(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None:
            with self._write_lock:
                conn.sendall(data)

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name="fake-qemu")
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self.closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self._serve_connection(conn)

    def _serve_connection(self, conn: socket.socket) -> None:
        self._conn = conn
        try:
            self._on_connect()
            buffer = b""
            while not self.closed:
                self._thawed.wait()
                try:
                    data, ancdata, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                except OSError:
                    return
                if not data:
                    return
                received: list[int] = []
                for level, kind, payload in ancdata:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fd_array = array.array("i")
                        fd_array.frombytes(payload[: len(payload) - len(payload) % fd_array.itemsize])
                        received.extend(fd_array)
                if received:
                    # Like QEMU: a read carrying fds replaces (and closes) the unclaimed ones.
                    for fd in self.received_fds:
                        os.close(fd)
                    self.received_fds = received
                buffer += data
                while b"\n" in buffer and not self.closed:
                    self._thawed.wait()
                    line, buffer = buffer.split(b"\n", 1)
                    if line.strip():
                        self._on_line(line)
        finally:
            self._conn = None
            for fd in self.received_fds:
                os.close(fd)
            self.received_fds = []
            with contextlib.suppress(OSError):
                conn.close()
