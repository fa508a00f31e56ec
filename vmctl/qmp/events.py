"""Event filtering, bounded subscriptions and the bounded history of recent events."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from vmctl.errors import EventTimeout, InvalidArgument, QMPError
from vmctl.qmp import timeouts
from vmctl.qmp.messages import Event
from vmctl.qmp.timeouts import MAX_WAIT_SLICE, check_timeout

#: ``reader(done, deadline)`` reads QMP on the calling thread until ``done()`` or the deadline,
#: and returns False when another thread holds the read side.
Reader = Callable[[Callable[[], bool], float], bool]

#: A mapping that must be a subset of the event's data, or a predicate on the event.
Match = Mapping[str, Any] | Callable[[Event], bool] | None


def data_contains(data: Any, subset: Any) -> bool:
    """Whether ``subset`` is contained in ``data``: dicts key by key (recursively), else equality."""
    if isinstance(subset, Mapping):
        if not isinstance(data, Mapping):
            return False
        return all(key in data and data_contains(data[key], expected) for key, expected in subset.items())
    return bool(data == subset)


class EventFilter:
    """Which events a subscriber wants: a set of names (empty: all) and an optional match."""

    __slots__ = ("match", "names")

    def __init__(self, names: Iterable[str], match: Match) -> None:
        self.names = frozenset(names)
        for name in self.names:
            if not isinstance(name, str) or not name:
                raise InvalidArgument(f"event names must be non-empty strings, not {name!r}")
        if match is not None and not callable(match) and not isinstance(match, Mapping):
            raise InvalidArgument(f"match must be a mapping or a callable, not {type(match).__name__}")
        self.match = match

    def accepts(self, event: Event) -> bool:
        if self.names and event.name not in self.names:
            return False
        match = self.match
        if match is None:
            return True
        if isinstance(match, Mapping):
            return data_contains(event.data, match)
        return bool(match(event))


class EventBuffer:
    """What every subscription is: a filter and a bounded, ordered buffer of delivered events.

    When the buffer is full, newer events are dropped and counted in ``dropped``. Once the
    connection is gone, the buffered events are still returned, then the connection's error.
    The core delivers under the face's lock; ``_notify`` wakes whoever waits (a face's detail).
    """

    def __init__(self, event_filter: EventFilter, *, maxsize: int, on_close: Callable[[Any], None]) -> None:
        if isinstance(maxsize, bool) or not isinstance(maxsize, int) or maxsize < 1:
            raise InvalidArgument(f"maxsize must be an integer >= 1, not {maxsize!r}")
        self.filter = event_filter
        self.maxsize = maxsize
        self.dropped = 0
        self._buffer: deque[Event] = deque()
        self._failure: QMPError | None = None
        self._closed = False
        self._on_close = on_close

    def __len__(self) -> int:
        return len(self._buffer)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._notify()
        self._on_close(self)

    def get_nowait(self) -> Event | None:
        return self._buffer.popleft() if self._buffer else None

    def drain(self) -> list[Event]:
        """Every event buffered now, without waiting."""
        events = list(self._buffer)
        self._buffer.clear()
        return events

    def deliver(self, event: Event) -> None:
        if self._closed:
            return
        if len(self._buffer) >= self.maxsize:
            self.dropped += 1
            return
        self._buffer.append(event)
        self._notify()

    def fail(self, error: QMPError) -> None:
        self._failure = error
        self._notify()

    def _next(self, deadline: float, now: float, timeout: float) -> Event | None:
        """The next event, or None to wait on; raises the failure, closure or timeout."""
        if self._buffer:
            return self._buffer.popleft()
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise QMPError("the subscription is closed")
        if deadline <= now:
            names = ", ".join(sorted(self.filter.names)) or "any event"
            raise EventTimeout(f"no matching event ({names}) within {timeout:g}s")
        return None

    def _has_news(self) -> bool:
        return bool(self._buffer) or self._failure is not None or self._closed

    def _notify(self) -> None:
        raise NotImplementedError


class Subscription(EventBuffer):
    """A subscription for threads; use it as a context manager.

    Subscribe before sending the command whose event you need: QEMU may emit it before the reply.
    A ``get`` that finds nobody reading QMP reads it itself (``reader``), so an event is seen
    the moment it arrives.
    """

    def __init__(
        self,
        event_filter: EventFilter,
        *,
        maxsize: int,
        on_close: Callable[[Subscription], None],
        reader: Reader | None = None,
    ) -> None:
        self._cond = threading.Condition(threading.Lock())
        super().__init__(event_filter, maxsize=maxsize, on_close=on_close)
        self._reader = reader
        self._getters = 0
        self._poked = False

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._on_close(self)

    def get(self, timeout: float) -> Event:
        """The next event; ``EventTimeout`` if none arrives within ``timeout`` seconds."""
        timeout = check_timeout(timeout, allow_zero=True)
        deadline = timeouts.deadline(timeout)
        while True:
            with self._cond:
                now = time.monotonic()
                event = self._next(deadline, now, timeout)
                if event is not None:
                    return event
                # Counted before trying the read side, so that a poke in between is not lost.
                self._getters += 1
                self._poked = False
            try:
                if self._reader is not None and self._reader(self._has_news, deadline):
                    continue
                with self._cond:
                    if not (self._has_news() or self._poked):
                        self._cond.wait(min(deadline - now, MAX_WAIT_SLICE))
            finally:
                with self._cond:
                    self._getters -= 1

    def poke(self) -> None:
        """The read side became free: a waiting ``get`` may take it."""
        if self._getters:
            with self._cond:
                self._poked = True
                self._cond.notify_all()

    def get_nowait(self) -> Event | None:
        with self._cond:
            return super().get_nowait()

    def drain(self) -> list[Event]:
        with self._cond:
            return super().drain()

    def deliver(self, event: Event) -> None:
        with self._cond:
            super().deliver(event)

    def fail(self, error: QMPError) -> None:
        with self._cond:
            super().fail(error)

    def _notify(self) -> None:
        # Callers hold the condition's lock.
        self._cond.notify_all()


class EventHistory:
    """The last ``maxlen`` events, queryable by name, time and match."""

    def __init__(self, maxlen: int) -> None:
        if maxlen < 0:
            raise InvalidArgument(f"event history size must be >= 0, not {maxlen}")
        self._events: deque[Event] = deque(maxlen=maxlen)
        self.total = 0

    def append(self, event: Event) -> None:
        # deque.append with maxlen is atomic under the GIL; readers copy before filtering.
        self._events.append(event)
        self.total += 1

    @property
    def evicted(self) -> int:
        return self.total - len(self._events)

    def query(self, names: Iterable[str] = (), *, since: float | None = None, match: Match = None) -> list[Event]:
        event_filter = EventFilter(names, match)
        return [
            event
            for event in tuple(self._events)
            if (since is None or event.timestamp >= since) and event_filter.accepts(event)
        ]
