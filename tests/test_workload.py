"""The busy-guest workload's console check: a kernel that broke is found in what it printed."""

from __future__ import annotations

from vmctl.testing.workload import panic_lines


def test_panic_lines_finds_a_kernel_panic_and_an_oops_among_boot_messages() -> None:
    console = (
        "[    0.000000] Linux version 6.1.0\n"
        "vmctl-test-guest ready\n"
        "[   12.5] Oops: 0000 [#1] PREEMPT SMP NOPTI\n"
        "[   12.6] Kernel panic - not syncing: Fatal exception in interrupt\n"
    )
    assert panic_lines(console) == [
        "[   12.5] Oops: 0000 [#1] PREEMPT SMP NOPTI",
        "[   12.6] Kernel panic - not syncing: Fatal exception in interrupt",
    ]


def test_panic_lines_is_empty_for_a_clean_boot() -> None:
    assert panic_lines("[    0.000000] Linux version 6.1.0\nvmctl-test-guest ready\n") == []
