"""A migration of a libvirt domain under way: ``LibvirtMigration``, and libvirt's job figures as
vmctl's ``MigrationProgress`` and ``MigrationResult``.

libvirt's ``migrateToURI3`` blocks until the migration has ended, so it runs on a thread of the
migration's own (not the shared pool of :mod:`vmctl.libvirt.calls`); ``wait`` joins that thread
with a deadline, and ``progress``, ``cancel`` and ``start_postcopy`` ask libvirt on the same
connection meanwhile (libvirt's RPC takes concurrent calls). How one starts:
:mod:`vmctl.libvirt.migration`.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from structlog.typing import FilteringBoundLogger

from vmctl.errors import InvalidArgument, MigrationError, WaitTimeout
from vmctl.libvirt.calls import bounded
from vmctl.libvirt.errors import LibvirtError, LibvirtMigrationError, libvirt_error
from vmctl.libvirt.eventloop import libvirt_module
from vmctl.logs import get_logger
from vmctl.model.migration import MigrationProgress, MigrationResult
from vmctl.qmp.timeouts import check_timeout

Target = TypeVar("Target", covariant=True)


class MigrationSource(Protocol[Target]):
    """What a migration needs of the VM it moves (a ``LibvirtVM``), and how to reach it once moved."""

    @property
    def name(self) -> str: ...

    @property
    def domain(self) -> Any: ...

    @property
    def known_run_dir(self) -> Path | None: ...

    def reopened(self, uri: str, run_dir: Path | None) -> Target: ...


log: FilteringBoundLogger = get_logger(__name__)

#: How long the completed job's figures (libvirt's JOB_COMPLETED event) may lag behind the end.
_RESULT_SETTLE = 2.0
#: How often cancel and start_postcopy look again whether libvirt's job has begun.
_RETRY_INTERVAL = 0.05


def _int(stats: Mapping[str, Any], key: str) -> int:
    return int(stats.get(key, 0) or 0)


def progress_from_stats(stats: Mapping[str, Any], *, status: str) -> MigrationProgress:
    """libvirt's ``jobStats()`` of a migration under way as a ``MigrationProgress``."""
    bps = _int(stats, "memory_bps")
    return MigrationProgress(
        status=status,
        total_time_ms=_int(stats, "time_elapsed"),
        transferred=_int(stats, "memory_processed"),
        remaining=_int(stats, "memory_remaining"),
        total=_int(stats, "memory_total"),
        dirty_rate=_int(stats, "memory_dirty_rate") * (_int(stats, "memory_page_size") or 4096),
        bandwidth=bps,
        mbps=bps * 8 / 1e6,
        passes=_int(stats, "memory_iteration"),
        throttle_percent=_int(stats, "auto_converge_throttle"),
        expected_downtime_ms=_int(stats, "downtime"),  # of a job under way: libvirt's (QEMU's) estimate
        compressed_pages=_int(stats, "compression_pages"),
    )


def result_from_stats(stats: Mapping[str, Any], *, postcopy: bool) -> MigrationResult:
    """libvirt's figures of the completed job (``jobStats(COMPLETED)`` or its JOB_COMPLETED event)."""
    return MigrationResult(
        status="completed",
        total_time_ms=_int(stats, "time_elapsed"),
        downtime_ms=_int(stats, "downtime"),
        setup_time_ms=_int(stats, "setup_time"),
        transferred=_int(stats, "memory_processed"),
        postcopy=postcopy,
    )


# -- a migration under way --------------------------------------------------------------------


class LibvirtMigration(Generic[Target]):
    """A migration of a ``LibvirtVM`` under way (``vm.migrate(target_uri, ...)``): ``wait`` for its
    ``MigrationResult``, ``progress``, ``cancel`` (the source runs on), ``start_postcopy``, and once
    completed, ``target()``: the domain on the target as a ``LibvirtVM``."""

    def __init__(
        self,
        vm: MigrationSource[Target],
        target_uri: str,
        *,
        flags: int,
        params: dict[str, Any],
        postcopy: bool,
        target_run_dir: Path | None,
    ) -> None:
        self.name = vm.name
        self.target_uri = target_uri
        self.postcopy = postcopy
        self.target_run_dir = target_run_dir
        self._source_run_dir = vm.known_run_dir
        self._reopened = vm.reopened
        self._domain = vm.domain
        self._flags = flags
        self._params = params
        self._log = log.bind(vm=self.name, target=target_uri)
        self._libvirt = libvirt_module()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: LibvirtMigrationError | None = None
        self._cancelled = False
        self._postcopy_started = False
        self._completed_stats: dict[str, Any] | None = None
        self._stats_arrived = threading.Event()
        self._result: MigrationResult | None = None
        self._started = time.monotonic()
        self._conn = self._domain.connect()
        self._callback: int | None = self._conn.domainEventRegisterAny(
            self._domain, self._libvirt.VIR_DOMAIN_EVENT_ID_JOB_COMPLETED, self._job_completed, None
        )
        self._thread = threading.Thread(target=self._run, name=f"vmctl-libvirt-migrate-{self.name}", daemon=True)
        self._log.info("libvirt.migrate", flags=flags, params=sorted(params))
        self._thread.start()

    # -- state ------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        """``active`` (``progress()`` tells ``setup`` from it), ``postcopy-active``, then
        ``completed``, ``failed`` or ``cancelled``."""
        if not self._done.is_set():
            return "postcopy-active" if self._postcopy_started else "active"
        if self._error is None:
            return "completed"
        return self._error.status

    def progress(self, *, timeout: float = 10.0) -> MigrationProgress:
        """Where the migration is (libvirt's ``jobStats``); of an ended one, its last status and nothing more."""
        if self._done.is_set():
            return MigrationProgress(
                status=self.status, total_time_ms=0, transferred=0, remaining=0, total=0, dirty_rate=0,
                bandwidth=0, mbps=0.0, passes=0, throttle_percent=0, expected_downtime_ms=0,
            )  # fmt: skip
        stats = bounded(f"{self.name}: jobStats", timeout, self._domain.jobStats, 0)
        status = self.status
        if status == "active" and not _int(stats, "memory_total"):
            status = "setup"  # libvirt's job has begun (talking to the target), QEMU's migration not yet
        return progress_from_stats(stats, status=status)

    # -- waiting ----------------------------------------------------------------------------

    def wait(
        self,
        timeout: float,
        *,
        on_progress: Callable[[MigrationProgress], object] | None = None,
        progress_interval: float = 0.5,
    ) -> MigrationResult:
        """Wait until the migration has ended: its ``MigrationResult``; ``LibvirtMigrationError``
        (``status`` failed or cancelled, libvirt's message) if it did not complete; ``WaitTimeout``
        if it still runs after ``timeout`` (it goes on: wait again, or cancel it).
        ``on_progress`` is called every ``progress_interval`` seconds meanwhile."""
        check_timeout(timeout, "timeout")
        check_timeout(progress_interval, "progress_interval")
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if self._done.wait(max(0.0, min(left, progress_interval) if on_progress else left)):
                break
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{self.name}: the migration to {self.target_uri} still runs after {timeout:g}s")
            if on_progress is not None:
                try:
                    sample = self.progress(timeout=max(0.1, min(10.0, deadline - time.monotonic())))
                except LibvirtError:
                    continue  # the job ended between the two looks
                on_progress(sample)
        if self._error is not None:
            raise self._error
        return self._finish(deadline)

    def _finish(self, deadline: float) -> MigrationResult:
        with self._lock:
            if self._result is not None:
                return self._result
        self._stats_arrived.wait(max(0.0, min(_RESULT_SETTLE, deadline - time.monotonic())))
        stats = self._completed_stats
        if stats is None:  # no event: a source still defined (persistent=False) still has them
            with contextlib.suppress(LibvirtError):
                stats = bounded(
                    f"{self.name}: completed jobStats",
                    5.0,
                    self._domain.jobStats,
                    self._libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED,
                )
        result = result_from_stats(stats or {}, postcopy=self._postcopy_started)
        self._deregister()
        with self._lock:
            self._result = result
        self._log.info("libvirt.migrated", total_time_ms=result.total_time_ms, downtime_ms=result.downtime_ms)
        return result

    # -- changing its course ----------------------------------------------------------------

    def cancel(self, *, timeout: float = 30.0) -> None:
        """Abort the migration (``abortJob``) and wait until it has ended; the source goes on
        running. Not once postcopy has begun (the guest runs on the target then): ``InvalidArgument``.
        Of a migration that has already ended, nothing."""
        check_timeout(timeout, "timeout")
        if self._done.is_set():
            return
        if self._postcopy_started:
            raise InvalidArgument("a migration in postcopy cannot be cancelled: the guest runs on the target")
        deadline = time.monotonic() + timeout
        self._cancelled = True
        self._log.info("libvirt.migrate_cancel")
        self._retry_while_no_job("abortJob", deadline, self._domain.abortJob)
        if not self._done.wait(max(0.0, deadline - time.monotonic())):
            raise WaitTimeout(f"{self.name}: the migration still runs {timeout:g}s after it was cancelled")

    def start_postcopy(self, *, timeout: float = 30.0) -> None:
        """Switch to postcopy (``migrateStartPostCopy``): the guest runs on the target from now on,
        which fetches what is left of its memory from the source. Needs ``postcopy=True`` at start;
        waits (at most ``timeout``) until QEMU's migration has begun."""
        if not self.postcopy:
            raise InvalidArgument("start_postcopy needs a migration started with postcopy=True")
        check_timeout(timeout, "timeout")
        deadline = time.monotonic() + timeout
        while not self._done.is_set():  # QEMU refuses it before its own migration has begun
            with contextlib.suppress(LibvirtError):
                if _int(bounded(f"{self.name}: jobStats", 10.0, self._domain.jobStats, 0), "memory_total") > 0:
                    break
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{self.name}: the migration had not begun in QEMU after {timeout:g}s")
            time.sleep(_RETRY_INTERVAL)
        if self._done.is_set():
            raise MigrationError(f"{self.name}: the migration has ended ({self.status})", status=self.status)
        self._log.info("libvirt.migrate_postcopy")
        self._retry_while_no_job("migrateStartPostCopy", deadline, self._domain.migrateStartPostCopy, 0)
        self._postcopy_started = True

    def _retry_while_no_job(self, what: str, deadline: float, call: Callable[..., object], *args: Any) -> None:
        """``call``, again while libvirt has not begun its migration job yet (right after the start)."""
        while True:
            try:
                bounded(f"{self.name}: {what}", max(0.1, deadline - time.monotonic()), call, *args)
                return
            except LibvirtError as exc:
                if self._done.is_set():
                    return  # it ended meanwhile: wait() tells how
                if exc.code != self._libvirt.VIR_ERR_OPERATION_INVALID or time.monotonic() >= deadline:
                    raise
            time.sleep(_RETRY_INTERVAL)

    # -- the target -------------------------------------------------------------------------

    def target(self, uri: str | None = None, *, run_dir: str | os.PathLike[str] | None = None) -> Target:
        """The migrated domain on the target, as a ``LibvirtVM`` (close it when done). ``uri``: how
        this process reaches the target's libvirtd (default: the URI the source used); ``run_dir``:
        the target's (default: ``target_run_dir``, else the source's, which the XML carried)."""
        if self.status != "completed":
            raise MigrationError(
                f"{self.name}: the migration is {self.status}; the domain is on the target once it has completed",
                status=self.status,
            )
        where = Path(run_dir) if run_dir is not None else (self.target_run_dir or self._source_run_dir)
        return self._reopened(uri or self.target_uri, where)

    # -- the worker and libvirt's event -----------------------------------------------------

    def _run(self) -> None:
        try:
            self._domain.migrateToURI3(self.target_uri, self._params, self._flags)
        except self._libvirt.libvirtError as exc:
            error = libvirt_error(exc, "")
            status = "cancelled" if self._cancelled else "failed"
            self._error = LibvirtMigrationError(
                f"{self.name}: migration to {self.target_uri}", code=error.code, reason=error.reason, status=status
            )
            self._log.warning("libvirt.migrate_failed", status=status, reason=error.reason)
        except BaseException as exc:  # never leave a waiter without an end
            self._error = LibvirtMigrationError(f"{self.name}: migration to {self.target_uri}", reason=repr(exc))
        finally:
            if self._error is not None:
                self._deregister()
            self._done.set()

    def _job_completed(self, conn: Any, domain: Any, params: dict[str, Any], opaque: Any) -> None:
        self._completed_stats = dict(params)
        self._stats_arrived.set()

    def _deregister(self) -> None:
        with self._lock:
            callback, self._callback = self._callback, None
        if callback is not None:
            with contextlib.suppress(self._libvirt.libvirtError):
                self._conn.domainEventDeregisterAny(callback)
