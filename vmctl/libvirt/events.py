"""libvirt's domain events for one domain, as waits with deadlines.

libvirt calls back on its event-loop thread; this module turns each callback into a small typed
record and hands it to whoever waits for it (a detach for its DEVICE_REMOVED, a block job for its
BLOCK_JOB_2, a shutdown for the domain stopping). Subscribe before the call whose event you need.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from vmctl.errors import WaitTimeout
from vmctl.libvirt.eventloop import libvirt_module


@attrs.frozen(kw_only=True)
class DomainEvent:
    """One libvirt domain event: its kind (``device-removed``, ``block-job``, ``lifecycle``, ...)
    and what libvirt said (the device alias, the disk and job status, the lifecycle event)."""

    kind: str
    alias: str = ""  # device-removed, device-removal-failed
    disk: str = ""  # block-job: the disk's target or path
    job_type: int = 0
    status: int = 0  # block-job: libvirt's VIR_DOMAIN_BLOCK_JOB_*; lifecycle: VIR_DOMAIN_EVENT_*
    detail: int = 0


Match = Callable[[DomainEvent], bool]


class EventWait:
    """The events of one subscription, in order; ``get`` waits at most its timeout."""

    def __init__(self, match: Match) -> None:
        self.match = match
        self._queue: queue.SimpleQueue[DomainEvent] = queue.SimpleQueue()

    def put(self, event: DomainEvent) -> None:
        self._queue.put(event)

    def get(self, timeout: float, what: str) -> DomainEvent:
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            raise WaitTimeout(f"{what}: libvirt reported nothing within {timeout:g}s") from None

    def until(self, deadline: float, what: str) -> DomainEvent:
        return self.get(deadline - time.monotonic(), what)


class DomainEvents:
    """The events of one domain on one connection; ``close`` deregisters them."""

    def __init__(self, conn: Any, domain: Any, *, on_stopped: Callable[[], None] | None = None) -> None:
        """``on_stopped`` is called (on libvirt's event thread, briefly) when the domain stops."""
        libvirt = libvirt_module()
        self._stopped = libvirt.VIR_DOMAIN_EVENT_STOPPED
        self._on_stopped = on_stopped
        self._conn = conn
        self._lock = threading.Lock()
        self._waits: tuple[EventWait, ...] = ()
        self._callbacks: list[int] = []
        handlers: dict[int, Callable[..., None]] = {
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED: self._device_removed,
            libvirt.VIR_DOMAIN_EVENT_ID_DEVICE_REMOVAL_FAILED: self._device_removal_failed,
            libvirt.VIR_DOMAIN_EVENT_ID_BLOCK_JOB_2: self._block_job,
            libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE: self._lifecycle,
        }
        try:
            for event_id, handler in handlers.items():
                self._callbacks.append(conn.domainEventRegisterAny(domain, event_id, handler, None))
        except BaseException:
            self.close()
            raise

    def subscribe(self, match: Match) -> EventWait:
        """Events that ``match`` accepts, from now on, until ``unsubscribe``."""
        wait = EventWait(match)
        with self._lock:
            self._waits = (*self._waits, wait)
        return wait

    def unsubscribe(self, wait: EventWait) -> None:
        with self._lock:
            self._waits = tuple(w for w in self._waits if w is not wait)

    @contextlib.contextmanager
    def waiting(self, match: Match) -> Iterator[EventWait]:
        wait = self.subscribe(match)
        try:
            yield wait
        finally:
            self.unsubscribe(wait)

    def close(self) -> None:
        libvirt = libvirt_module()
        for callback in self._callbacks:
            with contextlib.suppress(libvirt.libvirtError):  # a gone connection took them along
                self._conn.domainEventDeregisterAny(callback)
        self._callbacks.clear()

    def _offer(self, event: DomainEvent) -> None:
        # On libvirt's event-loop thread: a user's match that raises must not stop event delivery.
        for wait in self._waits:
            with contextlib.suppress(Exception):
                if wait.match(event):
                    wait.put(event)

    def _device_removed(self, conn: Any, domain: Any, alias: str, opaque: Any) -> None:
        self._offer(DomainEvent(kind="device-removed", alias=alias))

    def _device_removal_failed(self, conn: Any, domain: Any, alias: str, opaque: Any) -> None:
        self._offer(DomainEvent(kind="device-removal-failed", alias=alias))

    def _block_job(self, conn: Any, domain: Any, disk: str, job_type: int, status: int, opaque: Any) -> None:
        self._offer(DomainEvent(kind="block-job", disk=disk, job_type=job_type, status=status))

    def _lifecycle(self, conn: Any, domain: Any, event: int, detail: int, opaque: Any) -> None:
        self._offer(DomainEvent(kind="lifecycle", status=event, detail=detail))
        if event == self._stopped and self._on_stopped is not None:
            with contextlib.suppress(Exception):
                self._on_stopped()
