"""Work due at a time, for the whole process: one thread keeps every deadline and hands what is
due to the callback thread (``vmctl.qmp.callbacks``), where event callbacks run too.

The reactor waits on fds only (epoll with no timeout; Python 3.11 has no ``timerfd``), so a
deadline cannot be one of its registrations; one shared thread keeps them all rather than a
sleeping thread per deadline (a migration's convergence policy, for one, has its deadline here).
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from typing import Any

from vmctl.qmp.callbacks import callback_thread
from vmctl.qmp.perprocess import PerProcess


class _Entry:
    __slots__ = ("seq", "when", "work")

    def __init__(self, when: float, seq: int, work: Callable[[], Any]) -> None:
        self.when = when
        self.seq = seq
        self.work: Callable[[], Any] | None = work

    def __lt__(self, other: _Entry) -> bool:
        return (self.when, self.seq) < (other.when, other.seq)


class Timers:
    """The process's deadlines: ``call_at(when, work)`` runs ``work`` on the callback thread at
    ``when`` (``time.monotonic()``), unless cancelled first."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._ready = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None

    def call_at(self, when: float, work: Callable[[], Any]) -> Callable[[], None]:
        """Schedule ``work``; returns a cancel function (harmless once it has run)."""
        entry = _Entry(when, next(self._seq), work)
        with self._ready:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vmctl-timers", daemon=True)
                self._thread.start()
            self._ready.notify()

        def cancel() -> None:
            with self._ready:
                entry.work = None

        return cancel

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._heap or self._heap[0].when > time.monotonic():
                    self._ready.wait(self._heap[0].when - time.monotonic() if self._heap else None)
                entry = heapq.heappop(self._heap)
                work, entry.work = entry.work, None
            if work is not None:
                callback_thread().submit(work)


_timers = PerProcess(Timers)


def timers() -> Timers:
    """The process's timers (new ones in a forked child)."""
    return _timers.get()
