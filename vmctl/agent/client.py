"""The guest agent's blocking face: one connection per call, resynchronised, every wait bounded.

QEMU serves one client at a time on the agent's socket, and the agent answers one command at a
time, so a connection lives only as long as a call (or a ``session`` of a few): a control plane
and an operator's ``vmctl agent`` take turns, and a guest that rebooted or an agent that
restarted costs nothing but the resynchronisation every connection begins with.

Whether the agent is there at all is asked of QEMU (``port_open``: has the guest opened its end
of the virtio-serial port?), before connecting and while waiting: a guest with no agent, or one
whose agent died mid-command, is ``AgentUnavailable`` at once, not a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from vmctl.agent.protocol import NEED_DATA, AgentProtocol, AgentReply, Synced
from vmctl.errors import AgentError, AgentTimeout, AgentUnavailable, InvalidArgument
from vmctl.logs import get_logger
from vmctl.qmp import timeouts
from vmctl.qmp.redact import redact_value
from vmctl.qmp.timeouts import check_timeout

log = get_logger(__name__)

DEFAULT_TIMEOUT: Final = 10.0
#: How often a wait asks QEMU whether the guest still has the agent's port open.
PORT_CHECK_INTERVAL: Final = 0.25
#: How long ``send`` listens for the error of a command that answers only when it fails.
FAILURE_GRACE: Final = 2.0
#: Commands polled in a loop: their lines would drown the log.
QUIET_COMMANDS: Final = frozenset({"guest-exec-status", "guest-ping"})
#: Arguments that carry the guest's data, not a setting: logged by size only.
_BULK_ARGUMENTS: Final = frozenset({"input-data", "buf-b64"})

PortOpen = Callable[[], bool]


class AgentClient:
    """Calls into one VM's guest agent over QEMU's unix socket at ``path``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        name: str,
        port_open: PortOpen | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.path = os.fspath(path)
        self.name = name
        self.timeout = check_timeout(timeout)
        self._port_open = port_open
        self._lock = threading.Lock()
        self._log = log.bind(vm=name)

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Run one agent command and return its ``return`` value; at most ``timeout`` seconds."""
        with self.session(timeout) as session:
            return session.execute(command, arguments)

    def send(self, command: str, arguments: Mapping[str, Any] | None = None, *, timeout: float | None = None) -> None:
        """Run a command the agent answers only when it fails (``guest-shutdown``): an error
        within ``FAILURE_GRACE`` seconds is raised; silence, or the agent going away, is success."""
        with self.session(timeout) as session:
            session.send(command, arguments)

    @contextlib.contextmanager
    def session(self, timeout: float | None = None) -> Iterator[AgentSession]:
        """One synchronised connection for a few commands, all within ``timeout`` seconds."""
        seconds = self.timeout if timeout is None else check_timeout(timeout)
        deadline = timeouts.deadline(seconds)
        if not self._lock.acquire(timeout=min(seconds, threading.TIMEOUT_MAX)):
            raise AgentTimeout(f"{self.name}: another call to the guest agent took the whole {seconds:g}s")
        try:
            self._check_port("has not opened the agent's port (is qemu-ga running in the guest?)")
            sock = _connect(self.path, deadline, self.name)
            try:
                session = AgentSession(self, sock, deadline)
                session.synchronise()
                yield session
            finally:
                sock.close()
        finally:
            self._lock.release()

    def _check_port(self, why: str) -> None:
        if self._port_open is not None and not self._port_open():
            raise AgentUnavailable(f"{self.name}: the guest {why}")


class AgentSession:
    """A connection of ``AgentClient.session``: synchronised, commands one after another."""

    def __init__(self, client: AgentClient, sock: socket.socket, deadline: float) -> None:
        self._client = client
        self._sock = sock
        self._deadline = deadline
        self._protocol = AgentProtocol()

    @property
    def remaining(self) -> float:
        return max(0.0, self._deadline - time.monotonic())

    def synchronise(self) -> None:
        self._write(self._protocol.start_sync(), "guest-sync-delimited")
        self._wait("guest-sync-delimited")

    def execute(self, command: str, arguments: Mapping[str, Any] | None = None) -> Any:
        started = time.monotonic()
        self._write(self._protocol.send_command(command, arguments), command)
        try:
            reply = self._wait(command)
            assert isinstance(reply, AgentReply)
        except AgentError as exc:
            self._log(command, arguments, started, type(exc).__name__)
            raise
        self._log(command, arguments, started, "ok" if reply.error is None else type(reply.error).__name__)
        if reply.error is not None:
            raise reply.error
        return reply.value

    def send(self, command: str, arguments: Mapping[str, Any] | None = None) -> None:
        started = time.monotonic()
        self._write(self._protocol.send_command(command, arguments), command)
        try:
            reply = self._wait(command, until=min(self._deadline, time.monotonic() + FAILURE_GRACE))
        except (AgentTimeout, AgentUnavailable):
            self._log(command, arguments, started, "sent")  # nothing came back: it is under way
            return
        assert isinstance(reply, AgentReply)
        self._log(command, arguments, started, "ok" if reply.error is None else type(reply.error).__name__)
        if reply.error is not None:
            raise reply.error

    def _write(self, data: bytes, command: str) -> None:
        view = memoryview(data)
        while view:
            if not _ready(self._sock, write=True, timeout=self.remaining):
                raise self._timeout(command)
            try:
                view = view[self._sock.send(view) :]
            except BlockingIOError:
                continue
            except OSError as exc:
                raise AgentUnavailable(f"{self._client.name}: the agent's socket failed: {exc}") from exc

    def _wait(self, command: str, until: float | None = None) -> Synced | AgentReply:
        deadline = self._deadline if until is None else until
        next_check = time.monotonic() + PORT_CHECK_INTERVAL
        while True:
            event = self._protocol.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, (Synced, AgentReply))
                return event
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout(command)
            if time.monotonic() >= next_check:
                self._client._check_port(f"closed the agent's port while {command} was pending (the agent stopped)")
                next_check = time.monotonic() + PORT_CHECK_INTERVAL
            if not _ready(self._sock, write=False, timeout=min(remaining, PORT_CHECK_INTERVAL)):
                continue
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise AgentUnavailable(f"{self._client.name}: the agent's socket failed: {exc}") from exc
            if not data:
                raise AgentUnavailable(f"{self._client.name}: QEMU closed the agent's socket (is QEMU exiting?)")
            self._protocol.receive_data(data)

    def _timeout(self, command: str) -> AgentTimeout:
        return AgentTimeout(
            f"{self._client.name}: the guest agent did not answer {command} in time "
            "(hung, busy with a long command, or another client holds its socket)"
        )

    def _log(self, command: str, arguments: Mapping[str, Any] | None, started: float, outcome: str) -> None:
        if command in QUIET_COMMANDS and outcome in ("ok", "sent"):
            return
        shown = {
            key: f"<{len(str(value))} chars>" if key in _BULK_ARGUMENTS else value
            for key, value in (arguments or {}).items()
        }
        self._client._log.debug(
            "agent.command",
            cmd=command,
            ms=round((time.monotonic() - started) * 1000, 3),
            outcome=outcome,
            arguments=redact_value(shown) if shown else None,
        )


def _connect(path: str, deadline: float, name: str) -> socket.socket:
    if len(path.encode()) > 107:
        raise InvalidArgument(f"{name}: the agent's socket path is too long for a unix socket: {path}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        while True:
            try:
                sock.connect(path)
                return sock
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise AgentUnavailable(f"{name}: QEMU's agent socket {path} does not answer ({exc.strerror})") from exc
            except BlockingIOError as exc:
                if exc.errno != errno.EAGAIN or time.monotonic() >= deadline:
                    raise AgentTimeout(f"{name}: QEMU did not accept a connection to its agent socket") from exc
                time.sleep(0.01)  # the listen backlog is full: another client is connecting
    except BaseException:
        sock.close()
        raise


def _ready(sock: socket.socket, *, write: bool, timeout: float) -> bool:
    wanted = select.POLLOUT if write else select.POLLIN
    poller = select.poll()
    poller.register(sock, wanted)
    return bool(poller.poll(max(0, int(timeout * 1000 + 0.999))))
