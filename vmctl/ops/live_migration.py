"""A migration under way: followed through the source's MIGRATION events until it ends, with
postcopy, pause and recover, cancel, and a QEMU dying under it. Its convergence policy acts on its
own (``ops.convergence_driver``), whether or not anybody is inside ``wait``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

import attrs

from vmctl.errors import (
    ConnectionLost,
    EventTimeout,
    InvalidArgument,
    MigrationError,
    QMPError,
    VmctlError,
    WaitTimeout,
)
from vmctl.model.migration import (
    DEFAULT_DOWNTIME_LIMIT_MS,
    Escalation,
    MigrationOptions,
    MigrationProgress,
    MigrationResult,
)
from vmctl.ops.convergence import Forecast
from vmctl.ops.convergence_driver import ConvergenceDriver
from vmctl.ops.migration import (
    POSTCOPY,
    TERMINAL,
    wait_status,
    wait_terminal,
)
from vmctl.qmp import QMPMonitor, Subscription

# How long a completed migration's final figures may take to appear in query-migrate.
_RESULT_SETTLE = 2.0
#: How often a waiter looks whether the other side's QEMU is still there.
_WATCH_INTERVAL = 0.25
#: How long a cancel takes to end a migration whose target died.
_CANCEL_TIMEOUT = 10.0
#: How long an incoming QEMU takes to end its side once the source is gone.
_INCOMING_END_TIMEOUT = 0.5


class Migration:
    """A migration under way, between two monitors (the target's is None for a URI target).
    ``wait`` follows it through QEMU's MIGRATION events. At the end the target side is handed
    over (``on_target_ready``, then ``cont``) and the source is finished (``finish_source``)."""

    def __init__(
        self,
        *,
        source: QMPMonitor,
        target: QMPMonitor | None,
        log: Any,
        uri: str,
        options: MigrationOptions,
        source_events: Subscription,
        target_events: Subscription | None,
        restore: Callable[[], None],
        resume_target: bool,
        stop_source: bool,
        on_target_ready: Callable[[], Any] | None,
        finish_source: Callable[[], Any],
        on_completed: Callable[[], Any] | None = None,
        on_aborted: Callable[[], Any] | None = None,
        on_ended: Callable[[], Any] | None = None,
        convergence: ConvergenceDriver | None = None,
    ) -> None:
        self.source = source
        self.target = target
        self._log = log
        self.uri = uri
        self.options = options
        self._events = source_events
        self._target_events = target_events
        self._restore = restore
        self._resume_target = resume_target
        self._stop_source = stop_source
        self._on_target_ready = on_target_ready
        self._finish_source = finish_source
        self._on_completed = on_completed
        self._on_aborted = on_aborted
        self._on_ended = on_ended
        self._status = "setup"
        self._result: MigrationResult | None = None
        self._postcopy_by_hand = False
        self._handed_over = False
        self._convergence = convergence
        self._forecast = Forecast(downtime_limit_ms=options.downtime_limit or DEFAULT_DOWNTIME_LIMIT_MS)
        self.started = convergence.started if convergence is not None else time.monotonic()

    @property
    def status(self) -> str:
        return self._status

    @property
    def escalations(self) -> tuple[Escalation, ...]:
        """The steps the convergence policy took so far (``finish_within``)."""
        return tuple(self._convergence.escalations) if self._convergence is not None else ()

    @property
    def _postcopy_started(self) -> bool:
        return self._postcopy_by_hand or (self._convergence is not None and self._convergence.postcopy_started)

    @property
    def _give_up(self) -> str | None:
        """The convergence policy's message, once it cancelled the migration at its deadline."""
        return self._convergence.gave_up if self._convergence is not None else None

    def progress(self) -> MigrationProgress:
        """The figures now, with vmctl's prediction of the time left (``eta_s``)."""
        sample = MigrationProgress.from_qmp(self.source.execute("query-migrate"))
        if self._convergence is not None:
            return self._convergence.observe(sample)
        self._forecast.observe(sample, time.monotonic())
        return attrs.evolve(sample, eta_s=self._forecast.eta_s(sample))

    def start_postcopy(self) -> None:
        if not self.options.postcopy:
            raise InvalidArgument("this migration was not started with postcopy=True")
        if self._convergence is not None:
            self._convergence.postcopy_started = True  # the policy does not ask again
        self.source.execute("migrate-start-postcopy")
        self._postcopy_by_hand = True

    def pause(self, *, timeout: float = 30.0) -> None:
        """Pause a postcopy migration whose link broke (out of band, on both sides), so that
        ``recover`` can resume it once the network is back."""
        if self._status not in POSTCOPY:
            raise InvalidArgument(f"only a postcopy migration can be paused (it is {self._status})")
        for monitor in self._monitors():
            with contextlib.suppress(QMPError):  # a side may already have paused by itself
                monitor.execute("migrate-pause", oob=True)
        self.wait_for_status("postcopy-paused", timeout=timeout)  # on both sides

    def recover(self, *, listen: tuple[str, int] | None = None, uri: str | None = None) -> None:
        """Resume a paused postcopy migration over a new connection: the target listens again
        (``migrate-recover``) and the source reconnects (``migrate`` with ``resume``)."""
        if self._status != "postcopy-paused":
            raise InvalidArgument(f"recover needs a paused postcopy migration (it is {self._status})")
        if uri is None:
            if listen is None:
                raise InvalidArgument("recover needs the address the target should listen on")
            uri = f"tcp:{listen[0]}:{listen[1]}"
        if self.target is not None:
            self.target.execute("migrate-recover", {"uri": uri}, oob=True)
        self.source.execute("migrate", {"uri": uri, "resume": True})
        self.uri = uri
        self._log.info("vm.migration_recovering", uri=uri)

    def _monitors(self) -> list[QMPMonitor]:
        return [self.source] + ([self.target] if self.target is not None else [])

    def continue_(self) -> None:
        """Let a migration paused before switchover (``pause_before_switchover=True``) finish."""
        self.source.execute("migrate-continue", {"state": "pre-switchover"})

    def cancel(self, *, timeout: float = 30.0) -> None:
        """Stop the migration; the source goes on running. Not once postcopy has begun: the
        guest runs on the target then, with part of its memory still on the source."""
        if self._status in TERMINAL:
            return
        if self._postcopy_started or self._status in POSTCOPY:
            raise InvalidArgument("a migration in postcopy cannot be cancelled: the guest runs on the target")
        self.source.execute("migrate_cancel")
        try:
            self.wait(timeout)
        except MigrationError as exc:
            if exc.status != "cancelled":
                raise

    def wait_for_status(self, status: str, *, timeout: float) -> None:
        """Wait until the migration reaches ``status`` (e.g. ``pre-switchover``, ``postcopy-active``).

        A postcopy status is reached when both sides are in it: the target switches to postcopy
        a moment after the source, and until then it cannot be paused (a link that breaks in
        between leaves it waiting on a dead socket)."""
        deadline = time.monotonic() + timeout
        try:
            self._wait_source_status(status, deadline, timeout)
            if status in POSTCOPY and self._target_events is not None:
                wait_status(self._target_events, status, max(0.0, deadline - time.monotonic()), "the incoming side")
        except ConnectionLost as exc:
            self._lost(exc)
            if status != "completed":
                raise MigrationError(f"the migration completed before reaching {status}", status="completed") from exc

    def _wait_source_status(self, status: str, deadline: float, timeout: float) -> None:
        while self._status != status:
            if self._status in TERMINAL:
                raise MigrationError(
                    f"the migration ended ({self._status}) before reaching {status}", status=self._status
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"the migration did not reach {status} within {timeout:g}s (it is {self._status})")
            try:
                self._read_event(min(remaining, _WATCH_INTERVAL))
            except EventTimeout:
                self._check_target()

    def _read_event(self, timeout: float) -> None:
        """Read the source's next MIGRATION event: its status."""
        self._status = str(self._events.get(timeout).data.get("status"))

    def wait(
        self,
        timeout: float,
        *,
        stall_timeout: float = 30.0,
        on_progress: Callable[[MigrationProgress], Any] | None = None,
        progress_interval: float = 0.5,
    ) -> MigrationResult:
        """Wait for the end. Returns the figures on success; ``MigrationError`` (with QEMU's
        error-desc) on failure or cancel. If no byte moves for ``stall_timeout`` seconds (a cut
        link), the migration is cancelled and fails. ``WaitTimeout`` if still running at ``timeout``."""
        if self._result is not None:
            return self._result
        try:
            return self._wait(timeout, stall_timeout, on_progress, progress_interval)
        except ConnectionLost as exc:
            return self._lost(exc)

    def _wait(
        self,
        timeout: float,
        stall_timeout: float,
        on_progress: Callable[[MigrationProgress], Any] | None,
        progress_interval: float,
    ) -> MigrationResult:
        deadline = time.monotonic() + timeout
        last_transferred, last_moved = -1, time.monotonic()
        next_progress = time.monotonic() + progress_interval
        while self._status not in TERMINAL:
            self._check_target()
            if self._status in POSTCOPY:
                self._hand_over()  # in postcopy the guest runs on the target
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"the migration is still {self._status} after {timeout:g}s")
            if time.monotonic() < next_progress:  # a new status is looked at at once
                with contextlib.suppress(EventTimeout):
                    self._read_event(min(remaining, next_progress - time.monotonic(), _WATCH_INTERVAL))
                continue
            next_progress = time.monotonic() + progress_interval
            snapshot = self.progress()
            if on_progress is not None:
                on_progress(snapshot)
            if snapshot.status in TERMINAL:
                self._status = snapshot.status  # the event is on its way; the state is already known
            elif snapshot.transferred != last_transferred:
                last_transferred, last_moved = snapshot.transferred, time.monotonic()
            elif snapshot.status in POSTCOPY and time.monotonic() - last_moved > stall_timeout:
                # Postcopy cannot be cancelled: the guest's memory is split between the hosts.
                if snapshot.status != "postcopy-paused":
                    self.pause()
                raise MigrationError(
                    f"the postcopy migration made no progress for {stall_timeout:g}s and is paused; "
                    "call recover() once the link is back (both QEMUs wait, the guest is stopped)",
                    status="postcopy-paused",
                )
            elif time.monotonic() - last_moved > stall_timeout and snapshot.status != "pre-switchover":
                self.source.execute("migrate_cancel")
                self._end("cancelled")
                raise MigrationError(
                    f"the migration made no progress for {stall_timeout:g}s and was cancelled (is the link down?)",
                    status="cancelled",
                )
        return self._finish()

    def _lost(self, exc: ConnectionLost) -> MigrationResult:
        """A QEMU died under a waiter: the wait ends at once, with what became of the guest."""
        if not self.source.is_connected:
            return self._source_died(exc)
        if self.target is not None and not self.target.is_connected:
            self._target_died()
        raise exc

    def _source_died(self, exc: ConnectionLost) -> MigrationResult:
        """The source QEMU is gone. If the target has the whole guest (it died after sending
        the last of it), the target takes over as after any migration; else the guest is lost."""
        self._log.warning("vm.migration_source_died", status=self._status, error=str(exc))
        self._status = "failed"
        incoming = None
        if self.target is not None and self._target_events is not None and self.target.is_connected:
            with contextlib.suppress(VmctlError):  # a broken stream ends the incoming side at once
                incoming = wait_terminal(self._target_events, _INCOMING_END_TIMEOUT)
        if incoming != "completed" or self.target is None:
            self._ended()  # the guest is lost: nothing is left to settle
            postcopy = " (in postcopy: its memory was split between the two)" if self._postcopy_started else ""
            raise MigrationError(
                f"the source QEMU died during the migration: the guest ran there and is lost{postcopy}",
                status="failed",
            ) from exc
        self._status = "completed"
        self._result = MigrationResult(
            status="completed",
            total_time_ms=0,
            downtime_ms=0,
            setup_time_ms=0,
            transferred=0,
            postcopy=self._postcopy_started,
            escalations=self.escalations,
        )
        self._hand_over()
        self._ended()
        return self._result

    def _check_target(self) -> None:
        if self.target is not None and not self.target.is_connected and self.source.is_connected:
            self._target_died()

    def _target_died(self) -> None:
        """The incoming QEMU is gone. Before postcopy the source still has the whole guest: the
        migration is cancelled and it runs on. In postcopy the guest's memory was split between
        the two, so it cannot be resumed anywhere: the source stays paused."""
        self._log.warning("vm.migration_target_died", status=self._status)
        if self._status in POSTCOPY or self._postcopy_started:
            self._status = "failed"
            raise MigrationError(
                "the target QEMU died during postcopy: the guest's memory was split between the two "
                "and it cannot be resumed (the source stays paused)",
                status="failed",
            )
        if self._handed_over:  # it may have run the guest: resuming the source would fork it
            raise MigrationError(
                "the target QEMU died as it took the guest over: the guest is lost (the source stays paused)",
                status="failed",
            )
        if self._status == "completed":  # it had all of the guest but never ran it: the source takes it back
            self._end("failed")
            self.source.execute("cont")
            raise MigrationError(
                "the target QEMU died before it took the guest over; the source resumed it", status="failed"
            )
        with contextlib.suppress(QMPError):
            self.source.execute("migrate_cancel")
            wait_terminal(self._events, _CANCEL_TIMEOUT)
        self._end("cancelled")
        raise MigrationError(  # a target ends its side when the policy cancels: not news then
            self._give_up or "the target QEMU died; the migration was cancelled and the source runs on",
            status="cancelled",
        )

    def _finish(self) -> MigrationResult:
        info = self.source.execute("query-migrate")
        # QEMU enters (and announces) "completed" a moment before it computes the final times:
        # a query in between reads 0. Ask again, briefly, until the figures are in.
        settle = time.monotonic() + _RESULT_SETTLE
        while self._status == "completed" and not info.get("total-time") and time.monotonic() < settle:
            time.sleep(0.005)
            info = self.source.execute("query-migrate")
        if self._status != "completed":
            self._end(self._status)
            gone = self.target is not None and not self.target.is_connected
            if self._give_up is not None and self._status == "cancelled":
                raise MigrationError(self._give_up, status="cancelled")
            raise MigrationError(
                "the target QEMU died; the migration failed and the source runs on"
                if gone
                else f"the migration {self._status}",
                status=self._status,
                error_desc=str(info.get("error-desc", "")),
            )
        self._result = MigrationResult.from_qmp(
            info,
            postcopy=self._postcopy_started,
            escalations=self.escalations,
            skipped=self._convergence.convergence.plan.skipped if self._convergence is not None else (),
        )
        self._events.close()
        if self._on_completed is not None:
            self._on_completed()  # e.g. end the storage mirrors in sync, while the source is stopped
        target = self.target
        if target is not None:
            if self._target_events is not None:
                self._wait_target_completed(self._target_events)
            self._hand_over()
        if self._stop_source:  # before the journal entries go: a source left running is settled at attach
            self._finish_source()
        self._ended()
        return self._result

    def _hand_over(self) -> None:
        """The target takes the guest (once): its inventory, then ``cont``. At completion, or as
        soon as postcopy begins (the guest runs on the target, which asks the source for the pages
        it lacks), unless disks are being copied: those must be in sync first."""
        if self._handed_over or self.target is None:
            return
        if self._status != "completed" and self._on_completed is not None:
            return
        if self._on_target_ready is not None:
            self._on_target_ready()
            self._on_target_ready = None
        if self._resume_target:
            self._handed_over = True  # from here the guest may run there
            self.target.execute("cont")
            self._log.info("vm.migration_target_resumed", status=self._status)

    def _wait_target_completed(self, events: Subscription) -> None:
        deadline = time.monotonic() + 30
        try:
            while time.monotonic() < deadline:
                status = events.get(max(0.0, deadline - time.monotonic())).data.get("status")
                if status in TERMINAL:
                    if status != "completed":
                        raise MigrationError(f"the target's incoming migration {status}", status=str(status))
                    return
        except EventTimeout:
            raise MigrationError("the target never reported the incoming migration complete", status="failed") from None
        finally:
            events.close()

    def _end(self, status: str) -> None:
        self._status = status
        self._events.close()
        if self._target_events is not None:
            self._target_events.close()
        with contextlib.suppress(QMPError):  # the source monitor may be gone too: nothing to restore
            self._restore()
        if self._on_aborted is not None:
            with contextlib.suppress(QMPError):
                self._on_aborted()
        self._ended()

    def _ended(self) -> None:
        """The migration's outcome is known and acted on: its policy stops, its journal entries go."""
        if self._convergence is not None:
            self._convergence.stop()
        if self._on_ended is not None:
            self._on_ended()
