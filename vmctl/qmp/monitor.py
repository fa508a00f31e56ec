"""The synchronous QMP monitor: thread-safe, pipelined, every wait bounded.

Reading is done by whichever thread needs it ("leader/follower"): a thread waiting for a reply
takes the read side (the *pump*) if it is free, reads until its own reply arrives and hands
replies for other threads to them on the way. A sequential caller therefore reads its own
reply with no thread switch. When no command is in flight, a background thread holds the pump
so that events, callbacks and a dying QEMU are noticed promptly; a caller that finds the
background thread reading kicks it off through an eventfd.
"""

from __future__ import annotations

import collections
import contextlib
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

import structlog

from vmctl.errors import (
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    InvalidArgument,
    MessageTooLarge,
    ProtocolError,
    QMPError,
    StateError,
    command_error,
)
from vmctl.qmp.callbacks import CallbackRunner, DisconnectCallback, EventCallback
from vmctl.qmp.events import EventFilter, EventHistory, Match, Subscription
from vmctl.qmp.messages import (
    ErrorReply,
    Event,
    Greeting,
    Message,
    Negotiated,
    OversizedMessage,
    QEMUVersion,
    Reply,
)
from vmctl.qmp.protocol import DEFAULT_MAX_MESSAGE_SIZE, NEED_DATA, QMPProtocol
from vmctl.qmp.redact import redact_arguments, redact_value
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.timeouts import TimeoutPolicy
from vmctl.qmp.transcript import Transcript
from vmctl.qmp.transport import (
    Address,
    FileDescriptor,
    describe,
    fd_numbers,
    open_socket,
    scm_rights,
    wait_writable,
)

log = structlog.get_logger(__name__)

DEFAULT_QUIET_COMMANDS: Final = frozenset({"ringbuf-read", "query-migrate"})
DEFAULT_QUIET_EVENTS: Final = frozenset({"RTC_CHANGE"})

_DEBUG: Final = 10
# Below malloc's mmap threshold: a larger buffer costs page faults on every read.
_RECV_SIZE: Final = 64 * 1024
# A follower re-checks whether it should read at least this often, so progress never depends
# on a single wake-up being delivered.
_FOLLOWER_SLICE: Final = 0.01
# The background reader takes over only after commands have been idle this long, so it never
# competes with a caller issuing commands back to back.
_BACKGROUND_IDLE: Final = 0.01
_LATE_REPLY_MEMORY: Final = 1024


class _Pending:
    """One command waiting for its reply."""

    __slots__ = ("command", "done", "failure", "id", "started", "value", "wake_lock", "woken")

    def __init__(self, command_id: str, command: str) -> None:
        self.id = command_id
        self.command = command
        self.wake_lock = threading.Lock()
        self.wake_lock.acquire()  # released to wake the waiter (a binary semaphore)
        self.woken = False
        self.done = False
        self.value: Any = None
        self.failure: QMPError | None = None
        self.started = time.monotonic()


class Monitor:
    """A QMP connection. Create it with :func:`vmctl.qmp.connect`."""

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        oob: bool = True,
        timeouts: TimeoutPolicy | None = None,
        quiet_commands: Iterable[str] = DEFAULT_QUIET_COMMANDS,
        quiet_events: Iterable[str] = DEFAULT_QUIET_EVENTS,
        event_history: int = 1000,
        transcript: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.timeouts = timeouts or TimeoutPolicy()
        self.quiet_commands = frozenset(quiet_commands)
        self.quiet_events = frozenset(quiet_events)
        self._sock = sock
        self._proto = QMPProtocol(max_message_size=max_message_size, oob=oob)
        self._log = log.bind(monitor=name)
        self._debug_enabled: Callable[[int], bool] = getattr(self._log, "is_enabled_for", lambda level: True)
        self._history = EventHistory(event_history)
        self._transcript = Transcript(transcript) if transcript is not None else None

        self._state_lock = threading.Lock()
        self._outbox_lock = threading.Lock()
        # QEMU keeps the fds of its last read in one slot, replaced (and closed) by the next read
        # carrying fds: one fd-passing command at a time, from send until its reply.
        self._fd_command_lock = threading.Lock()
        self._outbox: list[tuple[bytes, Sequence[int]]] = []
        self._sending = False
        self._pump = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._late: collections.OrderedDict[str, str] = collections.OrderedDict()
        self._active = 0
        self._last_activity = time.monotonic()
        self._failure: tuple[type[QMPError], str] | None = None
        self._closed = False
        self._subscriptions: tuple[Subscription, ...] = ()
        self._callbacks: CallbackRunner | None = None
        self._commands: frozenset[str] | None = None
        self._schema: QMPSchema | None = None
        self.oversized_events = 0

        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._poll_sock = select.poll()
        self._poll_sock.register(sock, select.POLLIN)
        self._poll_background = select.poll()
        self._poll_background.register(sock, select.POLLIN)
        self._poll_background.register(self._wakefd, select.POLLIN)
        self._background_wants_pump = False
        self._stop = threading.Event()
        self._background: threading.Thread | None = None

    # -- connection lifecycle --------------------------------------------------------------

    def _handshake(self, timeout: float) -> None:
        """Read the greeting and negotiate capabilities; then start the background reader."""
        deadline = time.monotonic() + timeout
        with self._pump:
            greeting = self._read_until(Greeting, deadline, "QMP greeting")
            self._send_bytes(self._proto.start_negotiation(), (), deadline, "qmp_capabilities")
            self._read_until(Negotiated, deadline, "reply to qmp_capabilities")
        assert isinstance(greeting, Greeting)
        self._log.info(
            "qmp.connected",
            qemu=str(greeting.version),
            capabilities=list(self._proto.capabilities),
        )
        self._background = threading.Thread(target=self._background_reader, name=f"vmctl-qmp-{self.name}", daemon=True)
        self._background.start()

    def _read_until(self, kind: type[Message], deadline: float, what: str) -> Message:
        while True:
            message = self._proto.next_event()
            if isinstance(message, kind):
                return message
            if message is not NEED_DATA:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._poll_sock.poll(_poll_ms(remaining)):
                raise ConnectError(f"{self.name}: no {what} within the connect timeout")
            try:
                data = self._sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise ConnectError(f"{self.name}: reading the {what} failed: {exc}") from exc
            if not data:
                raise ConnectError(f"{self.name}: QEMU closed the connection while we waited for the {what}")
            try:
                self._proto.receive_data(data)
            except ProtocolError as exc:
                raise ConnectError(f"{self.name}: invalid {what}: {exc}") from exc

    def close(self) -> None:
        """Close the connection. Pending commands fail with ``ConnectionLost``; idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            had_failure = self._failure is not None
        self._fail(ConnectionLost, f"{self.name}: the monitor was closed locally", closing=True)
        self._stop.set()
        self._kick()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        if self._background is not None and self._background is not threading.current_thread():
            self._background.join(2.0)
        # Close the fds only once no reader can be inside poll() on them.
        got_pump = self._pump.acquire(timeout=2.0)
        try:
            self._sock.close()
            os.close(self._wakefd)
        finally:
            if got_pump:
                self._pump.release()
        if self._callbacks is not None:
            self._callbacks.stop()
        if self._transcript is not None:
            self._transcript.close()
        if not had_failure:
            self._log.info("qmp.closed")

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def greeting(self) -> Greeting:
        assert self._proto.greeting is not None
        return self._proto.greeting

    @property
    def version(self) -> QEMUVersion:
        return self.greeting.version

    @property
    def capabilities(self) -> tuple[str, ...]:
        """The capabilities negotiated with QEMU (``oob`` when offered)."""
        return self._proto.capabilities

    @property
    def is_connected(self) -> bool:
        return self._failure is None

    @property
    def late_replies(self) -> int:
        """How many commands timed out and still await a reply that will be discarded."""
        return len(self._late)

    # -- commands ---------------------------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[FileDescriptor] = (),
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run ``command`` and return QEMU's ``return`` value.

        ``oob`` sends it out of band (``exec-oob``), for the few commands QEMU allows there
        (``migrate-pause``, ``migrate-recover``): they run even while QEMU's main loop is stuck.

        ``fds`` travel with SCM_RIGHTS in the same ``sendmsg`` as the command (``add-fd``,
        ``getfd``). Raises a ``CommandError`` subclass for QEMU's error, ``CommandTimeout`` when
        no reply comes within ``timeout`` (default: by command kind), ``ConnectionLost`` when
        the connection goes away.
        """
        if timeout is None:
            timeout = self.timeouts.for_command(command)
        elif not (isinstance(timeout, (int, float)) and timeout > 0):
            raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
        fd_list = fd_numbers(fds) if fds else []
        if fd_list and self._sock.family != socket.AF_UNIX:
            raise InvalidArgument(f"{command}: file descriptors can only be passed over a unix socket")
        deadline = time.monotonic() + timeout
        self._raise_if_unusable()
        command_id, data = self._proto.send_command(command, arguments, oob=oob)
        pending = _Pending(command_id, command)
        with self._state_lock:
            self._raise_if_unusable()
            self._pending[command_id] = pending
            self._active += 1
        fd_slot_held = False
        try:
            if fd_list:
                fd_slot_held = self._fd_command_lock.acquire(timeout=max(0.0, deadline - time.monotonic()))
                if not fd_slot_held:
                    raise CommandTimeout(command=command, timeout=timeout)
            self._transcribe_command(command, command_id, arguments)
            self._send_bytes(data, fd_list, deadline, command)
            self._await(pending, deadline, timeout)
        except CommandTimeout as exc:
            self._log_command(pending, "timeout", arguments)
            raise exc from None
        finally:
            if fd_slot_held:
                self._fd_command_lock.release()
            with self._state_lock:
                self._pending.pop(command_id, None)
                self._active -= 1
                self._last_activity = time.monotonic()
        if pending.failure is not None:
            if self._debug_enabled(_DEBUG):
                self._log_command(pending, type(pending.failure).__name__, arguments)
            raise pending.failure
        if self._debug_enabled(_DEBUG) and command not in self.quiet_commands:
            self._log_command(pending, "ok", arguments)
        return pending.value

    def human(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human-monitor (HMP) command line and return its text output."""
        if not isinstance(command_line, str) or not command_line.strip():
            raise InvalidArgument("the HMP command line must be a non-empty string")
        output = self.execute("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        return str(output)

    def _await(self, pending: _Pending, deadline: float, timeout: float) -> None:
        pump = self._pump
        while not pending.done:
            if pump.acquire(False):
                try:
                    while not pending.done:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._read_once(self._poll_sock, remaining)
                finally:
                    self._release_pump()
                if not pending.done:
                    break
            else:
                if self._background_wants_pump:
                    self._kick()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if pending.wake_lock.acquire(True, min(remaining, _FOLLOWER_SLICE)):
                    with self._state_lock:
                        pending.woken = False
        if pending.done:
            return
        with self._state_lock:
            if pending.done:  # the reply raced the deadline and won
                return
            self._late[pending.id] = pending.command
            while len(self._late) > _LATE_REPLY_MEMORY:
                self._late.popitem(last=False)
        raise CommandTimeout(command=pending.command, timeout=timeout)

    def _release_pump(self) -> None:
        """Give up the read side and wake one waiter so that someone keeps reading."""
        self._pump.release()
        with self._state_lock:
            for other in self._pending.values():
                if not other.done and not other.woken:
                    other.woken = True
                    other.wake_lock.release()
                    break

    def _wake(self, pending: _Pending) -> None:
        # Caller holds _state_lock.
        if not pending.woken:
            pending.woken = True
            pending.wake_lock.release()

    def _kick(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wakefd, 1)

    def _send_bytes(self, data: bytes, fds: Sequence[int], deadline: float, command: str) -> None:
        """Queue a command's bytes and, unless another thread is sending, send the queue.

        Threads that arrive while one is sending leave their bytes to it, so concurrent commands
        go out in one system call (and wake QEMU once) instead of one each.
        """
        with self._outbox_lock:
            self._outbox.append((data, fds))
            if self._sending:
                return
            self._sending = True
        try:
            while True:
                with self._outbox_lock:
                    batch = self._outbox
                    if not batch:
                        self._sending = False
                        return
                    self._outbox = []
                for chunk, chunk_fds in _coalesce(batch):
                    self._write(chunk, chunk_fds, deadline, command)
        except BaseException:
            with self._outbox_lock:
                self._sending = False
            raise

    def _write(self, data: bytes, fds: Sequence[int], deadline: float, command: str) -> None:
        view = memoryview(data)
        with_fds = bool(fds)
        while view:
            try:
                if with_fds:
                    sent = self._sock.sendmsg([view], scm_rights(fds), socket.MSG_NOSIGNAL)
                else:
                    sent = self._sock.send(view, socket.MSG_NOSIGNAL)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining > 0 and wait_writable(self._sock, remaining):
                    continue
                # QEMU has not drained its monitor socket for a whole command timeout, and the
                # stream may hold half a command: it can never be resynchronised.
                self._fail(ConnectionLost, f"{self.name}: QEMU stopped reading its monitor (sending {command} stalled)")
                self._raise_if_unusable()
                raise AssertionError("unreachable") from None
            except OSError as exc:
                self._fail(ConnectionLost, f"{self.name}: sending {command} failed: {exc}")
                self._raise_if_unusable()
                raise AssertionError("unreachable") from exc
            with_fds = False
            view = view[sent:]

    # -- reading and dispatch (only by the pump holder) ------------------------------------

    def _read_once(self, poller: select.poll, timeout: float | None) -> None:
        if not poller.poll(None if timeout is None else _poll_ms(timeout)):
            return
        try:
            data = self._sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(ConnectionLost, f"{self.name}: reading from QEMU failed: {exc}")
            return
        try:
            self._proto.receive_data(data)
        except ProtocolError as exc:
            self._fail(ProtocolError, f"{self.name}: {exc}")
            return
        except StateError:
            return  # already failed; nothing more to read
        if not data:
            self._fail(ConnectionLost, f"{self.name}: QEMU closed the connection")
            return
        while True:
            message = self._proto.next_event()
            if message is NEED_DATA:
                return
            self._dispatch(message)

    def _dispatch(self, message: Message) -> None:
        kind = type(message)
        if kind is Reply:
            assert isinstance(message, Reply)
            self._complete(message.id, message.value, None)
        elif kind is Event:
            assert isinstance(message, Event)
            self._deliver_event(message)
        elif kind is ErrorReply:
            assert isinstance(message, ErrorReply)
            if message.id is None:
                self._log.warning("qmp.error_without_id", error=dict(message.error))
            else:
                self._complete(message.id, None, message.error)
        elif kind is OversizedMessage:
            assert isinstance(message, OversizedMessage)
            self._oversized(message)

    def _complete(self, command_id: str, value: Any, error: Mapping[str, Any] | None) -> None:
        with self._state_lock:
            pending = self._pending.get(command_id)
            if pending is not None and not pending.done:
                if error is not None:
                    pending.failure = command_error(pending.command, error)
                else:
                    pending.value = value
                pending.done = True
                self._wake(pending)
            late_command = None if pending is not None else self._late.pop(command_id, None)
        if pending is not None:
            if self._transcript is not None and pending.command not in self.quiet_commands:
                self._transcript.write("recv", _reply_record(command_id, value, error))
        elif late_command is not None:
            self._log.warning("qmp.late_reply_discarded", cmd=late_command, id=command_id, error=error is not None)
        else:
            self._log.warning("qmp.reply_for_unknown_id", id=command_id)

    def _oversized(self, message: OversizedMessage) -> None:
        limit = self._proto.max_message_size
        if message.id is None:
            self.oversized_events += 1
            self._log.warning("qmp.oversized_message_dropped", size=message.size, limit=limit, event=message.is_event)
            return
        with self._state_lock:
            pending = self._pending.get(message.id)
            if pending is not None and not pending.done:
                pending.failure = MessageTooLarge(
                    f"{pending.command}: the reply is {message.size} bytes, over the {limit}-byte limit; "
                    "the command ran but its reply was discarded",
                    command=pending.command,
                    size=message.size,
                    limit=limit,
                )
                pending.done = True
                self._wake(pending)
                return
        self._log.warning("qmp.oversized_message_dropped", id=message.id, size=message.size, limit=limit)

    def _fail(self, error_type: type[QMPError], why: str, *, closing: bool = False) -> None:
        """The connection is unusable: fail every waiter now and every later call at once."""
        with self._state_lock:
            if self._failure is not None:
                return
            self._failure = (error_type, why)
            pending = [p for p in self._pending.values() if not p.done]
            for p in pending:
                p.failure = error_type(f"{why} while {p.command} was pending; its outcome is unknown")
                p.done = True
                self._wake(p)
            subscriptions = self._subscriptions
        for subscription in subscriptions:
            subscription.fail(ConnectionLost(why) if error_type is not StateError else StateError(why))
        self._stop.set()
        if not closing:
            self._log.info("qmp.connection_lost", reason=why, pending=[p.command for p in pending])
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        if self._callbacks is not None:
            self._callbacks.offer_disconnect(None if closing else ConnectionLost(why))

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise StateError(f"{self.name}: the monitor is closed")
        if self._failure is not None:
            error_type, why = self._failure
            raise ConnectionLost(why) if error_type is ProtocolError else error_type(why)

    def _background_reader(self) -> None:
        stop = self._stop
        while not stop.is_set():
            with self._state_lock:
                busy = self._active > 0 or time.monotonic() - self._last_activity < _BACKGROUND_IDLE
            if busy:
                stop.wait(_BACKGROUND_IDLE)
                continue
            self._background_wants_pump = True
            try:
                if not self._pump.acquire(False):
                    stop.wait(_BACKGROUND_IDLE)
                    continue
                try:
                    self._background_read()
                finally:
                    self._release_pump()
            finally:
                self._background_wants_pump = False

    def _background_read(self) -> None:
        """Read while idle; step down as soon as a caller wants the pump."""
        while not self._stop.is_set() and self._failure is None:
            ready = self._poll_background.poll()
            if any(fd == self._wakefd for fd, _ in ready):
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._wakefd)
                return
            self._read_once(self._poll_sock, 0)
            if self._active:
                return

    # -- events -----------------------------------------------------------------------------

    def _deliver_event(self, event: Event) -> None:
        self._history.append(event)
        for subscription in self._subscriptions:
            if subscription.filter.accepts(event):
                subscription.deliver(event)
        if self._callbacks is not None and self._callbacks.wants_events:
            self._callbacks.offer_event(event)
        if event.name not in self.quiet_events:
            if self._debug_enabled(_DEBUG):
                self._log.debug("qmp.event", name=event.name, data=redact_value(dict(event.data)))
            if self._transcript is not None:
                self._transcript.write(
                    "recv", {"event": event.name, "data": redact_value(dict(event.data)), "timestamp": event.timestamp}
                )

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> Subscription:
        """Subscribe to future events (all of them when no names are given).

        Use it as a context manager, and enter it *before* sending the command whose event you
        need. ``match`` is a subset of the event's data or a predicate on the event.
        """
        subscription = Subscription(EventFilter(names, match), maxsize=maxsize, on_close=self._unsubscribe)
        with self._state_lock:
            self._raise_if_unusable()
            self._subscriptions = (*self._subscriptions, subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._state_lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not subscription)

    def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event:
        """Wait for a *future* event; for one that may already have happened, see ``recent_events``."""
        with self.events(name, match=match, maxsize=1) as subscription:
            return subscription.get(timeout)

    def recent_events(self, *names: str, since: float | None = None, match: Match = None) -> list[Event]:
        """Events from the bounded history, oldest first; ``since`` is QEMU wall-clock seconds."""
        return self._history.query(names, since=since, match=match)

    @property
    def history_evicted(self) -> int:
        """Events that fell out of the bounded history."""
        return self._history.evicted

    def on_event(self, callback: EventCallback, *names: str, match: Match = None) -> Callable[[], None]:
        """Call ``callback(event)`` for matching events, on a callback thread; returns an unregister function."""
        return self._callback_runner().add_event_callback(EventFilter(names, match), callback)

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        """Call ``callback(error)`` once when the connection ends (``None`` for a local close)."""
        return self._callback_runner().add_disconnect_callback(callback)

    @property
    def callback_events_dropped(self) -> int:
        return self._callbacks.dropped if self._callbacks is not None else 0

    def _callback_runner(self) -> CallbackRunner:
        with self._state_lock:
            self._raise_if_unusable()
            if self._callbacks is None:
                self._callbacks = CallbackRunner(name=self.name, log=self._log)
            return self._callbacks

    # -- capabilities -----------------------------------------------------------------------

    def supports(self, command: str) -> bool:
        """Whether QEMU knows ``command`` (from ``query-commands``, fetched once)."""
        if self._commands is None:
            self._commands = frozenset(str(c["name"]) for c in self.execute("query-commands"))
        return command in self._commands

    @property
    def schema(self) -> QMPSchema:
        """QEMU's QMP schema (``query-qmp-schema``), fetched on first use and cached."""
        if self._schema is None:
            self._schema = QMPSchema.from_qmp(self.execute("query-qmp-schema"))
        return self._schema

    # -- logging ----------------------------------------------------------------------------

    def _log_command(self, pending: _Pending, outcome: str, arguments: Mapping[str, Any] | None) -> None:
        """One line per command: debug when QEMU answered (even with an error), warning on timeout."""
        if pending.command in self.quiet_commands:
            return
        method = self._log.warning if outcome == "timeout" else self._log.debug
        fields: dict[str, Any] = {
            "cmd": pending.command,
            "id": pending.id,
            "ms": round((time.monotonic() - pending.started) * 1000, 3),
            "outcome": outcome,
            "arguments": redact_arguments(pending.command, arguments),
        }
        if pending.failure is not None:
            fields["error"] = str(pending.failure)
        method("qmp.command", **fields)

    def _transcribe_command(self, command: str, command_id: str, arguments: Mapping[str, Any] | None) -> None:
        if self._transcript is not None and command not in self.quiet_commands:
            record: dict[str, Any] = {"execute": command, "id": command_id}
            if arguments:
                record["arguments"] = redact_arguments(command, arguments)
            self._transcript.write("send", record)


def _reply_record(command_id: str, value: Any, error: Mapping[str, Any] | None) -> dict[str, Any]:
    if error is not None:
        return {"id": command_id, "error": dict(error)}
    return {"id": command_id, "return": redact_value(value)}


def _coalesce(batch: list[tuple[bytes, Sequence[int]]]) -> list[tuple[bytes, Sequence[int]]]:
    """Join queued commands into as few writes as possible; a command with fds starts a write."""
    if len(batch) == 1:
        return batch
    chunks: list[tuple[bytes, Sequence[int]]] = []
    pieces: list[bytes] = []
    chunk_fds: Sequence[int] = ()
    for data, fds in batch:
        if fds and pieces:
            chunks.append((b"".join(pieces), chunk_fds))
            pieces = []
        if fds:
            chunk_fds = fds
        elif not pieces:
            chunk_fds = ()
        pieces.append(data)
    chunks.append((b"".join(pieces), chunk_fds))
    return chunks


def _poll_ms(seconds: float) -> int:
    # Round up so a short wait does not turn into a busy loop of zero-length polls.
    return max(0, int(seconds * 1000) + 1)


def connect(
    address: Address,
    *,
    timeout: float = 10.0,
    name: str | None = None,
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
    oob: bool = True,
    timeouts: TimeoutPolicy | None = None,
    quiet_commands: Iterable[str] = DEFAULT_QUIET_COMMANDS,
    quiet_events: Iterable[str] = DEFAULT_QUIET_EVENTS,
    event_history: int = 1000,
    transcript: str | os.PathLike[str] | None = None,
) -> Monitor:
    """Connect to a QMP monitor and negotiate capabilities, all within ``timeout`` seconds.

    ``address`` is a unix socket path, a ``(host, port)`` pair or a connected socket. While the
    socket does not exist or refuses connections (QEMU still starting), connecting is retried.
    """
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise InvalidArgument(f"timeout must be a positive number of seconds, not {timeout!r}")
    started = time.monotonic()
    sock = open_socket(address, timeout=timeout)
    try:
        monitor = Monitor(
            sock,
            name=name or describe(address),
            max_message_size=max_message_size,
            oob=oob,
            timeouts=timeouts,
            quiet_commands=quiet_commands,
            quiet_events=quiet_events,
            event_history=event_history,
            transcript=transcript,
        )
    except BaseException:
        sock.close()
        raise
    try:
        monitor._handshake(max(0.001, timeout - (time.monotonic() - started)))
    except BaseException:
        monitor.close()
        raise
    return monitor
