"""The asyncio QMP face: ``QMPProtocol`` driven by the event loop, with no thread at all.

Every rule lives in the core (``vmctl.qmp.protocol``), as for the threaded face; this face reads
in the loop's reader callback, writes directly (or from the writer callback when the socket is
full) and waits on futures. Many monitors share one loop and one thread::

    qmp = await vmctl.qmp.aio.connect("/run/vm1/qmp.sock", name="vm1", timeout=10)
    async with qmp:
        status = await qmp.execute("query-status")
        async with qmp.events("STOP") as stopped:
            await qmp.execute("stop")
            await stopped.get(timeout=5)

The methods callers use are coroutine twins of the threaded monitor's (``vmctl.qmp.threaded``):
their signatures and docstrings are restated on purpose, since a coroutine cannot share a body
with a function that blocks; the checks they make are the shared ones.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Unpack

import tenacity

from vmctl.errors import CommandTimeout, ConnectError, InvalidArgument, QMPError
from vmctl.qmp import timeouts
from vmctl.qmp.callbacks import DisconnectCallback, EventCallback
from vmctl.qmp.codec import hmp_arguments
from vmctl.qmp.connecting import ConnectOptions, face_on
from vmctl.qmp.events import EventBuffer, EventFilter, Match
from vmctl.qmp.face import Face
from vmctl.qmp.messages import Event
from vmctl.qmp.protocol import Command, ConnectionState, QMPProtocol
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.stream import Stream
from vmctl.qmp.timeouts import check_timeout
from vmctl.qmp.transport import (
    RETRY_IF_NOT_YET,
    RETRY_WAIT,
    Address,
    FileDescriptor,
    connect_error,
    connected_socket,
    describe,
    fd_numbers,
    socket_target,
)

__all__ = ["AsyncMonitor", "AsyncSubscription", "connect"]


class _FutureWaker:
    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    def wake(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


class AsyncSubscription(EventBuffer):
    """A subscription for asyncio: ``async with qmp.events(...) as sub: await sub.get(timeout)``."""

    def __init__(self, event_filter: EventFilter, *, maxsize: int, on_close: Callable[[Any], None]) -> None:
        super().__init__(event_filter, maxsize=maxsize, on_close=on_close)
        self._waiter: asyncio.Future[None] | None = None

    async def __aenter__(self) -> AsyncSubscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def __enter__(self) -> AsyncSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def get(self, timeout: float) -> Event:
        """The next event; ``EventTimeout`` if none arrives within ``timeout`` seconds."""
        timeout = check_timeout(timeout, allow_zero=True)
        loop = asyncio.get_running_loop()
        deadline = timeouts.deadline(timeout, now=loop.time())
        while True:
            now = loop.time()
            event = self._next(deadline, now, timeout)
            if event is not None:
                return event
            waiter = self._waiter = loop.create_future()
            expiry = loop.call_at(deadline, _resolve, waiter)
            try:
                await waiter
            finally:
                expiry.cancel()
                self._waiter = None

    def _notify(self) -> None:
        if self._waiter is not None:
            _resolve(self._waiter)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class AsyncMonitor(Face):
    """A QMP connection for asyncio. Create it with :func:`vmctl.qmp.aio.connect`."""

    def __init__(self, stream: Stream, core: QMPProtocol) -> None:
        """Drive ``core`` (a fresh ``QMPProtocol``) over ``stream``; :func:`connect` makes both."""
        self._loop = asyncio.get_running_loop()
        self._fileno = stream.fileno()
        super().__init__(stream, core)
        self._core.on_disconnect = self._on_disconnect
        self._event_callbacks: tuple[tuple[EventFilter, EventCallback], ...] = ()
        self._disconnect_callbacks: tuple[DisconnectCallback, ...] = ()
        self._callback_tasks: set[asyncio.Future[Any]] = set()
        self._connected: asyncio.Future[None] | None = None
        self._commands: frozenset[str] | None = None
        self._schema: QMPSchema | None = None
        self._writer_on = False
        self._reader_on = True
        self._loop.add_reader(self._fileno, self._on_readable)

    # -- connection lifecycle --------------------------------------------------------------

    async def _handshake(self, timeout: float) -> None:
        self._connected = self._loop.create_future()
        try:
            async with asyncio.timeout(timeout):
                await self._connected
        except TimeoutError:
            raise ConnectError(f"{self.name}: no {self._core.awaiting} within the connect timeout") from None
        if self._core.connection_state is not ConnectionState.RUNNING:
            raise self._core.handshake_error()

    async def close(self) -> None:
        """Close the connection. Pending commands fail with ``ConnectionLost``; idempotent."""
        if self._core.connection_state is ConnectionState.CLOSED:
            return
        self._core.close()
        self._stop_io()
        self._stream.close()
        await asyncio.sleep(0)  # let the disconnect callbacks scheduled by the close run

    async def __aenter__(self) -> AsyncMonitor:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def fds_held(self) -> int:
        return self._core.fds_held

    # -- commands --------------------------------------------------------------------------

    async def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[FileDescriptor] = (),
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run ``command`` and return QEMU's ``return`` value; the same rules and errors as
        ``Monitor.execute``. A cancelled caller is treated like one that timed out: a command not
        yet sent is never sent, a sent one's reply is discarded."""
        fd_list = fd_numbers(fds) if fds else ()
        if fd_list and not self._stream.passes_fds:
            raise InvalidArgument(f"{command}: file descriptors can only be passed over a unix socket")
        future: asyncio.Future[None] = self._loop.create_future()
        cmd = self._core.command(command, arguments, waker=_FutureWaker(future), fds=fd_list, timeout=timeout, oob=oob)
        if not self._writer_on:
            self._flush()
        if not cmd.done:
            expiry = self._loop.call_later(max(0.0, cmd.deadline - time.monotonic()), self._expire, cmd, future)
            try:
                await future
            except asyncio.CancelledError:
                self._core.abandon(cmd)
                raise
            finally:
                expiry.cancel()
        return cmd.result()

    def _expire(self, cmd: Command, future: asyncio.Future[None]) -> None:
        if self._core.abandon(cmd) and not future.done():
            future.set_exception(CommandTimeout(command=cmd.name, timeout=cmd.timeout))

    async def human(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human-monitor (HMP) command line and return its text output."""
        return str(await self.execute("human-monitor-command", hmp_arguments(command_line), timeout=timeout))

    # -- I/O callbacks ---------------------------------------------------------------------

    def _on_readable(self) -> None:
        core = self._core
        data = self._read_stream()
        if data is None:
            return
        core.receive_data(data)
        if core.wants_write and not self._writer_on:
            self._flush()
        if self._connected is not None and core.connection_state is not ConnectionState.CONNECTING:
            _resolve(self._connected)

    def _flush(self) -> None:
        """Write what the core has to send; when the socket is full, the loop calls back."""
        core = self._core
        try:
            while (out := core.data_to_send()) is not None:
                try:
                    sent = self._stream.send(*out)
                except BlockingIOError:
                    if not self._writer_on and core.connection_state is ConnectionState.RUNNING:
                        self._loop.add_writer(self._fileno, self._flush)
                        self._writer_on = True
                    return
                except OSError as exc:
                    self._io_failed("sending to", exc)
                    return
                core.bytes_sent(sent)
        except BaseException:
            core.send_interrupted()
            raise
        if self._writer_on:
            self._loop.remove_writer(self._fileno)
            self._writer_on = False

    def _stop_io(self) -> None:
        if self._reader_on:
            self._loop.remove_reader(self._fileno)
            self._reader_on = False
        if self._writer_on:
            self._loop.remove_writer(self._fileno)
            self._writer_on = False

    def _on_disconnect(self, error: QMPError | None) -> None:
        self._stop_io()
        if error is not None:
            self._stream.shutdown()
        for callback in self._disconnect_callbacks:
            self._loop.call_soon(self._run_callback, callback, error, None)
        if self._connected is not None:
            _resolve(self._connected)

    # -- events ----------------------------------------------------------------------------

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> AsyncSubscription:
        """Subscribe to future events (all when no names are given); enter it *before* the command.

        ``match`` is a subset of the event's data or a predicate on the event; if it raises, the
        subscription ends with ``EventMatchError`` and nothing else is affected."""
        subscription = AsyncSubscription(EventFilter(names, match), maxsize=maxsize, on_close=self._core.unsubscribe)
        self._core.subscribe(subscription)
        return subscription

    async def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event:
        """Wait for a *future* event; for one that may already have happened, see ``recent_events``."""
        check_timeout(timeout, allow_zero=True)
        with self.events(name, match=match, maxsize=1) as subscription:
            return await subscription.get(timeout)

    def on_event(self, callback: EventCallback, *names: str, match: Match = None) -> Callable[[], None]:
        """Call ``callback(event)`` (a function or a coroutine function) for matching events,
        soon after they arrive, on the loop; returns an unregister function."""
        self._core.guard(ConnectionState.RUNNING)
        entry = (EventFilter(names, match), callback)
        self._event_callbacks = (*self._event_callbacks, entry)
        self._core.on_event = self._on_event

        def remove() -> None:
            self._event_callbacks = tuple(e for e in self._event_callbacks if e is not entry)

        return remove

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        """Call ``callback(error)`` once when the connection ends (``None`` for a local close)."""
        self._core.guard(ConnectionState.RUNNING)
        self._disconnect_callbacks = (*self._disconnect_callbacks, callback)

        def remove() -> None:
            self._disconnect_callbacks = tuple(c for c in self._disconnect_callbacks if c is not callback)

        return remove

    def _on_event(self, event: Event) -> None:
        for event_filter, callback in self._event_callbacks:
            self._loop.call_soon(self._run_callback, callback, event, event_filter)

    def _run_callback(self, callback: Callable[[Any], Any], argument: Any, event_filter: EventFilter | None) -> None:
        # A user's match or callback that raises is logged; the loop and the monitor carry on.
        try:
            if event_filter is not None and not event_filter.accepts(argument):
                return
            result = callback(argument)
            if inspect.isawaitable(result):
                task = asyncio.ensure_future(result)
                self._callback_tasks.add(task)
                task.add_done_callback(self._callback_done)
        except Exception:
            self._core.log.exception("qmp.callback_failed", callback=getattr(callback, "__qualname__", repr(callback)))

    def _callback_done(self, task: asyncio.Future[Any]) -> None:
        self._callback_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._core.log.error("qmp.callback_failed", exc_info=task.exception())

    # -- capabilities -----------------------------------------------------------------------

    async def supports(self, command: str) -> bool:
        """Whether QEMU knows ``command`` (from ``query-commands``, fetched once)."""
        if self._commands is None:
            self._commands = frozenset(str(c["name"]) for c in await self.execute("query-commands"))
        return command in self._commands

    async def schema(self) -> QMPSchema:
        """QEMU's QMP schema (``query-qmp-schema``), fetched on first use and cached."""
        if self._schema is None:
            self._schema = QMPSchema.from_qmp(await self.execute("query-qmp-schema"))
        return self._schema


async def open_socket(address: Address, *, timeout: float) -> socket.socket:
    """A connected, non-blocking socket, retrying (without blocking the loop) while QEMU starts."""
    if isinstance(address, socket.socket):
        return connected_socket(address)
    family, target = socket_target(address)
    loop = asyncio.get_running_loop()

    async def attempt() -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, target)
        except BaseException:
            sock.close()
            raise
        return sock

    retrying = tenacity.AsyncRetrying(
        stop=tenacity.stop_before_delay(timeout), wait=RETRY_WAIT, retry=RETRY_IF_NOT_YET, reraise=True
    )
    try:
        async with asyncio.timeout(timeout):
            return await retrying(attempt)
    except TimeoutError as exc:
        raise connect_error(address, exc) from exc
    except OSError as exc:
        raise connect_error(address, exc) from exc


async def connect(
    address: Address, *, timeout: float = 10.0, name: str | None = None, **options: Unpack[ConnectOptions]
) -> AsyncMonitor:
    """Connect to a QMP monitor and negotiate capabilities, all within ``timeout`` seconds; the
    same arguments as ``vmctl.qmp.connect``."""
    timeout = check_timeout(timeout)
    deadline = timeouts.deadline(timeout)
    monitor = face_on(AsyncMonitor, await open_socket(address, timeout=timeout), name or describe(address), options)
    try:
        await monitor._handshake(max(0.001, deadline - time.monotonic()))
    except BaseException:
        await monitor.close()
        raise
    return monitor
