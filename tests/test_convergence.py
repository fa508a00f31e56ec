"""The convergence policy on its own: hand-built query-migrate samples at explicit times, no QEMU."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmctl.errors import InvalidArgument
from vmctl.model.migration import (
    THROTTLE_HELD,
    ConvergencePolicy,
    MigrationOptions,
    MigrationProgress,
    Skipped,
    Step,
)
from vmctl.ops.convergence import (
    Action,
    Convergence,
    Forecast,
    GiveUp,
    Plan,
    ReleaseThrottle,
    SetDowntime,
    StartPostcopy,
    compression_cache,
    plan,
)
from vmctl.qmp import Monitor
from vmctl.testing import FakeQEMU

MiB = 1 << 20
RAM = 256 * MiB
BW = 16 * MiB  # bytes per second: a pass of 16 MiB needs 1000 ms of downtime
NOTHING = Plan(
    throttle=False,
    postcopy=False,
    skipped=(
        Skipped(step=Step.THROTTLE, reason="not allowed (allow_throttle=False)"),
        Skipped(step=Step.POSTCOPY, reason="needs a target VM: no capabilities to set"),
        Skipped(step=Step.DIRTY_LIMIT, reason="needs KVM's dirty ring"),
    ),
)
POSTCOPY = Plan(throttle=False, postcopy=True, skipped=())
THROTTLE = Plan(throttle=True, postcopy=False, skipped=())


def sample(
    passes: int, transferred: int, remaining: int, *, bandwidth: int = BW, dirty_rate: int = 0, status: str = "active"
) -> MigrationProgress:
    return MigrationProgress(
        status=status,
        total_time_ms=0,
        transferred=transferred,
        remaining=remaining,
        total=RAM,
        dirty_rate=dirty_rate,
        bandwidth=bandwidth,
        mbps=bandwidth * 8 / 1e6,
        passes=passes,
        throttle_percent=0,
        expected_downtime_ms=0,
    )


def pass_starts(
    lefts: Sequence[int], *, dirty_rate: int = 0, status: str = "active"
) -> Iterator[tuple[float, MigrationProgress]]:
    """Pass 1 at t=0 sends the whole RAM; pass k+1 starts with ``lefts[k-1]`` left, once the link
    (BW) has sent pass k's memory."""
    now, sent = 0.0, 0
    for passes, left in enumerate([RAM, *lefts], start=1):
        yield now, sample(passes, sent, left, dirty_rate=dirty_rate, status=status)
        now += left / BW
        sent += left


def convergence(plan: Plan = NOTHING, *, downtime_limit_ms: int = 300, **policy: Any) -> Convergence:
    return Convergence(
        ConvergencePolicy(**{"finish_within": 60.0, **policy}), plan, started=0.0, downtime_limit_ms=downtime_limit_ms
    )


def decisions(conv: Convergence, samples: Iterator[tuple[float, MigrationProgress]]) -> list[Action | None]:
    return [conv.decide(progress, now) for now, progress in samples]


def test_an_idle_guest_whose_second_pass_fits_the_downtime_limit_gets_no_action() -> None:
    conv = convergence(THROTTLE)
    assert decisions(conv, pass_starts([2 * MiB, 1 * MiB], dirty_rate=MiB)) == [None, None, None]
    assert conv.escalations == []


def test_a_working_set_needing_1000ms_gets_a_downtime_above_it_up_to_max_and_its_figures_recorded() -> None:
    conv = convergence(POSTCOPY, max_downtime_ms=2000)
    actions = decisions(conv, pass_starts([16 * MiB] * 4, dirty_rate=BW))
    assert actions[0] is None and actions[2:] == [None, None, None]
    action = actions[1]
    assert isinstance(action, SetDowntime)
    assert 1000 < action.limit_ms <= 2000
    [escalation] = conv.escalations
    assert escalation.step is Step.DOWNTIME
    assert (escalation.remaining, escalation.bandwidth, escalation.needed_downtime_ms) == (16 * MiB, BW, 1000)
    assert escalation.passes == 2 and escalation.at_s == 16.0


def test_a_working_set_above_max_downtime_starts_postcopy_once_and_nothing_after_even_past_the_deadline() -> None:
    conv = convergence(POSTCOPY, max_downtime_ms=300, finish_within=30.0)
    actions = decisions(conv, pass_starts([16 * MiB] * 5, dirty_rate=BW))
    assert actions == [None, StartPostcopy(), None, None, None, None]
    assert [e.step for e in conv.escalations] == [Step.POSTCOPY]
    assert conv.decide(sample(7, RAM * 2, 8 * MiB, status="active"), 100.0) is None
    assert conv.decide(sample(8, RAM * 2, 4 * MiB, status="postcopy-active"), 200.0) is None
    assert len(conv.escalations) == 1


def test_without_postcopy_the_throttle_is_released_once_up_to_the_policys_max_throttle() -> None:
    conv = convergence(THROTTLE, max_downtime_ms=300, max_throttle=70)
    actions = decisions(conv, pass_starts([16 * MiB] * 8, dirty_rate=BW))
    released = [a for a in actions if a is not None]
    assert len(released) == 1 and actions[1] is released[0]
    action = released[0]
    assert isinstance(action, ReleaseThrottle)
    assert action.parameters["max-cpu-throttle"] == 70
    assert [e.step for e in conv.escalations] == [Step.THROTTLE]


def test_with_no_step_possible_nothing_until_finish_within_then_one_give_up_naming_figures_and_reasons() -> None:
    conv = convergence(NOTHING, max_downtime_ms=300, finish_within=30.0)
    starts = [(now, progress) for now, progress in pass_starts([16 * MiB] * 20, dirty_rate=BW) if now < 30.0]
    assert decisions(conv, iter(starts)) == [None] * len(starts)
    passes = starts[-1][1].passes
    assert conv.decide(sample(passes, 400 * MiB, 8 * MiB, dirty_rate=BW), 29.9) is None
    give_up = conv.decide(sample(passes, 400 * MiB, 8 * MiB, dirty_rate=BW), 30.0)
    assert isinstance(give_up, GiveUp)
    message = give_up.message
    assert "16.8 MB were left" in message and "dirtied 16.8 MB/s" in message and "carried 16.8 MB/s" in message
    assert "needs 1000 ms of downtime" in message and "max_downtime_ms is 300" in message
    assert "throttle: not allowed (allow_throttle=False)" in message and "postcopy: needs a target VM" in message
    assert "dirty ring" not in message
    assert conv.decide(sample(passes + 1, 420 * MiB, 16 * MiB, dirty_rate=BW), 31.0) is None
    assert conv.escalations == []


def test_a_guest_whose_memory_left_halves_at_each_pass_is_left_alone() -> None:
    conv = convergence(POSTCOPY, finish_within=120.0)
    assert decisions(conv, pass_starts([128 * MiB >> k for k in range(6)])) == [None] * 7
    assert conv.escalations == []


def test_no_decision_before_the_first_pass_has_ended() -> None:
    conv = convergence(POSTCOPY, finish_within=30.0)
    assert conv.decide(sample(0, 0, RAM, bandwidth=0, status="setup"), 0.0) is None
    for now in (1.0, 10.0, 29.0):  # a 1 MiB/s link: pass 1 takes 256 s
        assert conv.decide(sample(1, int(now * MiB), RAM - int(now * MiB), bandwidth=MiB), now) is None
    assert isinstance(conv.decide(sample(1, 30 * MiB, RAM - 30 * MiB, bandwidth=MiB), 30.0), GiveUp)


def test_no_decision_on_pre_switchover_but_give_up_at_the_deadline() -> None:
    conv = convergence(POSTCOPY, finish_within=30.0)
    starts = [(t, p) for t, p in pass_starts([16 * MiB] * 20, dirty_rate=BW, status="pre-switchover") if t < 30]
    assert decisions(conv, iter(starts)) == [None] * len(starts)
    assert isinstance(conv.decide(sample(20, 500 * MiB, 16 * MiB, status="pre-switchover"), 30.0), GiveUp)
    assert conv.escalations == []


@pytest.mark.parametrize("status", ["device", "completed", "postcopy-active"])
def test_no_give_up_once_past_the_point_a_cancel_could_undo(status: str) -> None:
    conv = convergence(NOTHING, finish_within=30.0)
    assert conv.decide(sample(20, 500 * MiB, 0, status=status), 31.0) is None


def test_eta_is_none_while_the_bandwidth_is_unknown_then_remaining_over_bandwidth_in_the_first_pass() -> None:
    forecast = Forecast()
    first = sample(1, 0, RAM, bandwidth=0)
    forecast.observe(first, 0.0)
    assert forecast.eta_s(first) is None
    later = sample(1, 32 * MiB, RAM - 32 * MiB, bandwidth=0)  # the bandwidth, from what was sent in 2 s
    forecast.observe(later, 2.0)
    assert forecast.bandwidth == BW
    assert forecast.eta_s(later) == pytest.approx(14.0)


def test_eta_is_none_when_the_memory_left_does_not_shrink() -> None:
    forecast = Forecast(downtime_limit_ms=300)
    for now, progress in pass_starts([16 * MiB] * 3, dirty_rate=BW):
        forecast.observe(progress, now)
    assert forecast.eta_s(progress) is None


def test_eta_is_finite_when_converging() -> None:
    forecast = Forecast(downtime_limit_ms=300)
    for now, progress in pass_starts([128 * MiB, 64 * MiB]):  # at 64 MiB: 4 + 2 + 1 + 0.5 s of passes
        forecast.observe(progress, now)
    eta = forecast.eta_s(progress)
    assert eta is not None and eta == pytest.approx(7.5)


# Polling began after pass 1 ended (a small guest, a fast link, wait() called late) and QEMU's
# dirty-pages-rate is still 0: Forecast.shrink is 0.0 and precopy_time takes math.log(0.0).
PAST_PASS_1 = sample(2, 300 * MiB, 64 * MiB, dirty_rate=0)


def test_a_first_sample_past_pass_1_with_no_dirty_rate_yet_gives_an_eta_without_raising() -> None:
    forecast = Forecast(downtime_limit_ms=300)  # every migration's progress() asks it, policy or not
    forecast.observe(PAST_PASS_1, 5.0)
    eta = forecast.eta_s(PAST_PASS_1)  # ValueError: math domain error
    assert eta is None or math.isfinite(eta)


def test_a_first_sample_past_pass_1_with_no_dirty_rate_yet_is_decided_on_without_raising() -> None:
    conv = convergence(THROTTLE, max_downtime_ms=2000)
    action = conv.decide(PAST_PASS_1, 5.0)  # ValueError: math domain error
    assert action is None or isinstance(action, SetDowntime | ReleaseThrottle)


@pytest.mark.parametrize(
    "bad",
    [
        {"finish_within": 0},
        {"finish_within": -1.5},
        {"finish_within": math.nan},
        {"finish_within": True},
        {"finish_within": "60"},
        {"max_downtime_ms": 0},
        {"max_downtime_ms": 2_000_001},
        {"max_downtime_ms": True},
        {"max_downtime_ms": 300.0},
        {"max_throttle": 0},
        {"max_throttle": 100},
        {"max_throttle": False},
        {"allow_throttle": 1},
        {"allow_postcopy": "yes"},
        {"allow_postcopy": None},
        {"allow_compression": 0},
    ],
)
def test_convergence_policy_rejects_with_invalid_argument(bad: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument, match=next(iter(bad))):
        ConvergencePolicy(**{"finish_within": 60.0, **bad})


def test_convergence_policy_takes_the_limits_themselves() -> None:
    policy = ConvergencePolicy(finish_within=0.5, max_downtime_ms=2_000_000, max_throttle=99, allow_postcopy=True)
    assert (policy.max_downtime_ms, policy.max_throttle, policy.allow_throttle) == (2_000_000, 99, True)


def test_progress_from_qmp_reads_query_migrate() -> None:
    progress = MigrationProgress.from_qmp(
        {
            "status": "active",
            "total-time": 1234,
            "expected-downtime": 250,
            "cpu-throttle-percentage": 30,
            "ram": {
                "transferred": 5000,
                "remaining": 7000,
                "total": RAM,
                "dirty-pages-rate": 100,
                "page-size": 4096,
                "mbps": 800.0,
                "dirty-sync-count": 3,
            },
        }
    )
    assert (progress.status, progress.total_time_ms, progress.expected_downtime_ms) == ("active", 1234, 250)
    assert (progress.transferred, progress.remaining, progress.total, progress.passes) == (5000, 7000, RAM, 3)
    assert (progress.dirty_rate, progress.bandwidth, progress.mbps) == (100 * 4096, 10**8, 800.0)
    assert progress.throttle_percent == 30
    empty = MigrationProgress.from_qmp({})
    assert (empty.status, empty.passes, empty.bandwidth, empty.dirty_rate) == ("none", 0, 0, 0)
    assert (empty.compressed_pages, empty.compression_cache_miss_rate) == (0, 0.0)


def test_progress_from_qmp_reads_the_xbzrle_cache_figures() -> None:
    progress = MigrationProgress.from_qmp(
        {"status": "active", "xbzrle-cache": {"pages": 4321, "cache-miss-rate": 0.25, "cache-size": 64 * MiB}}
    )
    assert (progress.compressed_pages, progress.compression_cache_miss_rate) == (4321, 0.25)


def test_xbzrle_options_set_the_capability_and_the_cache_on_the_source_only() -> None:
    options = MigrationOptions(xbzrle=True, xbzrle_cache=64 * MiB)
    assert options.capabilities(source=True)["xbzrle"] is True
    assert options.parameters(source=True)["xbzrle-cache-size"] == 64 * MiB
    assert "xbzrle" not in options.capabilities(source=False)
    assert "xbzrle-cache-size" not in options.parameters(source=False)
    assert "xbzrle-cache-size" not in MigrationOptions().parameters(source=True)
    with pytest.raises(InvalidArgument, match="xbzrle_cache"):
        MigrationOptions(xbzrle=True, xbzrle_cache=0)


@pytest.mark.parametrize(
    ("memory", "cache"),
    [(256 * MiB, 64 * MiB), (32 * MiB, 16 * MiB), (1000 * MiB, 128 * MiB), (3 << 30, 256 * MiB), (64 << 30, 256 * MiB)],
)
def test_compression_cache_is_a_quarter_of_the_guest_as_a_power_of_two_within_16_to_256_mib(
    memory: int, cache: int
) -> None:
    assert compression_cache(memory) == cache


def test_plan_turns_compression_on_with_a_cache_for_the_guests_ram(monitor: Monitor, fake: FakeQEMU) -> None:
    answer(fake, ["xbzrle", "auto-converge"], kvm=True, memory=512 * MiB)
    policy = ConvergencePolicy(finish_within=60.0)
    steps = plan(monitor, policy=policy, target=monitor, postcopy_refusal=None, multifd=False, copy_storage=False)
    assert (steps.compression_cache, steps.memory) == (128 * MiB, 512 * MiB)
    assert Step.COMPRESSION not in [s.step for s in steps.skipped]


@pytest.mark.parametrize(
    ("allow", "capabilities", "multifd", "kvm", "reason"),
    [
        (False, ["xbzrle"], False, True, "allow_compression=False"),
        (True, [], False, True, "has no xbzrle"),
        (True, ["xbzrle"], True, True, "not with multifd"),
        (True, ["xbzrle"], False, False, "QEMU 7.2.0 under TCG: XBZRLE's page deltas break"),
    ],
)
def test_plan_skips_compression_when_not_allowed_absent_with_multifd_or_on_7_2_under_tcg(
    monitor: Monitor, fake: FakeQEMU, allow: bool, capabilities: list[str], multifd: bool, kvm: bool, reason: str
) -> None:
    answer(fake, capabilities, kvm=kvm)
    policy = ConvergencePolicy(finish_within=60.0, allow_compression=allow)
    steps = plan(monitor, policy=policy, target=monitor, postcopy_refusal=None, multifd=multifd, copy_storage=False)
    assert steps.compression_cache is None
    assert reason in {s.step: s.reason for s in steps.skipped}[Step.COMPRESSION]


def test_compression_is_the_first_escalation_taken_at_the_start_with_its_cache() -> None:
    steps = Plan(throttle=False, postcopy=False, skipped=(), compression_cache=64 * MiB, memory=RAM)
    conv = Convergence(ConvergencePolicy(finish_within=60.0), steps, started=0.0, downtime_limit_ms=300)
    [escalation] = conv.escalations
    assert (escalation.step, escalation.at_s, escalation.passes, escalation.remaining) == (Step.COMPRESSION, 0, 0, RAM)
    assert "64 MiB cache" in escalation.change and "only when a migration starts" in escalation.reason


def test_throttle_held_turns_auto_converge_on_at_1_percent_on_the_source_only() -> None:
    held = MigrationOptions(throttle_held=True)
    assert held.capabilities(source=True)["auto-converge"] is True
    assert held.parameters(source=True).items() >= THROTTLE_HELD.items()
    assert "auto-converge" not in held.capabilities(source=False)
    assert not held.parameters(source=False).keys() & THROTTLE_HELD.keys()
    assert MigrationOptions().capabilities(source=True)["auto-converge"] is False
    assert not MigrationOptions().parameters(source=True).keys() & THROTTLE_HELD.keys()


def answer(fake: FakeQEMU, capabilities: Sequence[str], *, kvm: bool, memory: int = RAM) -> None:
    fake.on("query-migrate-capabilities", returns=[{"capability": c, "state": False} for c in capabilities])
    fake.on("query-kvm", returns={"enabled": kvm, "present": kvm})
    fake.on("query-memory-size-summary", returns={"base-memory": memory, "plugged-memory": 0})


def test_plan_on_kvm_with_every_capability_may_throttle_and_postcopy(monitor: Monitor, fake: FakeQEMU) -> None:
    answer(fake, ["auto-converge", "postcopy-ram", "dirty-limit", "xbzrle"], kvm=True)
    policy = ConvergencePolicy(finish_within=60.0, allow_postcopy=True)
    steps = plan(monitor, policy=policy, target=monitor, postcopy_refusal=None, multifd=False, copy_storage=False)
    assert (steps.throttle, steps.postcopy) == (True, True)
    assert [s.step for s in steps.skipped] == [Step.DIRTY_LIMIT]


def test_plan_under_tcg_on_7_2_refuses_the_throttle_and_postcopy_without_a_target(
    monitor: Monitor, fake: FakeQEMU
) -> None:
    answer(fake, ["auto-converge", "postcopy-ram"], kvm=False)
    policy = ConvergencePolicy(finish_within=60.0, allow_postcopy=True)
    steps = plan(monitor, policy=policy, target=None, postcopy_refusal=None, multifd=False, copy_storage=False)
    assert (steps.throttle, steps.postcopy) == (False, False)
    reasons = {s.step: s.reason for s in steps.skipped}
    assert "under TCG" in reasons[Step.THROTTLE] and "needs a target VM" in reasons[Step.POSTCOPY]
    assert "no dirty-limit" in reasons[Step.DIRTY_LIMIT]


samples = st.lists(
    st.tuples(
        st.integers(0, 30_000),  # milliseconds since the last sample
        st.integers(0, 2),  # passes begun since
        st.integers(0, 64 * MiB),  # bytes sent since
        st.integers(0, RAM),  # remaining
        st.sampled_from([0, 1, MiB, BW, 1 << 30]),  # bandwidth
        st.sampled_from([0, 1, MiB, BW, 1 << 30]),  # dirty rate
        st.sampled_from(["setup", "active", "active", "active", "pre-switchover", "device", "postcopy-active"]),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(
    samples,
    st.floats(0.1, 300.0),
    st.integers(1, 5000),
    st.integers(1, 5000),
    st.booleans(),
    st.booleans(),
)
def test_any_plausible_samples_never_raise_and_each_step_is_taken_at_most_once_within_bounds(
    steps: list[tuple[int, int, int, int, int, int, str]],
    finish_within: float,
    max_downtime_ms: int,
    downtime_limit_ms: int,
    throttle: bool,
    postcopy: bool,
) -> None:
    conv = convergence(
        Plan(throttle=throttle, postcopy=postcopy, skipped=()),
        downtime_limit_ms=downtime_limit_ms,
        finish_within=finish_within,
        max_downtime_ms=max_downtime_ms,
    )
    now, passes, sent = 0.0, 0, 0
    actions: list[Action] = []
    for dt, new_passes, dsent, remaining, bandwidth, dirty_rate, status in steps:
        now, passes, sent = now + dt / 1000, passes + new_passes, sent + dsent
        action = conv.decide(
            sample(passes, sent, remaining, bandwidth=bandwidth, dirty_rate=dirty_rate, status=status), now
        )
        if action is not None:
            actions.append(action)
    assert sum(isinstance(a, GiveUp) for a in actions) <= 1
    assert sum(isinstance(a, StartPostcopy) for a in actions) <= 1
    assert sum(isinstance(a, ReleaseThrottle) for a in actions) <= 1
    limits = [a.limit_ms for a in actions if isinstance(a, SetDowntime)]
    assert all(limit <= max_downtime_ms for limit in limits)
    assert all(a < b for a, b in itertools.pairwise(limits))
