"""Who hears a connection's events: its subscribers, each behind its own filter.

One rule lives here for every monitor (the connection core, and the libvirt relay): an event
goes to each subscriber whose filter accepts it, and a ``match`` that raises ends only its own
subscription (with ``EventMatchError``); the others still get the event, and so do later ones.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from vmctl.errors import EventMatchError, QMPError
from vmctl.qmp.events import EventFilter
from vmctl.qmp.messages import Event


class EventSink(Protocol):
    """A subscriber: the connection filters, then delivers (or fails it when the connection ends)."""

    @property
    def filter(self) -> EventFilter: ...

    def deliver(self, event: Event) -> None: ...

    def fail(self, error: QMPError) -> None: ...


class Subscribers:
    """The subscribers of one connection. Delivering reads a snapshot, so it needs no lock; adding
    and removing are serialised here (the relay hears events on a thread of its own)."""

    __slots__ = ("_change", "_log", "_sinks")

    def __init__(self, log: Any) -> None:
        self._sinks: tuple[EventSink, ...] = ()
        self._change = threading.Lock()
        self._log = log

    @property
    def sinks(self) -> tuple[EventSink, ...]:
        return self._sinks

    def add(self, sink: EventSink) -> None:
        with self._change:
            self._sinks = (*self._sinks, sink)

    def remove(self, sink: EventSink) -> None:
        with self._change:
            self._sinks = tuple(s for s in self._sinks if s is not sink)

    def take(self) -> tuple[EventSink, ...]:
        """Every subscriber, removed (the connection ended: the caller fails each)."""
        with self._change:
            sinks, self._sinks = self._sinks, ()
        return sinks

    def deliver(self, event: Event) -> None:
        for sink in self._sinks:
            try:
                wanted = sink.filter.accepts(event)
            except Exception as exc:
                # A user's predicate never takes down the reader: it ends its own subscription.
                self._log.exception("qmp.match_failed", name=event.name)
                error = EventMatchError(f"the subscription's match raised {exc!r} on a {event.name} event")
                error.__cause__ = exc
                self.remove(sink)
                sink.fail(error)
                continue
            if wanted:
                sink.deliver(event)
