"""A QMP monitor whose messages travel through a go-between (libvirtd's RPC, or ``virsh``).

The go-between owns QEMU's monitor socket: vmctl hands it one command as JSON and gets QEMU's
reply back, and hears QEMU's events from it. Everything else a monitor does (typed errors,
bounded waits, subscriptions, callbacks off the delivering thread) is the same as on vmctl's own
socket, and lives here once for both go-betweens.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from structlog.typing import FilteringBoundLogger

from vmctl.errors import (
    CommandTimeout,
    ConnectionLost,
    EventMatchError,
    InvalidArgument,
    ProtocolError,
    QMPError,
    command_error,
)
from vmctl.logs import get_logger
from vmctl.qmp.callbacks import CallbackRunner, DisconnectCallback, EventCallback
from vmctl.qmp.events import EventFilter, Match, Subscription
from vmctl.qmp.messages import Event, QEMUVersion
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.timeouts import TimeoutPolicy, check_timeout
from vmctl.qmp.transport import FileDescriptor, fd_numbers

log: FilteringBoundLogger = get_logger(__name__)

_WORKERS = 4  # calls in flight at once per monitor (a timed-out one may still hold a worker)


class RelayedMonitor:
    """The shared half of ``LibvirtMonitor`` and ``VirshMonitor``; subclasses give ``_relay``."""

    def __init__(self, name: str, *, timeouts: TimeoutPolicy | None = None, max_fds: int = 0) -> None:
        self.name = name
        self.timeouts = timeouts or TimeoutPolicy()
        self._max_fds = max_fds
        self._log = log.bind(vm=name)
        self._lock = threading.Lock()
        self._subscriptions: tuple[Subscription, ...] = ()
        self._callbacks: CallbackRunner | None = None
        self._closed = False
        self._failure: QMPError | None = None
        self._version: QEMUVersion | None = None
        self._schema: QMPSchema | None = None
        self._commands: frozenset[str] | None = None
        # libvirt's calls block in C: a worker makes each wait bounded. A call that outlives its
        # timeout finishes on its worker; its reply is dropped, as a late reply on a socket is.
        self._workers = ThreadPoolExecutor(max_workers=_WORKERS, thread_name_prefix=f"vmctl-relay-{name}")

    # -- what subclasses provide ------------------------------------------------------------

    def _relay(self, message: str, fds: Sequence[int], timeout: float) -> str:
        """Send one QMP command (JSON text) and return QEMU's reply (JSON text)."""
        raise NotImplementedError

    def _close_relay(self) -> None:
        """Stop hearing events and let go of the go-between."""

    # -- commands ---------------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        return not self._closed and self._failure is None

    def execute(
        self,
        command: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        fds: Sequence[FileDescriptor] = (),
        timeout: float | None = None,
        oob: bool = False,
    ) -> Any:
        """Run ``command`` through the go-between and return QEMU's ``return`` value.

        Raises what vmctl's own monitor raises: a ``CommandError`` subclass for QEMU's error,
        ``CommandTimeout`` when no reply comes within ``timeout``, ``ConnectionLost`` once the
        go-between is gone. ``oob`` needs vmctl's own socket (libvirt negotiates no ``oob``)."""
        if not isinstance(command, str) or not command:
            raise InvalidArgument(f"command must be a non-empty string, not {command!r}")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise InvalidArgument(f"{command}: arguments must be a mapping, not {type(arguments).__name__}")
        if oob:
            raise InvalidArgument(f"{command}: out-of-band commands need vmctl's own QMP socket, not {self.name}")
        fd_list = fd_numbers(fds) if fds else []
        if len(fd_list) > self._max_fds:
            raise InvalidArgument(
                f"{command}: {type(self).__name__} passes at most {self._max_fds} file descriptor(s), "
                f"not {len(fd_list)}"
            )
        seconds = self.timeouts.for_command(command) if timeout is None else check_timeout(timeout)
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = dict(arguments)
        try:
            text = json.dumps(message)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{command}: arguments are not JSON: {exc}") from None
        self._guard()
        try:
            future = self._workers.submit(self._relay, text, fd_list, seconds)
        except RuntimeError:  # the pool is shut down: closed meanwhile
            raise ConnectionLost(f"{self.name}: the monitor is closed") from None
        reply = self._await(future, command, seconds)
        return self._unwrap(command, reply)

    def _await(self, future: Future[str], command: str, seconds: float) -> str:
        try:
            return future.result(timeout=seconds)
        except FutureTimeout:
            self._log.warning("qmp.timeout", cmd=command, timeout=seconds)
            raise CommandTimeout(command=command, timeout=seconds) from None

    def _unwrap(self, command: str, reply_text: str) -> Any:
        try:
            reply = json.loads(reply_text)
        except ValueError:
            raise ProtocolError(f"{self.name}: {command}: the reply is not JSON: {reply_text[:200]!r}") from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"{self.name}: {command}: the reply is not a JSON object: {reply_text[:200]!r}")
        if "error" in reply:
            self._log.debug("qmp.command", cmd=command, outcome="error")
            raise command_error(command, reply["error"])
        if "return" not in reply:
            raise ProtocolError(f"{self.name}: {command}: the reply has neither return nor error")
        self._log.debug("qmp.command", cmd=command, outcome="ok")
        return reply["return"]

    def _guard(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise ConnectionLost(f"{self.name}: the monitor is closed")

    # -- what QEMU is -----------------------------------------------------------------------

    @property
    def version(self) -> QEMUVersion:
        if self._version is None:
            self._version = QEMUVersion.from_qmp(self.execute("query-version"))
        return self._version

    @property
    def schema(self) -> QMPSchema:
        if self._schema is None:
            self._schema = QMPSchema.from_qmp(self.execute("query-qmp-schema"))
        return self._schema

    def supports(self, command: str) -> bool:
        if self._commands is None:
            self._commands = frozenset(str(c["name"]) for c in self.execute("query-commands"))
        return command in self._commands

    # -- events -----------------------------------------------------------------------------

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> Subscription:
        """Subscribe to QEMU's future events, as on vmctl's own monitor (enter it before the command)."""
        subscription = Subscription(EventFilter(names, match), maxsize=maxsize, on_close=self._unsubscribe)
        with self._lock:
            self._guard()
            self._subscriptions = (*self._subscriptions, subscription)
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not subscription)

    def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event:
        check_timeout(timeout, allow_zero=True)
        with self.events(name, match=match, maxsize=1) as subscription:
            return subscription.get(timeout)

    def on_event(self, callback: EventCallback, *names: str, match: Match = None) -> Callable[[], None]:
        """Call ``callback(event)`` on vmctl's callback thread, never on the thread that heard it."""
        return self._callback_runner().add_event_callback(EventFilter(names, match), callback)

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        return self._callback_runner().add_disconnect_callback(callback)

    def _callback_runner(self) -> CallbackRunner:
        with self._lock:
            self._guard()
            if self._callbacks is None:
                self._callbacks = CallbackRunner(name=self.name, log=self._log)
            return self._callbacks

    def _deliver(self, event: Event) -> None:
        """Called by the subclass's event thread for each of QEMU's events."""
        with self._lock:
            subscriptions, callbacks = self._subscriptions, self._callbacks
        for subscription in subscriptions:
            try:
                wanted = subscription.filter.accepts(event)
            except Exception as exc:
                self._log.exception("qmp.match_failed", name=event.name)
                error = EventMatchError(f"the subscription's match raised {exc!r} on a {event.name} event")
                self._unsubscribe(subscription)
                subscription.fail(error)
                continue
            if wanted:
                subscription.deliver(event)
        if callbacks is not None:
            callbacks.offer_event(event)

    def _lost(self, error: QMPError, *, expected: bool = False) -> None:
        """The go-between is gone: every waiter learns it, and the disconnect callbacks run once.
        ``expected``: the domain stopped (a shutdown, a migration away), logged at info."""
        with self._lock:
            if self._closed or self._failure is not None:
                return
            self._failure = error
            subscriptions, callbacks = self._subscriptions, self._callbacks
        (self._log.info if expected else self._log.warning)("qmp.disconnected", error=str(error))
        for subscription in subscriptions:
            subscription.fail(error)
        if callbacks is not None:
            callbacks.offer_disconnect(error)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop hearing events and release the go-between; idempotent. Waiters get ``ConnectionLost``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            subscriptions, callbacks = self._subscriptions, self._callbacks
        try:
            self._close_relay()
        finally:
            self._workers.shutdown(wait=False, cancel_futures=True)
            closed = ConnectionLost(f"{self.name}: the monitor is closed")
            for subscription in subscriptions:
                subscription.fail(closed)
            if callbacks is not None:
                callbacks.offer_disconnect(None)
                callbacks.stop()

    def __enter__(self) -> RelayedMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def event_from_relay(name: str, seconds: int, micros: int, details: str | None) -> Event:
    """An ``Event`` from what the go-between reports: its name, QEMU's timestamp, its data as JSON."""
    data: Any = json.loads(details) if details else {}
    return Event(name=name, data=data if isinstance(data, dict) else {}, timestamp=seconds + micros / 1e6)
