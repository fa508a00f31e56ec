"""The threaded QMP face: I/O and waiting for ``QMPProtocol``, safe to share between threads.

Every rule lives in the core (``vmctl.qmp.protocol``); this face holds one lock around it and
does the reading, writing and waiting. Reading is done by whichever thread needs it
("leader/follower"): a thread waiting for a reply, or for an event in ``Subscription.get``,
takes the read side (the *pump*) if it is free and reads until it has what it waits for,
handing replies and events for others to them on the way. A sequential caller therefore reads
its own reply with no thread switch, and an event that arrives just after a command is read by
the thread waiting for it. While nobody holds the pump, the process's one reactor thread
(``vmctl.qmp.reactor``) watches the socket for every monitor, so that callbacks and a dying
QEMU are noticed at once; it only ever takes a free pump, for one read. Whoever finds bytes to
write writes them (commands from several threads go out in one system call); a write that
cannot finish before its writer's deadline is left to the next writer (or the reactor), never
cut short.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from vmctl.errors import CommandTimeout, ConnectError, ConnectionLost, InvalidArgument, QMPError
from vmctl.qmp.callbacks import CallbackRunner, DisconnectCallback, EventCallback
from vmctl.qmp.events import EventFilter, Match, Subscription
from vmctl.qmp.face import Face
from vmctl.qmp.messages import Event
from vmctl.qmp.protocol import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DEFAULT_QUIET_COMMANDS,
    DEFAULT_QUIET_EVENTS,
    Command,
    ConnectionState,
    QMPProtocol,
)
from vmctl.qmp.reactor import READABLE, WRITABLE, reactor
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.stream import SocketStream, Stream
from vmctl.qmp.timeouts import MAX_WAIT_SLICE, TimeoutPolicy, check_timeout
from vmctl.qmp.transport import Address, FileDescriptor, describe, fd_numbers, open_socket

__all__ = ["DEFAULT_QUIET_COMMANDS", "DEFAULT_QUIET_EVENTS", "Monitor", "connect"]

# Below malloc's mmap threshold: a larger buffer costs page faults on every read.
RECV_SIZE: Final = 64 * 1024
# A follower re-checks whether it should read or write at least this often, so progress never
# depends on a single wake-up being delivered.
_FOLLOWER_SLICE: Final = 0.01
_POLL_IN: Final = select.POLLIN | select.POLLHUP | select.POLLERR


class _Waiter:
    """Wakes the thread waiting for one command: a binary semaphore, made only if it has to wait
    (a caller that reads its own reply never does). Once made, its lock is released (a wake-up
    is pending) exactly while ``woken`` is true."""

    __slots__ = ("_lock", "woken")

    def __init__(self) -> None:
        self._lock: threading.Lock | None = None
        self.woken = False

    def wake(self) -> None:
        # Called under the monitor's lock.
        if not self.woken:
            self.woken = True
            if self._lock is not None:
                self._lock.release()

    def wait(self, monitor_lock: threading.Lock, timeout: float) -> None:
        """Sleep until woken or ``timeout``; spurious returns are fine (the caller re-checks)."""
        with monitor_lock:
            if self._lock is None:
                if self.woken:  # woken before it had a lock: nothing to consume
                    self.woken = False
                    return
                self._lock = threading.Lock()
                self._lock.acquire()
        if self._lock.acquire(True, timeout):
            self.woken = False


class Monitor(Face):
    """A QMP connection for threads. Create it with :func:`vmctl.qmp.connect`."""

    def __init__(self, stream: Stream, core: QMPProtocol) -> None:
        """Drive ``core`` (a fresh ``QMPProtocol``) over ``stream``; :func:`connect` makes both."""
        self._stream = stream
        super().__init__(core)
        self._core.on_disconnect = self._on_disconnect
        self._lock = threading.Lock()  # around every call into the core
        self._pump = threading.Lock()  # the read side
        self._writing = False
        self._callbacks: CallbackRunner | None = None
        self._commands: frozenset[str] | None = None
        self._schema: QMPSchema | None = None
        self._wakefd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._fileno = stream.fileno()
        # The pump holder's poll set: the stream, and the eventfd through which a writer that
        # stepped down kicks it (a write was left for it to finish).
        self._poller = select.poll()
        self._poller.register(self._fileno, _POLL_IN)
        self._poller.register(self._wakefd, select.POLLIN)
        self._reactor = reactor()
        self._registered = False

    # -- connection lifecycle --------------------------------------------------------------

    def _handshake(self, timeout: float) -> None:
        """Read the greeting and negotiate capabilities; then let the reactor watch while idle."""
        deadline = time.monotonic() + timeout
        core = self._core
        with self._pump:
            while core.connection_state is ConnectionState.CONNECTING:
                if core.wants_write:
                    self._flush(deadline)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ConnectError(f"{self.name}: no {core.awaiting} within the connect timeout")
                self._read_once(remaining)
        if core.connection_state is not ConnectionState.RUNNING:
            raise core.handshake_error()
        self._reactor.register(self._fileno, self._on_ready, self._idle_events())
        self._registered = True

    def close(self) -> None:
        """Close the connection. Pending commands fail with ``ConnectionLost``; idempotent."""
        with self._lock:
            if self._core.connection_state is ConnectionState.CLOSED:
                return
            self._core.close()
        self._unregister()
        self._kick()
        self._stream.shutdown()
        # Close the fds only once no reader can be inside poll() on them.
        got_pump = self._pump.acquire(timeout=2.0)
        try:
            self._stream.close()
            os.close(self._wakefd)
        finally:
            if got_pump:
                self._pump.release()
        if self._callbacks is not None:
            self._callbacks.stop()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def fds_held(self) -> int:
        """Duplicated fds vmctl holds for commands QEMU has not answered yet."""
        with self._lock:
            return self._core.fds_held

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
        ``getfd``); vmctl passes duplicates, so the caller may close its files as soon as this
        returns, even after a timeout. Raises a ``CommandError`` subclass for QEMU's error,
        ``CommandTimeout`` when no reply comes within ``timeout`` (default: by command kind),
        ``ConnectionLost`` when the connection goes away.
        """
        fd_list = fd_numbers(fds) if fds else ()
        if fd_list and not self._stream.passes_fds:
            raise InvalidArgument(f"{command}: file descriptors can only be passed over a unix socket")
        waiter = _Waiter()
        core = self._core
        with self._lock:
            cmd = core.command(command, arguments, fds=fd_list, timeout=timeout, oob=oob, waker=waiter)
            out = None
            if not self._writing:
                out = core.data_to_send()
                self._writing = out is not None
        try:
            if out is not None:
                self._write(out, cmd.deadline)
            self._await(cmd, waiter)
            if not cmd.done:
                with self._lock:
                    timed_out = self._core.abandon(cmd)
                if timed_out:
                    raise CommandTimeout(command=command, timeout=cmd.timeout)
        except CommandTimeout:
            raise
        except BaseException:
            with self._lock:
                self._core.abandon(cmd)
            raise
        return cmd.result()

    def human(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human-monitor (HMP) command line and return its text output."""
        if not isinstance(command_line, str) or not command_line.strip():
            raise InvalidArgument("the HMP command line must be a non-empty string")
        output = self.execute("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        return str(output)

    def _await(self, cmd: Command, waiter: _Waiter) -> None:
        def done() -> bool:
            return cmd.done

        while not cmd.done:
            remaining = cmd.deadline - time.monotonic()
            if remaining <= 0:
                return
            if self._core.wants_write and not self._writing:
                self._flush(cmd.deadline)
            if self._read_for(done, cmd.deadline):
                continue
            waiter.wait(self._lock, min(remaining, _FOLLOWER_SLICE))

    def _read_for(self, done: Callable[[], bool], deadline: float) -> bool:
        """Read on this thread until ``done()`` or the deadline, if the read side is free (else False)."""
        if not self._pump.acquire(False):
            return False
        try:
            self._disarm()  # this thread reads now: the reactor need not wake for it
            while not done() and self._core.connection_state is ConnectionState.RUNNING:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._read_once(remaining)
        finally:
            self._release_pump()
        return True

    def _release_pump(self) -> None:
        """Give up the read side: the reactor watches again, and one waiter is woken to read."""
        self._pump.release()
        self._arm()
        core = self._core
        if not (core.has_waiters or core.subscriptions):
            return  # nobody to hand over to; whoever comes next finds the pump free
        with self._lock:
            for cmd in self._core.waiting():
                waiter = cmd.waker
                assert isinstance(waiter, _Waiter)
                if not waiter.woken:
                    waiter.wake()
                    break
            subscriptions = self._core.subscriptions
        for subscription in subscriptions:
            if isinstance(subscription, Subscription):
                subscription.poke()

    def _kick(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wakefd, 1)

    # -- writing (by whoever finds bytes to write) -----------------------------------------

    def _flush(self, deadline: float) -> None:
        """Write what the core has to send, unless another thread is writing."""
        with self._lock:
            if self._writing:
                return
            out = self._core.data_to_send()
            if out is None:
                return
            self._writing = True
        self._write(out, deadline)

    def _write(self, out: tuple[bytes, tuple[int, ...]] | None, deadline: float) -> None:
        """Write ``out`` and whatever the core has next, holding the writer role, until done or ``deadline``.

        A writer whose deadline passes steps down and leaves the rest to the next writer (a
        waiting caller or the background reader): one caller's deadline never cuts another's
        bytes short. An exception in the middle of a write fails the connection, because the
        stream may then hold half a command."""
        core = self._core
        try:
            while out is not None:
                try:
                    sent = self._stream.send(*out)
                except BlockingIOError:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or not _wait_writable(self._fileno, remaining):
                        return
                    continue
                except OSError as exc:
                    with self._lock:
                        core.fail(ConnectionLost, f"{self.name}: sending to QEMU failed: {exc}")
                    return
                with self._lock:
                    core.bytes_sent(sent)
                    out = core.data_to_send()
                    if out is None:
                        self._writing = False
        except BaseException:
            with self._lock:
                core.send_interrupted()
            raise
        finally:
            if out is not None:  # stepped down, failed or interrupted: give up the role
                with self._lock:
                    self._writing = False
                    left_over = core.wants_write
                if left_over:
                    self._kick()  # a thread holding the read side picks the write up ...
                    if self._pump.acquire(False):
                        self._release_pump()  # ... or, if none, the reactor (armed for writing)

    # -- reading (only by the pump holder) --------------------------------------------------

    def _read_once(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for QEMU, then read (and write, when bytes wait); True if kicked."""
        core = self._core
        wants_write = core.wants_write and not self._writing
        poller = self._poller
        if wants_write:
            poller.modify(self._fileno, _POLL_IN | select.POLLOUT)
        ready = poller.poll(_poll_ms(timeout))
        if wants_write:
            poller.modify(self._fileno, _POLL_IN)
        kicked = readable = False
        for fd, mask in ready:
            if fd == self._wakefd:
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._wakefd)
                kicked = True
            else:
                if mask & select.POLLOUT:
                    self._flush(time.monotonic() + _FOLLOWER_SLICE)
                readable = bool(mask & _POLL_IN)
        if readable:
            self._receive()
        return kicked

    def _receive(self) -> None:
        """Read what QEMU sent (the caller holds the read side) and hand it to the core."""
        core = self._core
        try:
            data = self._stream.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            with self._lock:
                core.fail(ConnectionLost, f"{self.name}: reading from QEMU failed: {exc}")
            return
        with self._lock:
            core.receive_data(data)
        if core.wants_write and not self._writing:
            self._flush(time.monotonic() + _FOLLOWER_SLICE)  # e.g. a command that waited for the fd slot

    # -- the reactor (while nobody else reads) ----------------------------------------------

    def _on_ready(self, events: int) -> None:
        """On the reactor thread: QEMU sent something, or the socket takes the bytes left to write."""
        if not self._pump.acquire(False):
            return  # a thread reads already; it re-arms the reactor when it lets go
        try:
            if self._core.connection_state is not ConnectionState.RUNNING:
                return
            if events & WRITABLE:
                self._flush(time.monotonic())  # never blocks the reactor
            if events & ~WRITABLE:
                self._receive()
        finally:
            self._release_pump()

    def _idle_events(self) -> int:
        return READABLE | (WRITABLE if self._core.wants_write and not self._writing else 0)

    def _arm(self) -> None:
        if self._registered and self._core.connection_state is ConnectionState.RUNNING:
            self._reactor.arm(self._fileno, self._idle_events())

    def _disarm(self) -> None:
        if self._registered:
            self._reactor.arm(self._fileno, 0)

    def _unregister(self) -> None:
        if self._registered:
            self._registered = False
            self._reactor.unregister(self._fileno)

    def _on_disconnect(self, error: QMPError | None) -> None:
        # Called by the core (under the lock) when the connection ends.
        self._unregister()
        if error is not None:
            self._stream.shutdown()
        if self._callbacks is not None:
            self._callbacks.offer_disconnect(error)

    # -- events -----------------------------------------------------------------------------

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> Subscription:
        """Subscribe to future events (all of them when no names are given).

        Use it as a context manager, and enter it *before* sending the command whose event you
        need. ``match`` is a subset of the event's data or a predicate on the event; it runs on
        the thread reading QMP, so it must be quick and must not call the monitor. If it
        raises, the subscription ends with ``EventMatchError`` and nothing else is affected.
        """
        subscription = Subscription(
            EventFilter(names, match), maxsize=maxsize, on_close=self._unsubscribe, reader=self._read_for
        )
        with self._lock:
            self._core.subscribe(subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._core.unsubscribe(subscription)

    def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event:
        """Wait for a *future* event; for one that may already have happened, see ``recent_events``."""
        check_timeout(timeout, allow_zero=True)
        with self.events(name, match=match, maxsize=1) as subscription:
            return subscription.get(timeout)

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
        with self._lock:
            self._core.guard(ConnectionState.RUNNING)
            if self._callbacks is None:
                self._callbacks = CallbackRunner(name=self.name, log=self._core.log)
                self._core.on_event = self._callbacks.offer_event
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


def _poll_ms(seconds: float) -> int:
    # Round up so a short wait does not turn into a busy loop of zero-length polls; cap one wait.
    return max(0, int(min(seconds, MAX_WAIT_SLICE) * 1000) + 1)


def _wait_writable(fileno: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fileno, select.POLLOUT)
    return bool(poller.poll(_poll_ms(timeout)))


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
    timeout = check_timeout(timeout)
    started = time.monotonic()
    sock = open_socket(address, timeout=timeout)
    try:
        core = QMPProtocol(
            name=name or describe(address),
            max_message_size=max_message_size,
            oob=oob,
            timeouts=timeouts,
            quiet_commands=quiet_commands,
            quiet_events=quiet_events,
            event_history=event_history,
            transcript=transcript,
        )
        monitor = Monitor(SocketStream(sock), core)
    except BaseException:
        sock.close()
        raise
    try:
        monitor._handshake(max(0.001, timeout - (time.monotonic() - started)))
    except BaseException:
        monitor.close()
        raise
    return monitor
