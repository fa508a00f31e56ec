"""The QMP connection core: every rule of a QMP client connection, and no I/O (like h11).

A face feeds it what it reads (``receive_data``) and asks it what to write (``data_to_send``,
then ``bytes_sent``); the core decides everything else, so the threaded face
(``vmctl.qmp.monitor``) and the asyncio face (``vmctl.qmp.aio``) share every rule:

- **correlation**: ids are allocated here; a reply completes the command with its id; the reply
  of a command whose caller gave up is discarded (with a warning) and frees what it held.
- **never sent late**: a command whose caller gives up before its bytes were handed out for
  writing is dropped, never sent.
- **fds**: a command's fds are duplicated when it is queued, so the caller may close its own the
  moment it returns; the duplicates are closed when QEMU answered, when the command is dropped
  unsent, or when the connection ends. The number sent is always the caller's file.
- **the fd slot**: QEMU keeps the fds of its last read in one slot, replaced by the next read
  carrying fds, so an fd-passing command is handed out only while no other is between its send
  and its reply. A caller giving up does not free the slot; the reply (or the end) does.
- **whole sends**: bytes handed out are written completely (a partial write is resumed by
  whoever writes next) or, when a write was interrupted, the connection fails for everyone.
- **errors**: QEMU's error classes map into the error tree (``ErrorReply.failure``, which the
  libvirt relay raises too); an oversized or undecodable reply fails only its command; anything
  else unreadable fails the connection.
- **events**: the history, subscriptions (``vmctl.qmp.subscribers``), the callback hook.

Its parts: the send side (the queue, the fd slot, the write in progress) is ``vmctl.qmp.outbox``;
the log lines and the transcript, redacted, are ``vmctl.qmp.record``. The core is not
thread-safe: the threaded face holds one lock around every call into it.
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from vmctl.errors import ConnectError, ConnectionLost, MessageTooLarge, ProtocolError, QMPError, StateError
from vmctl.logs import get_logger
from vmctl.qmp import messages
from vmctl.qmp.codec import DEFAULT_MAX_MESSAGE_SIZE, Phase, QMPCodec
from vmctl.qmp.connstate import ConnectionState, ConnectionStateMachine
from vmctl.qmp.events import EventHistory
from vmctl.qmp.outbox import Command, Outbox, Waker, duplicate
from vmctl.qmp.record import Record
from vmctl.qmp.subscribers import EventSink, Subscribers
from vmctl.qmp.timeouts import TimeoutPolicy

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "Command", "ConnectionState", "EventSink", "QMPProtocol", "Waker"]

log = get_logger(__name__)

DEFAULT_QUIET_COMMANDS: Final = frozenset({"ringbuf-read", "query-migrate"})
DEFAULT_QUIET_EVENTS: Final = frozenset({"RTC_CHANGE"})

_LATE_REPLY_MEMORY: Final = 1024


class QMPProtocol:
    """One QMP client connection, sans I/O. Faces: ``vmctl.qmp.monitor`` and ``vmctl.qmp.aio``."""

    def __init__(
        self,
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
        self.history = EventHistory(event_history)
        self._codec = QMPCodec(max_message_size=max_message_size, oob=oob)
        self._connection = ConnectionStateMachine(name)
        self._log = log.bind(monitor=name)
        self._record = Record(
            self._log, quiet_commands=self.quiet_commands, quiet_events=self.quiet_events, transcript=transcript
        )
        self._recording = self._record.active
        self._pending: dict[str, Command] = {}  # queued or sent; a caller waits for each
        self._late: collections.OrderedDict[str, Command] = collections.OrderedDict()  # sent, caller gone
        self._outbox = Outbox(self._record.sent)
        self._subscribers = Subscribers(self._log)
        # What each kind of message the codec hands out does: one lookup per message.
        self._handlers: dict[type, Callable[[Any], None]] = {
            messages.Reply: self._complete,
            messages.Event: self._deliver_event,
            messages.ErrorReply: self._error_reply,
            messages.OversizedMessage: self._oversized,
            messages.UndecodableMessage: self._undecodable,
            messages.Greeting: self._greeted,
            messages.Negotiated: self._negotiated,
        }
        self.oversized_events = 0
        #: Face hooks: every event (for callbacks), and the end of the connection (``None``: closed locally).
        self.on_event: Callable[[messages.Event], None] | None = None
        self.on_disconnect: Callable[[QMPError | None], None] | None = None

    # -- state -----------------------------------------------------------------------------

    @property
    def connection_state(self) -> ConnectionState:
        return self._connection.state

    def guard(self, *allowed: ConnectionState) -> None:
        """Raise what a call gets in this connection state unless it is one of ``allowed``."""
        self._connection.guard(*allowed)

    @property
    def greeting(self) -> messages.Greeting:
        greeting = self._codec.greeting
        if greeting is None:
            raise StateError(f"{self.name}: no QMP greeting yet")
        return greeting

    @property
    def version(self) -> messages.QEMUVersion:
        return self.greeting.version

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self._codec.capabilities

    @property
    def max_message_size(self) -> int:
        return self._codec.max_message_size

    @property
    def late_replies(self) -> int:
        """Commands whose caller gave up after they were sent, whose reply will be discarded."""
        return len(self._late)

    @property
    def fds_held(self) -> int:
        """Duplicated fds held for queued or unanswered commands."""
        return sum(len(c.fds) for c in (*self._pending.values(), *self._late.values()))

    @property
    def log(self) -> Any:
        """The connection's logger (bound to its name), for the faces' own lines."""
        return self._log

    @property
    def awaiting(self) -> str:
        """What the handshake waits for (for error messages)."""
        return "QMP greeting" if self._codec.phase is Phase.AWAITING_GREETING else "reply to qmp_capabilities"

    @property
    def has_waiters(self) -> bool:
        return bool(self._pending)

    def waiting(self) -> Iterable[Command]:
        """The commands callers are waiting for (queued or sent)."""
        return self._pending.values()

    @property
    def subscriptions(self) -> tuple[EventSink, ...]:
        return self._subscribers.sinks

    def handshake_error(self) -> ConnectError:
        """Why the handshake failed, as the ``ConnectError`` a face raises."""
        why = self._connection.failure[1] if self._connection.failure else f"{self.name}: the handshake did not finish"
        return ConnectError(why)

    # -- commands --------------------------------------------------------------------------

    def command(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        waker: Waker,
        fds: Sequence[int] = (),
        timeout: float | None = None,
        oob: bool = False,
    ) -> Command:
        """Queue a command. Bad input raises ``InvalidArgument`` here, before anything is sent."""
        if self._connection.state is not ConnectionState.RUNNING:
            self._connection.guard(ConnectionState.RUNNING)
        seconds = self.timeouts.for_command(name, timeout)
        command_id, data = self._codec.send_command(name, arguments, oob=oob)
        command = Command(
            command_id=command_id,
            name=name,
            arguments=arguments,
            data=data,
            fds=duplicate(fds, name) if fds else (),
            timeout=seconds,
            waker=waker,
        )
        self._pending[command_id] = command
        self._outbox.push(command)
        return command

    @property
    def wants_write(self) -> bool:
        """Whether ``data_to_send`` has something now."""
        return self._outbox.wants_write

    def data_to_send(self) -> tuple[bytes, tuple[int, ...]] | None:
        """The bytes to write next and the fds to pass with them; follow with ``bytes_sent``."""
        return self._outbox.data_to_send()

    def bytes_sent(self, count: int) -> None:
        """``count`` bytes of what ``data_to_send`` returned were written."""
        self._outbox.bytes_sent(count)

    def io_failed(self, doing: str, error: OSError) -> None:
        """Reading from or writing to QEMU failed (``doing``: "reading from", "sending to")."""
        self.fail(ConnectionLost, f"{self.name}: {doing} QEMU failed: {error}")

    def send_interrupted(self) -> None:
        """A write was interrupted (a signal handler raised): the stream may hold half a command."""
        if self._outbox.writing:
            self.fail(ConnectionLost, f"{self.name}: a send to QEMU was interrupted; the stream cannot be trusted")

    def abandon(self, command: Command) -> bool:
        """The caller gives up (timeout, cancellation). False if the command is already done.

        An unsent command is dropped and never sent; a sent one's reply will be discarded."""
        if command.done or command.abandoned:
            return False
        command.abandoned = True
        self._pending.pop(command.id, None)
        if not command.sent:
            self._outbox.drop(command)
            self._outbox.release(command)
            command.done = True
        else:
            self._late[command.id] = command
            while len(self._late) > _LATE_REPLY_MEMORY:
                _, evicted = self._late.popitem(last=False)
                self._outbox.release(evicted)
        self._record.gave_up(command)
        return True

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from QEMU; ``b""`` is the end of the stream."""
        if self._connection.state not in (ConnectionState.CONNECTING, ConnectionState.RUNNING):
            return
        error: ProtocolError | None = None
        try:
            try:
                self._codec.receive_data(data)
            except ProtocolError as exc:
                error = exc
            handlers = self._handlers
            for message in self._codec.take_messages():
                handlers[type(message)](message)
        except BaseException:
            # Interrupted (a signal handler raised): bytes were taken but perhaps not all handled,
            # so a reply may be lost for good; nobody is left waiting for it.
            self._log.exception("qmp.receive_interrupted")
            self.fail(ConnectionLost, f"{self.name}: reading from QEMU was interrupted")
            raise
        if error is not None:
            self.fail(ProtocolError, self._describe_failure(f"invalid {self.awaiting}: {error}", str(error)))
        elif not data:
            self.fail(
                ConnectionLost,
                self._describe_failure(
                    f"QEMU closed the connection while we waited for the {self.awaiting}", "QEMU closed the connection"
                ),
            )

    def _describe_failure(self, during_handshake: str, running: str) -> str:
        connecting = self._connection.state is ConnectionState.CONNECTING
        return f"{self.name}: {during_handshake if connecting else running}"

    def _greeted(self, greeting: messages.Greeting) -> None:
        self._outbox.push_raw(self._codec.start_negotiation())

    def _negotiated(self, negotiated: messages.Negotiated) -> None:
        self._connection.transition(ConnectionState.RUNNING)
        self._log.info("qmp.connected", qemu=str(self.version), capabilities=list(self.capabilities))

    def _error_reply(self, reply: messages.ErrorReply) -> None:
        if reply.id is None:
            self._log.warning("qmp.error_without_id", error=dict(reply.error))
        else:
            self._complete(reply)

    def _complete(self, reply: messages.Reply | messages.ErrorReply) -> None:
        command_id = reply.id
        assert command_id is not None
        command = self._pending.pop(command_id, None)
        if command is None:
            late = self._late.pop(command_id, None)
            failed = type(reply) is messages.ErrorReply
            if late is not None:
                self._outbox.release(late)
                self._log.warning("qmp.late_reply_discarded", cmd=late.name, id=command_id, error=failed)
            else:
                self._log.warning("qmp.reply_for_unknown_id", id=command_id)
            return
        if isinstance(reply, messages.ErrorReply):
            command.failure = reply.failure(command.name)
        else:
            command.value = reply.value
        if self._recording:
            self._record.answered(command, reply)
        self._finish(command)

    def _finish(self, command: Command) -> None:
        self._outbox.release(command)
        command.done = True
        command.waker.wake()

    def _fail_command(self, command_id: str | None, failure: Callable[[Command], QMPError]) -> bool:
        command = self._pending.pop(command_id, None) if command_id is not None else None
        if command is None:
            late = self._late.pop(command_id, None) if command_id is not None else None
            if late is not None:
                self._outbox.release(late)
            return late is not None
        command.failure = failure(command)
        if self._recording:
            self._record.outcome(command)
        self._finish(command)
        return True

    def _oversized(self, message: messages.OversizedMessage) -> None:
        limit = self._codec.max_message_size

        def too_large(command: Command) -> QMPError:
            return MessageTooLarge(
                f"{command.name}: the reply is {message.size} bytes, over the {limit}-byte limit; "
                "the command ran but its reply was discarded",
                command=command.name,
                size=message.size,
                limit=limit,
            )

        if not self._fail_command(message.id, too_large):
            if message.id is None:
                self.oversized_events += 1
            self._log.warning(
                "qmp.oversized_message_dropped",
                id=message.id,
                size=message.size,
                limit=limit,
                is_event=message.is_event,
            )

    def _undecodable(self, message: messages.UndecodableMessage) -> None:
        def undecodable(command: Command) -> QMPError:
            return ProtocolError(
                f"{command.name}: QEMU's reply ({message.size} bytes) is {message.why}; "
                "the command ran but its reply was discarded (the connection is fine)"
            )

        if not self._fail_command(message.id, undecodable):
            self._log.warning("qmp.undecodable_message_dropped", id=message.id, size=message.size, why=message.why)

    # -- the end ---------------------------------------------------------------------------

    def fail(self, error_type: type[QMPError], why: str, *, closing: bool = False) -> None:
        """The connection is unusable: every waiter fails now, every later call at once."""
        if not self._connection.transition(ConnectionState.DISCONNECTED):
            return
        self._connection.failure = (error_type, why)
        pending = list(self._pending.values())
        self._pending.clear()
        for command in pending:
            outcome = "its outcome is unknown" if command.sent else "it was not sent"
            command.failure = error_type(f"{why} while {command.name} was pending; {outcome}")
            self._finish(command)
        for late in self._late.values():
            self._outbox.release(late)
        self._late.clear()
        self._outbox.clear()
        for subscription in self._subscribers.take():
            subscription.fail(StateError(why) if error_type is StateError else ConnectionLost(why))
        if not closing:
            self._log.info("qmp.connection_lost", reason=why, pending=[c.name for c in pending])
        if self.on_disconnect is not None:
            self.on_disconnect(None if closing else ConnectionLost(why))

    def close(self) -> None:
        """Closed locally: pending commands fail with ``ConnectionLost``; idempotent."""
        if self._connection.state is ConnectionState.CLOSED:
            return
        had_failed = self._connection.state is ConnectionState.DISCONNECTED
        self.fail(ConnectionLost, f"{self.name}: the monitor was closed locally", closing=True)
        self._connection.transition(ConnectionState.CLOSED)
        self._record.close()
        if not had_failed:
            self._log.info("qmp.closed")

    # -- events ----------------------------------------------------------------------------

    def subscribe(self, sink: EventSink) -> None:
        self._connection.guard(ConnectionState.CONNECTING, ConnectionState.RUNNING)
        self._subscribers.add(sink)

    def unsubscribe(self, sink: EventSink) -> None:
        self._subscribers.remove(sink)

    def _deliver_event(self, event: messages.Event) -> None:
        self.history.append(event)
        self._subscribers.deliver(event)
        if self.on_event is not None:
            self.on_event(event)
        if self._recording:
            self._record.event(event)
