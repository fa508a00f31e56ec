"""Socket plumbing for both faces: addresses, connecting with retry, fd numbers and SCM_RIGHTS."""

from __future__ import annotations

import array
import os
import socket
import time
from collections.abc import Sequence
from typing import IO, Protocol

import tenacity

from vmctl.errors import ConnectError, InvalidArgument
from vmctl.model.validate import check_unix_path


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


def socket_target(address: Address) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
    """The socket family and connect target for a path or ``(host, port)``; ``InvalidArgument`` otherwise."""
    if isinstance(address, tuple):
        if len(address) != 2 or not isinstance(address[0], str) or not isinstance(address[1], int):
            raise InvalidArgument(f"a TCP address is (host, port), not {address!r}")
        return (socket.AF_INET6 if ":" in address[0] else socket.AF_INET), address
    if isinstance(address, (str, os.PathLike)):
        return socket.AF_UNIX, check_unix_path("the monitor", address)
    raise InvalidArgument(f"cannot connect to a {type(address).__name__}; give a path, (host, port) or socket")


def connected_socket(sock: socket.socket) -> socket.socket:
    """A socket the caller connected, checked and made non-blocking."""
    if sock.type != socket.SOCK_STREAM:
        raise InvalidArgument("the monitor socket must be a stream socket")
    sock.setblocking(False)
    return sock


#: How connecting is retried while QEMU is not listening yet (both faces).
RETRY_WAIT = tenacity.wait_exponential(multiplier=0.005, max=0.2)
RETRY_IF_NOT_YET = tenacity.retry_if_exception_type(_NOT_YET)


def open_socket(address: Address, *, timeout: float) -> socket.socket:
    """A connected, non-blocking socket to ``address``, retrying while QEMU is still starting."""
    if isinstance(address, socket.socket):
        return connected_socket(address)
    family, target = socket_target(address)
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
        stop=tenacity.stop_before_delay(timeout), wait=RETRY_WAIT, retry=RETRY_IF_NOT_YET, reraise=True
    )
    try:
        return retrying(attempt)
    except OSError as exc:
        raise connect_error(address, exc) from exc


def connect_error(address: Address, exc: BaseException) -> ConnectError:
    return ConnectError(f"cannot connect to the QMP monitor at {describe(address)}: {exc}")


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
