"""Socket plumbing for the sync monitor: open with retry, send with fds, all bounded by a deadline."""

from __future__ import annotations

import array
import os
import select
import socket
import time
from collections.abc import Sequence
from typing import IO, Protocol

import tenacity

from vmctl.errors import ConnectError, InvalidArgument


class HasFileno(Protocol):
    def fileno(self) -> int: ...


#: A unix socket path, a ``(host, port)`` pair, or an already-connected socket.
Address = str | os.PathLike[str] | tuple[str, int] | socket.socket
FileDescriptor = int | HasFileno | IO[bytes]

# Errors that mean "QEMU is not listening yet": retried until the deadline.
_NOT_YET = (FileNotFoundError, ConnectionRefusedError)


def describe(address: Address) -> str:
    if isinstance(address, socket.socket):
        return f"socket fd {address.fileno()}"
    if isinstance(address, tuple):
        return f"{address[0]}:{address[1]}"
    return os.fspath(address)


def open_socket(address: Address, *, timeout: float) -> socket.socket:
    """A connected, non-blocking socket to ``address``, retrying while QEMU is still starting."""
    if isinstance(address, socket.socket):
        if address.type != socket.SOCK_STREAM:
            raise InvalidArgument("the monitor socket must be a stream socket")
        address.setblocking(False)
        return address
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[0], str) or not isinstance(address[1], int):
            raise InvalidArgument(f"a TCP address is (host, port), not {address!r}")
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        target: str | tuple[str, int] = address
    elif isinstance(address, (str, os.PathLike)):
        path = os.fspath(address)
        if len(os.fsencode(path)) >= 108:
            raise InvalidArgument(f"unix socket path is too long for the kernel (max 107 bytes): {path}")
        family, target = socket.AF_UNIX, path
    else:
        raise InvalidArgument(f"cannot connect to a {type(address).__name__}; give a path, (host, port) or socket")

    deadline = time.monotonic() + timeout

    def attempt() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.connect(target)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    retrying = tenacity.Retrying(
        stop=tenacity.stop_before_delay(timeout),
        wait=tenacity.wait_exponential(multiplier=0.005, max=0.2),
        retry=tenacity.retry_if_exception_type(_NOT_YET),
        reraise=True,
    )
    try:
        return retrying(attempt)
    except OSError as exc:
        raise ConnectError(f"cannot connect to the QMP monitor at {describe(address)}: {exc}") from exc


def fd_numbers(fds: Sequence[FileDescriptor]) -> list[int]:
    numbers = []
    for fd in fds:
        number = fd if isinstance(fd, int) else getattr(fd, "fileno", lambda: None)()
        if not isinstance(number, int) or isinstance(number, bool) or number < 0:
            raise InvalidArgument(f"not a file descriptor: {fd!r}")
        numbers.append(number)
    return numbers


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


def wait_writable(sock: socket.socket, timeout: float) -> bool:
    poller = select.poll()
    poller.register(sock, select.POLLOUT)
    return bool(poller.poll(max(0, int(timeout * 1000) + 1)))
