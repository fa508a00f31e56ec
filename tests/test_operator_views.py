"""The operator's views without a VM: stats values and rates, the ls table, top's rows."""

from __future__ import annotations

import io
from pathlib import Path

from vmctl.cli.listing import VMRow, duration, run_dirs, table
from vmctl.cli.progress import ProgressBar, line
from vmctl.cli.top import TopRow, render
from vmctl.model.migration import MigrationProgress
from vmctl.model.stats import DiskStats, MemoryStats, NicStats, VMStats


def stats(at: float, *, cpu_ns: int, written: int, received: int) -> VMStats:
    disk = DiskStats(id="d1", read_bytes=0, write_bytes=written, read_ops=0, write_ops=1, flush_ops=0,
                     read_ns=0, write_ns=0, flush_ns=0)  # fmt: skip
    nic = NicStats(id="n1", tap="t1", rx_bytes=received, rx_packets=1, tx_bytes=0, tx_packets=0)
    return VMStats(name="vm1", time=at, monotonic=at, qemu_cpu_ns=cpu_ns, vcpus=(), disks=(disk,), nics=(nic,),
                   memory=MemoryStats(rss_bytes=1 << 20))  # fmt: skip


def test_rates_are_per_second_differences_and_skip_devices_only_one_sample_has() -> None:
    before = stats(10.0, cpu_ns=1_000_000_000, written=0, received=100)
    after = stats(12.0, cpu_ns=2_000_000_000, written=4 << 20, received=2100)
    rates = after.rates(before)
    assert (rates.seconds, rates.cpu, rates.write_bytes, rates.rx_bytes) == (2.0, 0.5, 2 << 20, 1000)
    unplugged = VMStats(**{**{f: getattr(after, f) for f in ("name", "time", "monotonic", "qemu_cpu_ns", "vcpus")},
                          "disks": (), "nics": (), "memory": after.memory})  # fmt: skip
    assert unplugged.rates(before).write_bytes == 0


def test_the_guests_memory_figures_leave_out_what_it_did_not_report() -> None:
    figures = MemoryStats.guest_figures({"stat-total-memory": 256 << 20, "stat-free-memory": -1})
    assert figures == {"guest_total_bytes": 256 << 20, "guest_free_bytes": None, "guest_available_bytes": None}


def test_the_ls_table_aligns_its_columns_and_shows_dashes_for_what_is_unknown() -> None:
    rows = [
        VMRow(
            name="web-1",
            state="running",
            pid=4242,
            vcpus=2,
            memory_mib=2048,
            disks=("root", "data"),
            uptime_s=3725.0,
            run_dir=Path("/r/web-1"),
        ),
        VMRow(
            name="db", state="exited", pid=17, vcpus=1, memory_mib=512, disks=(), uptime_s=None, run_dir=Path("/r/db")
        ),
    ]
    lines = table(rows).splitlines()
    assert lines[0].split() == ["NAME", "STATE", "PID", "VCPUS", "MEMORY", "DISKS", "UPTIME"]
    assert lines[1].split() == ["web-1", "running", "4242", "2", "2048", "MiB", "root,data", "1h02m"]
    assert lines[2].split() == ["db", "exited", "17", "1", "512", "MiB", "-", "-"]
    assert lines[1].index("running") == lines[2].index("exited")  # aligned


def test_durations_read_like_an_operator_writes_them() -> None:
    assert [duration(s) for s in (5, 67, 7260, 200_000)] == ["5s", "1m07s", "2h01m", "2d7h"]


def test_run_dirs_are_found_at_and_below_the_root_but_not_deeper(tmp_path: Path) -> None:
    for where in ("a", "host/b", "x/y/z/too-deep"):
        (tmp_path / where).mkdir(parents=True)
        (tmp_path / where / "vm.json").write_text("{}")
    assert [p.relative_to(tmp_path).as_posix() for p in run_dirs(tmp_path)] == ["a", "host/b"]


def test_top_rows_show_rates_once_there_are_two_samples() -> None:
    before = stats(10.0, cpu_ns=0, written=0, received=0)
    after = stats(11.0, cpu_ns=250_000_000, written=3 << 20, received=2048)
    lines = render([TopRow(name="vm1", state="running", vcpus=2, rss_mib=300, rates=after.rates(before)),
                    TopRow(name="vm2", state="unreachable", vcpus=0, rss_mib=0, rates=None)])  # fmt: skip
    assert lines[0].split() == ["NAME", "STATE", "VCPUS", "CPU%", "RSS", "MiB", "READ/s", "WRITE/s", "RX/s", "TX/s"]
    assert lines[1].split() == ["vm1", "running", "2", "25.0", "300", "0B", "3.0MiB", "2.0KiB", "0B"]
    assert lines[2].split()[:4] == ["vm2", "unreachable", "0", "-"]


def progress(remaining: int, eta: float | None) -> MigrationProgress:
    return MigrationProgress(status="active", total_time_ms=1000, transferred=0, remaining=remaining, total=256 << 20,
                             dirty_rate=0, bandwidth=0, mbps=800.0, passes=2, throttle_percent=0,
                             expected_downtime_ms=0, eta_s=eta)  # fmt: skip


def test_a_migration_progress_line_shows_the_bar_the_ram_across_the_rate_and_the_eta() -> None:
    text = line(progress(192 << 20, 3.4))
    assert text.startswith("[" + "#" * 7 + "." * 23 + "]  25%  64/256 MiB  100.0 MB/s  pass 2  ETA 3s  active")
    assert "ETA -" in line(progress(0, None)) and "100%" in line(progress(0, None))


def test_off_a_terminal_the_progress_bar_writes_a_line_only_every_tenth() -> None:
    out = io.StringIO()
    bar = ProgressBar(out)
    for remaining in (256, 250, 240, 200, 100, 0):
        bar.update(progress(remaining << 20, None))
    assert [row.split("]")[1].split()[0] for row in out.getvalue().splitlines()] == ["0%", "22%", "61%", "100%"]
