"""Runs event and disconnect callbacks on their own thread, never on the thread reading QMP.

A callback may therefore call the monitor (even wait for a reply) without deadlocking it. The
queue is bounded: when callbacks fall behind, further events are dropped and counted.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any

from vmctl.errors import QMPError
from vmctl.qmp.events import EventFilter
from vmctl.qmp.messages import Event

EventCallback = Callable[[Event], Any]
DisconnectCallback = Callable[[QMPError | None], Any]

_STOP = object()


class CallbackRunner:
    def __init__(self, *, name: str, log: Any, maxsize: int = 1024) -> None:
        self._log = log
        self._queue: queue.Queue[object] = queue.Queue(maxsize)
        self._event_callbacks: tuple[tuple[EventFilter, EventCallback], ...] = ()
        self._disconnect_callbacks: tuple[DisconnectCallback, ...] = ()
        self._lock = threading.Lock()
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=f"vmctl-callbacks-{name}", daemon=True)
        self._thread.start()

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
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def offer_disconnect(self, error: QMPError | None) -> None:
        # Never dropped: block briefly rather than lose the one notice that the VM is gone.
        try:
            self._queue.put(("disconnect", error), timeout=1.0)
        except queue.Full:
            self._log.error("qmp.disconnect_callback_dropped", reason=str(error))

    def stop(self, timeout: float = 2.0) -> None:
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if isinstance(item, Event):
                for event_filter, callback in self._event_callbacks:
                    self._call(callback, item, event_filter)
            elif isinstance(item, tuple):
                for disconnect_callback in self._disconnect_callbacks:
                    self._call(disconnect_callback, item[1])

    def _call(self, callback: Callable[[Any], Any], argument: Any, event_filter: EventFilter | None = None) -> None:
        # A user's match or callback that raises is logged; this thread and the others carry on.
        try:
            if event_filter is None or event_filter.accepts(argument):
                callback(argument)
        except Exception:
            self._log.exception("qmp.callback_failed", callback=getattr(callback, "__qualname__", repr(callback)))
