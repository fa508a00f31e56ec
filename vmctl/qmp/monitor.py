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
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Unpack

from vmctl.errors import CommandTimeout, ConnectError, InvalidArgument, QMPError
from vmctl.qmp import timeouts
from vmctl.qmp.callbacks import CallbackRunner
from vmctl.qmp.connecting import ConnectOptions, face_on
from vmctl.qmp.events import Subscription
from vmctl.qmp.face import Face
from vmctl.qmp.protocol import DEFAULT_QUIET_COMMANDS, DEFAULT_QUIET_EVENTS, Command, ConnectionState, QMPProtocol
from vmctl.qmp.reactor import READABLE, WRITABLE, reactor
from vmctl.qmp.stream import Stream
from vmctl.qmp.threaded import ThreadedMonitor
from vmctl.qmp.timeouts import check_timeout
from vmctl.qmp.transport import Address, describe, open_socket
from vmctl.qmp.waiter import Waiter, poll_ms, wait_writable

__all__ = ["DEFAULT_QUIET_COMMANDS", "DEFAULT_QUIET_EVENTS", "Monitor", "connect"]

# A follower re-checks whether it should read or write at least this often, so progress never
# depends on a single wake-up being delivered.
_FOLLOWER_SLICE: Final = 0.01
_POLL_IN: Final = select.POLLIN | select.POLLHUP | select.POLLERR


class Monitor(Face, ThreadedMonitor):
    """A QMP connection for threads. Create it with :func:`vmctl.qmp.connect`.

    Its methods for callers (``execute``, ``events``, callbacks, ...) are ``ThreadedMonitor``'s;
    this class is how commands and events travel over the socket."""

    def __init__(self, stream: Stream, core: QMPProtocol) -> None:
        """Drive ``core`` (a fresh ``QMPProtocol``) over ``stream``; :func:`connect` makes both."""
        super().__init__(stream, core)
        self._core.on_disconnect = self._on_disconnect
        self._log = core.log
        self._lock = threading.Lock()  # around every call into the core
        self._pump = threading.Lock()  # the read side
        self._event_reader = self._read_for
        self._writing = False
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

    def _execute(
        self, command: str, arguments: Mapping[str, Any] | None, fds: Sequence[int], timeout: float | None, oob: bool
    ) -> Any:
        if fds and not self._stream.passes_fds:
            raise InvalidArgument(f"{command}: file descriptors can only be passed over a unix socket")
        waiter = Waiter()
        core = self._core
        with self._lock:
            cmd = core.command(command, arguments, waker=waiter, fds=fds, timeout=timeout, oob=oob)
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

    def _await(self, cmd: Command, waiter: Waiter) -> None:
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
                assert isinstance(waiter, Waiter)
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
                    if remaining <= 0 or not wait_writable(self._fileno, remaining):
                        return
                    continue
                except OSError as exc:
                    self._io_failed("sending to", exc)
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
        ready = poller.poll(poll_ms(timeout))
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
        data = self._read_stream()
        if data is None:
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

    def _io_failed(self, doing: str, error: OSError) -> None:
        with self._lock:
            self._core.io_failed(doing, error)

    def _on_disconnect(self, error: QMPError | None) -> None:
        # Called by the core (under the lock) when the connection ends.
        self._unregister()
        if error is not None:
            self._stream.shutdown()
        if self._callbacks is not None:
            self._callbacks.offer_disconnect(error)

    # -- events (``ThreadedMonitor``'s hooks) ------------------------------------------------

    def _subscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._core.subscribe(subscription)

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._core.unsubscribe(subscription)

    def _check_running(self) -> None:
        self._core.guard(ConnectionState.RUNNING)

    def _callbacks_started(self, runner: CallbackRunner) -> None:
        self._core.on_event = runner.offer_event


def connect(
    address: Address, *, timeout: float = 10.0, name: str | None = None, **options: Unpack[ConnectOptions]
) -> Monitor:
    """Connect to a QMP monitor and negotiate capabilities, all within ``timeout`` seconds.

    ``address`` is a unix socket path, a ``(host, port)`` pair or a connected socket. While the
    socket does not exist or refuses connections (QEMU still starting), connecting is retried.
    ``options`` are ``vmctl.qmp.connecting.ConnectOptions``.
    """
    timeout = check_timeout(timeout)
    deadline = timeouts.deadline(timeout)
    monitor = face_on(Monitor, open_socket(address, timeout=timeout), name or describe(address), options)
    try:
        monitor._handshake(max(0.001, deadline - time.monotonic()))
    except BaseException:
        monitor.close()
        raise
    return monitor
