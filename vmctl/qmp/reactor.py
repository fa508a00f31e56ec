"""One thread that waits on every idle fd of the process (epoll) and runs its short handler.

Every monitor registers its socket here while nobody else reads it, and every VM its QEMU's
pidfd, so a process holding a thousand VMs has one I/O thread, not one per monitor and per VM.
Registrations are one-shot: a handler runs once per arming, and whoever owns the fd re-arms it
when it wants to hear again (a monitor, when it gives its read side back). Handlers must not
block; what may wait (user callbacks, classifying an exit) goes to the callback thread
(``vmctl.qmp.callbacks``).
"""

from __future__ import annotations

import contextlib
import select
import threading
from collections.abc import Callable
from typing import Final

from vmctl.logs import get_logger
from vmctl.qmp.perprocess import PerProcess

log = get_logger(__name__)

READABLE: Final = select.EPOLLIN | select.EPOLLRDHUP
WRITABLE: Final = select.EPOLLOUT

#: A handler gets the epoll event mask that fired.
Handler = Callable[[int], None]


class Reactor:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._handlers: dict[int, Handler] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def register(self, fd: int, handler: Handler, events: int = READABLE) -> None:
        """Watch ``fd`` for ``events`` (once: see ``arm``) and run ``handler`` when they come."""
        with self._lock:
            self._handlers[fd] = handler
            self._epoll.register(fd, events | select.EPOLLONESHOT)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="vmctl-io", daemon=True)
                self._thread.start()

    def arm(self, fd: int, events: int = READABLE) -> None:
        """Watch a registered ``fd`` again (for ``events``; 0 watches nothing)."""
        with self._lock:
            if fd in self._handlers:
                self._epoll.modify(fd, (events | select.EPOLLONESHOT) if events else 0)

    def unregister(self, fd: int) -> None:
        """Stop watching ``fd``; call it before closing the fd (its number may be reused)."""
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(fd)

    def _run(self) -> None:
        while True:
            try:
                ready = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, mask in ready:
                with self._lock:
                    handler = self._handlers.get(fd)
                if handler is None:
                    continue
                try:
                    handler(mask)
                except Exception:  # a handler's bug must not stop every other fd's I/O
                    log.exception("reactor.handler_failed", fd=fd)


_reactor = PerProcess(Reactor)


def reactor() -> Reactor:
    """The process's reactor (a new one in a forked child)."""
    return _reactor.get()
