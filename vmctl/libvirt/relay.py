"""A QMP monitor whose messages travel through a go-between (libvirtd's RPC, or ``virsh``).

The go-between owns QEMU's monitor socket: vmctl hands it one command as JSON and gets QEMU's
reply back, and hears QEMU's events from it. This monitor sits on the rules of vmctl's own QMP
connection, not on copies of them:

- the caller's API (``execute`` and its checks, ``human``, subscriptions, callbacks on vmctl's
  callback thread, ``supports``/``schema``) is ``vmctl.qmp.threaded.ThreadedMonitor``'s, as for
  vmctl's threaded face;
- a command is encoded by ``vmctl.qmp.codec.encode_command`` (its checks included), with no id:
  libvirtd numbers the commands it passes on itself and refuses one that carries an id;
- its timeout is ``TimeoutPolicy.for_command``'s, the core's policy;
- its reply is read by ``decode_reply`` and QEMU's error raised as ``ErrorReply.failure`` maps
  it, as on the socket;
- events go out through ``vmctl.qmp.subscribers``, the core's fan-out.

What is its own: the worker threads that bound libvirt's blocking calls, and the end of the
go-between. Both go-betweens share this module.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from structlog.typing import FilteringBoundLogger

from vmctl.errors import CommandTimeout, ConnectionLost, InvalidArgument, QMPError
from vmctl.logs import get_logger
from vmctl.qmp.codec import decode_reply, encode_command
from vmctl.qmp.events import Subscription
from vmctl.qmp.messages import ErrorReply, Event, QEMUVersion
from vmctl.qmp.subscribers import Subscribers
from vmctl.qmp.threaded import ThreadedMonitor
from vmctl.qmp.timeouts import TimeoutPolicy

log: FilteringBoundLogger = get_logger(__name__)

_WORKERS = 4  # calls in flight at once per monitor (a timed-out one may still hold a worker)


class RelayedMonitor(ThreadedMonitor):
    """The shared half of ``LibvirtMonitor`` and ``VirshMonitor``; subclasses give ``_relay``."""

    def __init__(self, name: str, *, timeouts: TimeoutPolicy | None = None, max_fds: int = 0) -> None:
        self.name = name
        self.timeouts = timeouts or TimeoutPolicy()
        self._max_fds = max_fds
        self._log = log.bind(vm=name)
        self._lock = threading.Lock()
        self._subscribers = Subscribers(self._log)
        self._closed = False
        self._failure: QMPError | None = None
        self._version: QEMUVersion | None = None
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

    def _execute(
        self, command: str, arguments: Mapping[str, Any] | None, fds: Sequence[int], timeout: float | None, oob: bool
    ) -> Any:
        if oob:
            raise InvalidArgument(f"{command}: out-of-band commands need vmctl's own QMP socket, not {self.name}")
        if len(fds) > self._max_fds:
            raise InvalidArgument(
                f"{command}: {type(self).__name__} passes at most {self._max_fds} file descriptor(s), not {len(fds)}"
            )
        seconds = self.timeouts.for_command(command, timeout)
        text = encode_command(command, arguments).decode().rstrip()  # one JSON value, no line end
        self._guard()
        try:
            future = self._workers.submit(self._relay, text, list(fds), seconds)
        except RuntimeError:  # the pool is shut down: closed meanwhile
            raise ConnectionLost(f"{self.name}: the monitor is closed") from None
        reply = decode_reply(self._await(future, command, seconds), f"{self.name}: {command}")
        if isinstance(reply, ErrorReply):
            failure = reply.failure(command)
            self._log.debug("qmp.command", cmd=command, outcome=type(failure).__name__)
            raise failure
        self._log.debug("qmp.command", cmd=command, outcome="ok")
        return reply.value

    def _await(self, future: Future[str], command: str, seconds: float) -> str:
        try:
            return future.result(timeout=seconds)
        except FutureTimeout:
            self._log.warning("qmp.timeout", cmd=command, timeout=seconds)
            raise CommandTimeout(command=command, timeout=seconds) from None

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

    # -- events (``ThreadedMonitor``'s hooks) ------------------------------------------------

    def _subscribe(self, subscription: Subscription) -> None:
        with self._lock:
            self._guard()
            self._subscribers.add(subscription)

    def _unsubscribe(self, subscription: Subscription) -> None:
        self._subscribers.remove(subscription)

    def _check_running(self) -> None:
        self._guard()

    def _deliver(self, event: Event) -> None:
        """Called by the subclass's event thread for each of QEMU's events."""
        self._subscribers.deliver(event)
        callbacks = self._callbacks
        if callbacks is not None:
            callbacks.offer_event(event)

    def _lost(self, error: QMPError, *, expected: bool = False) -> None:
        """The go-between is gone: every waiter learns it, and the disconnect callbacks run once.
        ``expected``: the domain stopped (a shutdown, a migration away), logged at info."""
        with self._lock:
            if self._closed or self._failure is not None:
                return
            self._failure = error
            subscriptions, callbacks = self._subscribers.take(), self._callbacks
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
            subscriptions, callbacks = self._subscribers.take(), self._callbacks
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
