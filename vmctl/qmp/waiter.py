"""How a thread of the threaded face waits: for one command's reply, or for its socket.

A thread that reads its own reply never sleeps; one whose reply another thread reads sleeps on a
``Waiter`` until that thread wakes it. Socket waits are ``poll`` calls of bounded length.
"""

from __future__ import annotations

import select
import threading

from vmctl.qmp.timeouts import MAX_WAIT_SLICE


class Waiter:
    """Wakes the thread waiting for one command: a binary semaphore, made only if it has to wait
    (a caller that reads its own reply never does). Once made, its lock is released (a wake-up
    is pending) exactly while ``woken`` is true."""

    __slots__ = ("_lock", "woken")

    def __init__(self) -> None:
        self._lock: threading.Lock | None = None
        self.woken = False

    def wake(self) -> None:
        # Called under the monitor's lock.
        if not self.woken:
            self.woken = True
            if self._lock is not None:
                self._lock.release()

    def wait(self, monitor_lock: threading.Lock, timeout: float) -> None:
        """Sleep until woken or ``timeout``; spurious returns are fine (the caller re-checks)."""
        with monitor_lock:
            if self._lock is None:
                if self.woken:  # woken before it had a lock: nothing to consume
                    self.woken = False
                    return
                self._lock = threading.Lock()
                self._lock.acquire()
        if self._lock.acquire(True, timeout):
            self.woken = False


def poll_ms(seconds: float) -> int:
    """``seconds`` as a ``poll`` timeout: rounded up, so a short wait does not turn into a busy
    loop of zero-length polls; one wait is capped."""
    return max(0, int(min(seconds, MAX_WAIT_SLICE) * 1000) + 1)


def wait_writable(fileno: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fileno, select.POLLOUT)
    return bool(poller.poll(poll_ms(timeout)))
