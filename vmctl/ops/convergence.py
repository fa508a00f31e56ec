"""The convergence policy of a migration: at each pass, from QEMU's figures, whether precopy will
end in time, and the next step when it will not.

``Convergence`` does no I/O (like the QMP core): the ``Migration`` feeds it ``query-migrate``
samples and carries out what it decides. ``plan`` asks QEMU, once, which steps this migration
may take at all.

How it predicts. QEMU ends precopy at a pass whose dirty memory it can send within the downtime
limit. Each pass sends what the guest dirtied during the one before, so the memory left at a pass
start shrinks by r = dirty rate / bandwidth per pass, or, for a guest that rewrites the same
working set, not at all: r is also read from how that memory actually changed over the last passes.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import attrs

from vmctl.model.migration import (
    DEFAULT_DOWNTIME_LIMIT_MS,
    ConvergencePolicy,
    Escalation,
    MigrationProgress,
    Skipped,
    Step,
)
from vmctl.ops.queries import ask
from vmctl.qmp import QEMUVersion, QMPMonitor

#: Margin on the downtime a pass needs (QEMU's bandwidth estimate and the pass sizes vary).
_DOWNTIME_MARGIN = 1.5
#: A shrink ratio this close to 1 is no convergence to wait for.
_TOO_SLOW = 0.9
#: Precopy must be predicted to end within this share of the time left, or the policy steps in.
_TIME_SHARE = 0.5
#: How many passes the shrink of the memory left is read over.
_TREND_PASSES = 3
#: Auto-converge once let go: a first throttle, then this much more at each pass that needs it.
_THROTTLE_INITIAL = 30
_THROTTLE_INCREMENT = 20
#: The XBZRLE cache: a quarter of the guest's RAM (a power of two), within these bounds.
_COMPRESSION_CACHE_MIN = 16 << 20
_COMPRESSION_CACHE_MAX = 256 << 20
#: States past the point where a cancel could still give the guest back to the source.
_BEYOND_CANCEL = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover", "device", "completed"})


@attrs.frozen(kw_only=True)
class SetDowntime:
    limit_ms: int


@attrs.frozen(kw_only=True)
class ReleaseThrottle:
    parameters: dict[str, Any]


@attrs.frozen(kw_only=True)
class StartPostcopy:
    pass


@attrs.frozen(kw_only=True)
class GiveUp:
    message: str


Action = SetDowntime | ReleaseThrottle | StartPostcopy | GiveUp


@attrs.frozen(kw_only=True)
class Plan:
    """Which steps this migration may take (``throttle``, ``postcopy``) and which not, and why;
    ``compression_cache``: XBZRLE on from the start with a cache of that many bytes."""

    throttle: bool
    postcopy: bool
    skipped: tuple[Skipped, ...]
    compression_cache: int | None = None
    memory: int = 0  # the guest's RAM, bytes


def plan(
    source: QMPMonitor,
    *,
    policy: ConvergencePolicy,
    target: QMPMonitor | None,
    postcopy_refusal: str | None,
    multifd: bool,
    copy_storage: bool,
) -> Plan:
    """Ask the source's QEMU which steps are possible and safe; the others are ``skipped``."""
    capabilities = {c["capability"] for c in ask(source, "query-migrate-capabilities")}
    tcg = not bool(ask(source, "query-kvm").get("enabled"))
    skipped: list[Skipped] = []
    throttle_refusal = _throttle_refusal(policy, capabilities, source.version, tcg=tcg)
    if throttle_refusal is not None:
        skipped.append(Skipped(step=Step.THROTTLE, reason=throttle_refusal))
    refusal = postcopy_refusal
    if not policy.allow_postcopy:
        refusal = "not allowed (allow_postcopy=False)"
    elif target is None:
        refusal = "needs a target VM: the capabilities of a URI's QEMU are not vmctl's to set"
    elif multifd:
        refusal = "cannot be combined with multifd"
    elif copy_storage:
        refusal = "not with copy_storage: the target would run the guest before its disks are in sync"
    elif "postcopy-ram" not in capabilities:
        refusal = f"QEMU {source.version} has no postcopy-ram"
    if refusal is not None:
        skipped.append(Skipped(step=Step.POSTCOPY, reason=refusal))
    skipped.append(Skipped(step=Step.DIRTY_LIMIT, reason=_dirty_limit_refusal(capabilities, source.version, tcg=tcg)))
    compression_refusal = _compression_refusal(policy, capabilities, source.version, tcg=tcg, multifd=multifd)
    memory = 0  # asked only when compression is on: its cache is sized from it
    if compression_refusal is not None:
        skipped.append(Skipped(step=Step.COMPRESSION, reason=compression_refusal))
    else:
        memory = int(ask(source, "query-memory-size-summary").get("base-memory", 0))
    return Plan(
        throttle=throttle_refusal is None,
        postcopy=refusal is None,
        skipped=tuple(skipped),
        compression_cache=compression_cache(memory) if compression_refusal is None else None,
        memory=memory,
    )


def compression_cache(memory: int) -> int:
    """The XBZRLE cache for a guest of ``memory`` bytes: a quarter of it, a power of two, 16-256 MiB."""
    quarter = max(memory // 4, 1)
    return min(_COMPRESSION_CACHE_MAX, max(_COMPRESSION_CACHE_MIN, 1 << (quarter.bit_length() - 1)))


def _compression_refusal(
    policy: ConvergencePolicy, capabilities: set[str], version: QEMUVersion, *, tcg: bool, multifd: bool
) -> str | None:
    if not policy.allow_compression:
        return "not allowed (allow_compression=False)"
    if "xbzrle" not in capabilities:
        return f"QEMU {version} has no xbzrle"
    if multifd:
        return "not with multifd: its channels send pages whole"
    if tcg and (version.major, version.minor) < (10, 0):
        # Measured on 7.2 (bench/xbzrle_probe.py and by hand): a guest rewriting its pages in place
        # moves in 9 s with XBZRLE, but in 2 of 3 runs a read of the rewritten file on the target
        # never returned; 10.0 carried it whole every time. Pages that all miss the cache come through.
        return f"QEMU {version} under TCG: XBZRLE's page deltas break a guest that rewrites its pages (fixed by 10.0)"
    return None


def _throttle_refusal(
    policy: ConvergencePolicy, capabilities: set[str], version: QEMUVersion, *, tcg: bool
) -> str | None:
    if not policy.allow_throttle:
        return "not allowed (allow_throttle=False)"
    if "auto-converge" not in capabilities:
        return f"QEMU {version} has no auto-converge"
    if tcg and (version.major, version.minor) < (10, 0):
        # Measured on 7.2: the guest kernel panics on the target right after a throttled
        # migration, also with raw QMP; 10.0 carries the same guest intact. Versions between are untested.
        return f"QEMU {version} under TCG: auto-converge's throttling corrupts a busy guest (fixed by 10.0)"
    return None


def _dirty_limit_refusal(capabilities: set[str], version: QEMUVersion, *, tcg: bool) -> str:
    if "dirty-limit" not in capabilities:
        return f"QEMU {version} has no dirty-limit (it came with 8.1)"
    if tcg:
        return "needs KVM's dirty ring: this QEMU runs TCG"
    return "needs KVM's dirty ring (-accel kvm,dirty-ring-size=N), which vmctl does not set up"


class Forecast:
    """What the passes so far say: the link's bandwidth, the guest's dirty rate, the memory left
    at each pass start, and from them when precopy will end (or that it will not)."""

    def __init__(self, *, downtime_limit_ms: int = DEFAULT_DOWNTIME_LIMIT_MS) -> None:
        self.downtime_limit_ms = downtime_limit_ms
        self.passes = 0
        self.pending = 0  # bytes left when the current pass began: what the guest dirtied in the last
        self.bandwidth = 0  # bytes per second, over the last pass
        self.dirty_rate = 0
        self._pass_starts: deque[tuple[float, int, int]] = deque(maxlen=_TREND_PASSES + 1)  # (time, sent, left)
        self._last: tuple[float, int] | None = None

    def observe(self, progress: MigrationProgress, now: float) -> bool:
        """Take a sample in; True when it is the first of a new pass."""
        new_pass = progress.passes > self.passes
        if (
            self._last is not None
            and now > self._last[0]
            and progress.transferred > self._last[1]
            and not self.bandwidth
        ):
            self.bandwidth = int((progress.transferred - self._last[1]) / (now - self._last[0]))
        self._last = (now, progress.transferred)
        if progress.bandwidth:
            self.bandwidth = progress.bandwidth
        if new_pass:
            self.passes = progress.passes
            self._pass_starts.append((now, progress.transferred, progress.remaining))
            self.pending = progress.remaining
            if len(self._pass_starts) >= 2:
                (t0, sent0, _), (t1, sent1, _) = self._pass_starts[-2], self._pass_starts[-1]
                if t1 > t0 and sent1 > sent0:
                    self.bandwidth = self.bandwidth or int((sent1 - sent0) / (t1 - t0))
                    self.dirty_rate = progress.dirty_rate or int(self.pending / (t1 - t0))
        else:
            self.pending = max(self.pending, progress.remaining)
        return new_pass

    @property
    def needed_downtime_ms(self) -> int:
        """The downtime that sending the memory left at this pass start would take."""
        return math.ceil(self.pending / self.bandwidth * 1000) if self.bandwidth else 0

    @property
    def shrink(self) -> float | None:
        """How much the memory left shrinks per pass (None until one pass has ended)."""
        if self.passes < 2 or not self.bandwidth:
            return None
        ratios = [self.dirty_rate / self.bandwidth] if self.dirty_rate else []
        starts = [left for _, _, left in list(self._pass_starts)[1:]]  # the first is the whole RAM
        if len(starts) >= 2 and starts[0] > 0:
            ratios.append((max(starts[-1], 1) / starts[0]) ** (1 / (len(starts) - 1)))
        return max(ratios) if ratios else None

    def precopy_time(self) -> float | None:
        """Seconds until precopy ends from this pass start, or None if it will not."""
        if not self.bandwidth:
            return None
        needed = self.needed_downtime_ms
        if needed <= self.downtime_limit_ms:
            return self.pending / self.bandwidth
        ratio = self.shrink
        if ratio is None or ratio >= 1:
            return None
        passes = math.ceil(math.log(self.downtime_limit_ms / needed) / math.log(ratio))
        return self.pending / self.bandwidth * (1 - ratio**passes) / (1 - ratio)

    def eta_s(self, progress: MigrationProgress) -> float | None:
        """Seconds until the migration ends as things go (None: it cannot tell, or never)."""
        if not self.bandwidth:
            return None
        this_pass = progress.remaining / self.bandwidth
        if progress.status.startswith("postcopy") or self.passes < 2:
            return this_pass
        later = self.precopy_time()
        if later is None:
            return None
        return this_pass + max(0.0, later - self.pending / self.bandwidth)


class Convergence:
    """The policy at work on one migration: fed every sample, it answers with the next step."""

    def __init__(self, policy: ConvergencePolicy, plan: Plan, *, started: float, downtime_limit_ms: int) -> None:
        self.policy = policy
        self.plan = plan
        self.started = started
        self.forecast = Forecast(downtime_limit_ms=downtime_limit_ms)
        self.escalations: list[Escalation] = []
        if plan.compression_cache is not None:
            self.escalations.append(
                Escalation(
                    step=Step.COMPRESSION,
                    at_s=0.0,
                    passes=0,
                    remaining=plan.memory,
                    dirty_rate=0,
                    bandwidth=0,
                    needed_downtime_ms=0,
                    throttle_percent=0,
                    change=f"XBZRLE on, {plan.compression_cache >> 20} MiB cache",
                    reason="on from the start: QEMU sizes the cache only when a migration starts, and "
                    "it encodes only the pages sent again",
                )
            )
        self._throttling = False
        self._postcopy = False
        self._gave_up = False
        self._decided_pass = 0  # the last pass start decided on (others may feed the forecast too)

    def decide(self, progress: MigrationProgress, now: float) -> Action | None:
        """The step to take on this sample, if any (recorded in ``escalations`` when taken)."""
        self.forecast.observe(progress, now)
        elapsed = now - self.started
        if progress.status in _BEYOND_CANCEL or self._postcopy or self._gave_up:
            return None
        if elapsed >= self.policy.finish_within:
            self._gave_up = True
            return GiveUp(message=self._give_up_message(progress, elapsed))
        if self.forecast.passes <= self._decided_pass or self.forecast.passes < 2 or progress.status != "active":
            return None
        self._decided_pass = self.forecast.passes
        return self._next_step(progress, elapsed)

    def _next_step(self, progress: MigrationProgress, elapsed: float) -> Action | None:
        forecast = self.forecast
        needed = forecast.needed_downtime_ms
        if needed <= forecast.downtime_limit_ms:
            return None  # it ends at the next pass
        ratio = forecast.shrink
        expected = forecast.precopy_time()
        left = self.policy.finish_within - elapsed
        if ratio is not None and ratio < _TOO_SLOW and expected is not None and expected <= left * _TIME_SHARE:
            return None
        worded = f"needs {needed} ms of downtime, the limit is {forecast.downtime_limit_ms} ms"
        trend = "it does not shrink" if ratio is None or ratio >= 1 else f"it shrinks by {1 - ratio:.0%} a pass"
        reason = f"{worded}; {trend}"
        wanted = min(self.policy.max_downtime_ms, math.ceil(needed * _DOWNTIME_MARGIN))
        if needed * 1.1 <= self.policy.max_downtime_ms and wanted > forecast.downtime_limit_ms:
            change = f"downtime-limit {forecast.downtime_limit_ms} -> {wanted} ms"
            forecast.downtime_limit_ms = wanted
            return self._record(SetDowntime(limit_ms=wanted), Step.DOWNTIME, progress, elapsed, change, reason)
        if self.plan.postcopy:
            self._postcopy = True
            return self._record(StartPostcopy(), Step.POSTCOPY, progress, elapsed, "migrate-start-postcopy", reason)
        if self.plan.throttle and not self._throttling:
            self._throttling = True
            parameters = {
                "cpu-throttle-initial": min(_THROTTLE_INITIAL, self.policy.max_throttle),
                "cpu-throttle-increment": _THROTTLE_INCREMENT,
                "max-cpu-throttle": self.policy.max_throttle,
                "cpu-throttle-tailslow": True,
            }
            change = (
                f"auto-converge let go: {parameters['cpu-throttle-initial']}% then +{_THROTTLE_INCREMENT}% "
                f"a pass, up to {self.policy.max_throttle}%"
            )
            return self._record(
                ReleaseThrottle(parameters=parameters), Step.THROTTLE, progress, elapsed, change, reason
            )
        return None

    def _record(
        self, action: Action, step: Step, progress: MigrationProgress, elapsed: float, change: str, reason: str
    ) -> Action:
        self.escalations.append(
            Escalation(
                step=step,
                at_s=round(elapsed, 3),
                passes=progress.passes,
                remaining=self.forecast.pending,
                dirty_rate=self.forecast.dirty_rate,
                bandwidth=self.forecast.bandwidth,
                needed_downtime_ms=self.forecast.needed_downtime_ms,
                throttle_percent=progress.throttle_percent,
                change=change,
                reason=reason,
            )
        )
        return action

    def _give_up_message(self, progress: MigrationProgress, elapsed: float) -> str:
        forecast = self.forecast
        taken = ", ".join(e.change for e in self.escalations) or "none"
        skipped = "; ".join(f"{s.step.value}: {s.reason}" for s in self.plan.skipped if s.step is not Step.DIRTY_LIMIT)
        return (
            f"the migration did not finish within {self.policy.finish_within:g}s and was cancelled "
            f"(the source runs on): after {elapsed:.1f}s and {progress.passes} passes, "
            f"{forecast.pending / 1e6:.1f} MB were left at the last pass start, the guest dirtied "
            f"{forecast.dirty_rate / 1e6:.1f} MB/s and the link carried {forecast.bandwidth / 1e6:.1f} MB/s: "
            f"finishing needs {forecast.needed_downtime_ms} ms of downtime, max_downtime_ms is "
            f"{self.policy.max_downtime_ms}; throttle {progress.throttle_percent}%; steps taken: {taken}"
            + (f"; not taken: {skipped}" if skipped else "")
        )
