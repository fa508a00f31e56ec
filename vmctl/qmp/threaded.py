"""A monitor for threads, around its one way of running a command: written once for vmctl's own
socket (``vmctl.qmp.monitor.Monitor``) and for libvirt's go-betweens (``vmctl.libvirt.relay``).

Here are ``execute``'s contract, ``human``, subscriptions, ``wait_event``, callbacks on vmctl's
callback thread, and what QEMU knows (asked once). A subclass gives the command itself
(``_execute``) and how a subscriber joins and leaves.

Two restatements are on purpose: the asyncio face (``vmctl.qmp.aio``) has a coroutine twin of each
method (a coroutine cannot share a body with a function that blocks; the twins share every check,
``hmp_arguments`` and ``check_timeout``), and the protocol ``vmctl.qmp.QMPMonitor`` restates
``execute``'s signature, as a protocol declares what its implementations define.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from vmctl.qmp.callbacks import CallbackRunner, DisconnectCallback, EventCallback
from vmctl.qmp.codec import hmp_arguments
from vmctl.qmp.events import EventFilter, Match, Reader, Subscription
from vmctl.qmp.messages import Event
from vmctl.qmp.schema import QMPSchema
from vmctl.qmp.timeouts import check_timeout
from vmctl.qmp.transport import FileDescriptor, fd_numbers


class ThreadedMonitor:
    """The part of a threaded monitor that does not depend on how commands reach QEMU."""

    name: str
    _lock: threading.Lock  # the subclass's lock around its connection's state
    _log: Any
    #: Reads QMP on a waiting subscriber's thread when nobody else does (vmctl's own socket only).
    _event_reader: Reader | None = None
    _callbacks: CallbackRunner | None = None
    _commands: frozenset[str] | None = None
    _schema: QMPSchema | None = None

    # -- what a subclass gives ---------------------------------------------------------------

    def _execute(
        self, command: str, arguments: Mapping[str, Any] | None, fds: Sequence[int], timeout: float | None, oob: bool
    ) -> Any:
        """Run one command: ``execute`` with its fds as numbers."""
        raise NotImplementedError

    def _subscribe(self, subscription: Subscription) -> None:
        raise NotImplementedError

    def _unsubscribe(self, subscription: Subscription) -> None:
        raise NotImplementedError

    def _check_running(self) -> None:
        """Raise what a call gets once the connection is gone (called under ``_lock``)."""
        raise NotImplementedError

    def _callbacks_started(self, runner: CallbackRunner) -> None:
        """The first callback was registered: hand ``runner`` the events (called under ``_lock``)."""

    # -- commands ----------------------------------------------------------------------------

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
        It needs vmctl's own socket (libvirt negotiates no ``oob``).

        ``fds`` travel with SCM_RIGHTS together with the command (``add-fd``, ``getfd``); vmctl
        passes duplicates, so the caller may close its files as soon as this returns, even after
        a timeout. Raises a ``CommandError`` subclass for QEMU's error, ``CommandTimeout`` when no
        reply comes within ``timeout`` (default: by command kind, ``TimeoutPolicy``),
        ``ConnectionLost`` when the connection goes away.
        """
        return self._execute(command, arguments, fd_numbers(fds) if fds else (), timeout, oob)

    def human(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human-monitor (HMP) command line and return its text output."""
        return str(self.execute("human-monitor-command", hmp_arguments(command_line), timeout=timeout))

    # -- events ------------------------------------------------------------------------------

    def events(self, *names: str, match: Match = None, maxsize: int = 256) -> Subscription:
        """Subscribe to future events (all of them when no names are given).

        Use it as a context manager, and enter it *before* sending the command whose event you
        need. ``match`` is a subset of the event's data or a predicate on the event; it runs on
        the thread that hears QMP, so it must be quick and must not call the monitor. If it
        raises, the subscription ends with ``EventMatchError`` and nothing else is affected.
        """
        subscription = Subscription(
            EventFilter(names, match), maxsize=maxsize, on_close=self._unsubscribe, reader=self._event_reader
        )
        self._subscribe(subscription)
        return subscription

    def wait_event(self, name: str, *, match: Match = None, timeout: float) -> Event:
        """Wait for a *future* event; for one that may already have happened, see ``recent_events``."""
        check_timeout(timeout, allow_zero=True)
        with self.events(name, match=match, maxsize=1) as subscription:
            return subscription.get(timeout)

    def on_event(self, callback: EventCallback, *names: str, match: Match = None) -> Callable[[], None]:
        """Call ``callback(event)`` for matching events on vmctl's callback thread, never on the
        thread that heard them; returns an unregister function."""
        return self._callback_runner().add_event_callback(EventFilter(names, match), callback)

    def on_disconnect(self, callback: DisconnectCallback) -> Callable[[], None]:
        """Call ``callback(error)`` once when the connection ends (``None`` for a local close)."""
        return self._callback_runner().add_disconnect_callback(callback)

    @property
    def callback_events_dropped(self) -> int:
        return self._callbacks.dropped if self._callbacks is not None else 0

    def _callback_runner(self) -> CallbackRunner:
        with self._lock:
            self._check_running()
            if self._callbacks is None:
                self._callbacks = CallbackRunner(name=self.name, log=self._log)
                self._callbacks_started(self._callbacks)
            return self._callbacks

    # -- what QEMU knows ---------------------------------------------------------------------

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
