"""What both faces' ``connect`` share: the options a connection takes, and a face made on a socket.

The threaded ``vmctl.qmp.connect`` and the asyncio ``vmctl.qmp.aio.connect`` differ only in how
they wait (for the socket, for the handshake); everything they are given goes to the core here.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from typing import TypedDict, TypeVar

from vmctl.qmp.protocol import QMPProtocol
from vmctl.qmp.stream import SocketStream, Stream
from vmctl.qmp.timeouts import TimeoutPolicy


class ConnectOptions(TypedDict, total=False):
    """``connect``'s options after ``timeout`` and ``name``, for either face. Each is the
    ``QMPProtocol`` argument of that name, whose default holds when it is left out:

    - ``max_message_size``: a reply or event over it is dropped (its command fails alone);
    - ``oob``: negotiate out-of-band execution when QEMU offers it;
    - ``timeouts``: each command's default timeout, by kind (``TimeoutPolicy``);
    - ``quiet_commands`` / ``quiet_events``: polled names left out of the log and transcript;
    - ``event_history``: how many recent events ``recent_events`` keeps;
    - ``transcript``: a file to which every command, reply and event is written, redacted.
    """

    max_message_size: int
    oob: bool
    timeouts: TimeoutPolicy | None
    quiet_commands: Iterable[str]
    quiet_events: Iterable[str]
    event_history: int
    transcript: str | os.PathLike[str] | None


FaceT = TypeVar("FaceT")


def face_on(
    face: Callable[[Stream, QMPProtocol], FaceT], sock: socket.socket, name: str, options: ConnectOptions
) -> FaceT:
    """``face`` driving a new core called ``name`` over ``sock``; the socket is closed if either
    cannot be made. The face does the handshake next."""
    try:
        return face(SocketStream(sock), QMPProtocol(name=name, **options))
    except BaseException:
        sock.close()
        raise
