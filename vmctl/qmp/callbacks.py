"""Runs event and disconnect callbacks on one shared thread, never on a thread reading QMP.

A callback may therefore call the monitor (even wait for a reply) without deadlocking it. Every
monitor (and every VM's lifecycle) of the process hands its callbacks to the same thread, in
order. Each monitor's share is bounded: when its callbacks fall behind, its further events are
dropped and counted; a disconnect notice is never dropped.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, Final

from vmctl.errors import QMPError
from vmctl.logs import get_logger
from vmctl.qmp.events import EventFilter
from vmctl.qmp.messages import Event
from vmctl.qmp.perprocess import PerProcess

EventCallback = Callable[[Event], Any]
DisconnectCallback = Callable[[QMPError | None], Any]

log = get_logger(__name__)

_DEFAULT_BACKLOG: Final = 1024


class CallbackThread:
    """The process's one thread for user callbacks (and other work that may wait)."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], Any]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vmctl-callbacks", daemon=True)
        self._thread.start()

    def submit(self, work: Callable[[], Any]) -> None:
        self._queue.put(work)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _run(self) -> None:
        while True:
            work = self._queue.get()
            try:
                work()
            except Exception:
                log.exception("qmp.callback_work_failed")


_shared = PerProcess(CallbackThread)


def callback_thread() -> CallbackThread:
    """The process's callback thread (a new one in a forked child)."""
    return _shared.get()


class CallbackRunner:
    """One monitor's callbacks, run in order on the shared callback thread."""

    def __init__(self, *, name: str, log: Any, maxsize: int = _DEFAULT_BACKLOG) -> None:
        self._log = log
        self._maxsize = maxsize
        self._event_callbacks: tuple[tuple[EventFilter, EventCallback], ...] = ()
        self._disconnect_callbacks: tuple[DisconnectCallback, ...] = ()
        self._lock = threading.Lock()
        self._backlog = 0
        self._stopped = False
        self.dropped = 0
        self._thread = callback_thread()

    @property
    def wants_events(self) -> bool:
        return bool(self._event_callbacks)

    def add_event_callback(self, event_filter: EventFilter, callback: EventCallback) -> Callable[[], None]:
        entry = (event_filter, callback)
        with self._lock:
            self._event_callbacks = (*self._event_callbacks, entry)

        def remove() -> None:
            with self._lock:
                self._event_callbacks = tuple(e for e in self._event_callbacks if e is not entry)

        return remove

    def add_disconnect_callback(self, callback: DisconnectCallback) -> Callable[[], None]:
        with self._lock:
            self._disconnect_callbacks = (*self._disconnect_callbacks, callback)

        def remove() -> None:
            with self._lock:
                self._disconnect_callbacks = tuple(c for c in self._disconnect_callbacks if c is not callback)

        return remove

    def offer_event(self, event: Event) -> None:
        with self._lock:
            if not self._event_callbacks:
                return
            if self._backlog >= self._maxsize:
                self.dropped += 1
                return
            self._backlog += 1
        self._thread.submit(lambda: self._run_event(event))

    def offer_disconnect(self, error: QMPError | None) -> None:
        # Never dropped: the one notice that the VM is gone.
        self._thread.submit(lambda: self._run_disconnect(error))

    def stop(self) -> None:
        """No callbacks after what is queued now (in order: a queued disconnect notice still runs)."""
        self._thread.submit(self._stop)

    def _stop(self) -> None:
        self._stopped = True

    def _run_event(self, event: Event) -> None:
        with self._lock:
            self._backlog -= 1
        if self._stopped:
            return
        for event_filter, callback in self._event_callbacks:
            self._call(callback, event, event_filter)

    def _run_disconnect(self, error: QMPError | None) -> None:
        if self._stopped:
            return
        for callback in self._disconnect_callbacks:
            self._call(callback, error)

    def _call(self, callback: Callable[[Any], Any], argument: Any, event_filter: EventFilter | None = None) -> None:
        # A user's match or callback that raises is logged; this thread and the others carry on.
        try:
            if event_filter is None or event_filter.accepts(argument):
                callback(argument)
        except Exception:
            self._log.exception("qmp.callback_failed", callback=getattr(callback, "__qualname__", repr(callback)))
