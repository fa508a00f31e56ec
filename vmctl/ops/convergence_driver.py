"""The convergence policy at work on a migration under way, whether or not anybody waits on it.

The source's own events drive it: at each MIGRATION_PASS it samples ``query-migrate``, the policy
(``ops.convergence.Convergence``) decides, and the step is taken; at ``finish_within`` a deadline
gives it its last look (the give-up); a terminal MIGRATION event stops it. It runs on the process's
callback thread (events through the reactor, the deadline through ``vmctl.qmp.timers``), never on
a thread of its own, so a control plane that only polls ``progress()`` gets the same escalations
as one inside ``wait()``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

import attrs

from vmctl.errors import CommandError, ConnectionLost, QMPError
from vmctl.model.migration import Escalation, MigrationProgress
from vmctl.ops import convergence as policy
from vmctl.ops.migration import TERMINAL
from vmctl.ops.queries import execute_idempotent
from vmctl.qmp import QMPMonitor
from vmctl.qmp.messages import Event
from vmctl.qmp.timers import timers


class ConvergenceDriver:
    """Drives one migration's ``Convergence`` from the source's events and its deadline:
    ``start`` before the migration is (so that no pass goes unseen), ``stop`` when it has ended."""

    def __init__(self, source: QMPMonitor, convergence: policy.Convergence, log: Any) -> None:
        self.source = source
        self.convergence = convergence
        self._log = log
        self._lock = threading.Lock()
        self._stops: list[Callable[[], None]] = []
        self._stopped = False
        #: The give-up's message once the policy cancelled the migration at its deadline.
        self.gave_up: str | None = None
        #: Postcopy has begun (by the policy, or by hand: then the policy does not ask again).
        self.postcopy_started = False
        for escalation in convergence.escalations:  # those taken when it starts (compression)
            self._log_escalation(escalation)

    @property
    def started(self) -> float:
        return self.convergence.started

    @property
    def escalations(self) -> tuple[Escalation, ...]:
        with self._lock:
            return tuple(self.convergence.escalations)

    def start(self) -> None:
        """Follow the source's migration events, and set the deadline at ``finish_within``."""
        self._stops.append(self.source.on_event(self._on_event, "MIGRATION", "MIGRATION_PASS"))
        deadline = self.convergence.started + self.convergence.policy.finish_within
        self._stops.append(timers().call_at(deadline, self.step))

    def stop(self) -> None:
        """No more steps: the migration has ended (or its source is gone)."""
        with self._lock:
            self._stopped = True
            stops, self._stops = self._stops, []
        for stop in stops:
            stop()

    def observe(self, sample: MigrationProgress) -> MigrationProgress:
        """A sample someone else took (``progress()``), into the forecast; with its ETA."""
        with self._lock:
            self.convergence.forecast.observe(sample, time.monotonic())
            return attrs.evolve(sample, eta_s=self.convergence.forecast.eta_s(sample))

    def _on_event(self, event: Event) -> None:
        if event.name == "MIGRATION_PASS":
            self.step()
        elif str(event.data.get("status")) in TERMINAL:
            self.stop()

    def step(self) -> None:
        """Sample the migration now; the policy decides on it, and its step is taken."""
        if self._stopped:
            return
        try:
            sample = MigrationProgress.from_qmp(self.source.execute("query-migrate"))
            with self._lock:
                action = self.convergence.decide(sample, time.monotonic())
            self._act(action)
        except ConnectionLost:
            self.stop()  # the source is gone: whoever waits learns what became of the guest
        except QMPError as exc:  # a step QEMU refused: the policy goes on to its next chance
            self._log.warning("vm.migration_step_failed", error=str(exc))

    def _act(self, action: policy.Action | None) -> None:
        """Carry out a step of the convergence policy (one log event with its figures)."""
        if action is None:
            return
        if isinstance(action, policy.GiveUp):
            self._log.warning("vm.migration_gave_up", reason=action.message)
            self.gave_up = action.message
            with contextlib.suppress(CommandError):  # it may have just ended
                self.source.execute("migrate_cancel")
            return
        self._log_escalation(self.escalations[-1])
        if isinstance(action, policy.SetDowntime):
            execute_idempotent(self.source, "migrate-set-parameters", {"downtime-limit": action.limit_ms})
        elif isinstance(action, policy.ReleaseThrottle):
            execute_idempotent(self.source, "migrate-set-parameters", action.parameters)
        elif not self.postcopy_started:  # the caller may have switched by hand (start_postcopy)
            self.postcopy_started = True
            self.source.execute("migrate-start-postcopy")

    def _log_escalation(self, escalation: Escalation) -> None:
        self._log.info("vm.migration_escalated", **{**attrs.asdict(escalation), "step": escalation.step.value})
