"""Migration of a busy guest: raw precopy with QEMU's defaults against vmctl's convergence policy.

    .venv/bin/python bench/convergence.py [--raw-seconds 120] [--qemu PATH ...]

The guest (512 MiB, TCG) copies a 48 MiB file of random bytes over another in tmpfs, in a loop:
it rewrites memory faster than the 32 MiB/s link carries it. For each QEMU, one run each of:
- raw QMP: capabilities ``events``, ``max-bandwidth``, ``migrate``, then only watching (QEMU's
  defaults: 300 ms downtime limit, no throttle), for ``--raw-seconds``, then ``migrate_cancel``;
- vmctl ``finish_within=60, max_downtime_ms=500`` (throttling where it is safe);
- vmctl ``finish_within=60, max_downtime_ms=3000, allow_throttle=False`` (the downtime step);
- vmctl ``finish_within=60, allow_postcopy=True``.
Each reports total time, downtime, bytes sent, the escalations, and whether the guest's data came
through (the checksums of the file and of its last copy, on the side that runs the guest). It
draws remaining memory, dirty rate and throttle over time to ``bench/convergence.png``
(matplotlib: ``pip install -e '.[bench]'``). Postcopy as QEMU's user needs userfaultfd for it
(``vm.unprivileged_userfaultfd=1`` on QEMU 7.2); without, the policy skips postcopy and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from rawqmp import RawQMP

from vmctl import VM, VMSpec
from vmctl.errors import MigrationError
from vmctl.model import MigrationProgress
from vmctl.testing import READY_MARKER, GuestShell, TestGuest
from vmctl.testing.workload import MemoryDirtier, WorkloadCorrupted, panic_lines

MIB = 1024 * 1024
REPO = Path(__file__).resolve().parent.parent
Sample = tuple[float, float, float, float]  # seconds, remaining MiB, dirty MiB/s, throttle %


def raw_monitor_args(run_dir: Path) -> tuple[str, ...]:
    return ("-chardev", f"socket,id=raw,path={run_dir}/raw.sock,server=on,wait=off", "-mon", "chardev=raw,mode=control")


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.guest = TestGuest.ensure()
        self.count = 0

    def busy_pair(self, qemu: str, *, in_place: bool = False) -> tuple[VM, VM, MemoryDirtier]:
        self.count += 1
        src_dir, dst_dir = self.work / f"src{self.count}", self.work / f"dst{self.count}"
        spec = VMSpec(
            name=f"busy{self.count}",
            kernel=self.guest.kernel,
            initrd=self.guest.initrd,
            append=self.guest.append,
            accel="tcg",
            memory_mib=self.args.memory,
            shell_serial=True,
            extra_args=raw_monitor_args(src_dir),
        )
        source = VM.launch(spec, run_dir=src_dir, qemu_binary=qemu)
        source.console.wait_for(READY_MARKER, timeout=120)
        with GuestShell(source) as shell:
            dirtier = MemoryDirtier.start(shell, size_mib=self.args.file_mib, in_place=in_place)
        target_spec = source.migration_target_spec(name=f"dst{self.count}")
        target_spec = VMSpec.from_dict({**target_spec.to_dict(), "extra_args": raw_monitor_args(dst_dir)})
        target = VM.launch_incoming(target_spec, run_dir=dst_dir, inventory=source.inventory, qemu_binary=qemu)
        return source, target, dirtier

    def raw(self, qemu: str) -> dict[str, Any]:
        source, target, dirtier = self.busy_pair(qemu)
        samples: list[Sample] = []
        try:
            src, dst = RawQMP(str(source.run_dir / "raw.sock")), RawQMP(str(target.run_dir / "raw.sock"))
            for monitor in (src, dst):
                monitor.call("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
            src.call("migrate-set-parameters", {"max-bandwidth": self.args.link_mib * MIB})
            uri = f"unix:{target.run_dir}/migrate.sock"
            dst.call("migrate-incoming", {"uri": uri})
            started = time.monotonic()
            src.call("migrate", {"uri": uri})
            info: dict[str, Any] = {}
            while time.monotonic() - started < self.args.raw_seconds:
                info = src.call("query-migrate")
                samples.append(sample(time.monotonic() - started, MigrationProgress.from_qmp(info)))
                if info["status"] in ("completed", "failed"):
                    break
                time.sleep(0.5)
            status = info["status"]
            total = time.monotonic() - started
            if status != "completed":
                src.call("migrate_cancel")
            src.close()
            dst.close()
            side = target if status == "completed" else source
            intact = check(side, dirtier)
            ram = info.get("ram", {})
            return {
                "name": "raw QMP, QEMU defaults",
                "outcome": "completed" if status == "completed" else f"still {status} at {total:.0f} s, cancelled",
                "total_s": total,
                "downtime_ms": info.get("downtime"),
                "sent_mib": ram.get("transferred", 0) / MIB,
                "escalations": [],
                "intact": intact,
                "samples": samples,
            }
        finally:
            reap(source, target)

    def vmctl(self, qemu: str, name: str, **policy: Any) -> dict[str, Any]:
        source, target, dirtier = self.busy_pair(qemu)
        samples: list[Sample] = []
        started = time.monotonic()
        try:
            migration = source.migrate(target, bandwidth=self.args.link_mib * MIB, **policy)

            def on_progress(progress: MigrationProgress) -> None:
                samples.append(sample(time.monotonic() - started, progress))

            try:
                result = migration.wait(120, on_progress=on_progress, progress_interval=0.5)
                outcome = "completed" + (" (postcopy)" if result.postcopy else "")
                downtime, sent = result.downtime_ms, result.transferred / MIB
                escalations, skipped = result.escalations, result.skipped
                side = target
            except MigrationError as exc:
                outcome = f"{exc.status}: {str(exc)[:160]}..."
                downtime, sent, escalations = None, None, migration.escalations
                skipped = ()
                side = source
            total = time.monotonic() - started
            return {
                "name": name,
                "outcome": outcome,
                "total_s": total,
                "downtime_ms": downtime,
                "sent_mib": sent,
                "escalations": [(e.at_s, e.step.value, e.change) for e in escalations],
                "skipped": [(s.step.value, s.reason) for s in skipped],
                "intact": check(side, dirtier),
                "samples": samples,
            }
        finally:
            reap(source, target)


def sample(seconds: float, progress: MigrationProgress) -> Sample:
    return (seconds, progress.remaining / MIB, progress.dirty_rate / MIB, float(progress.throttle_percent))


def check(vm: VM, dirtier: MemoryDirtier) -> str:
    try:
        with GuestShell(vm) as shell:
            copies = dirtier.stop_and_check(shell)
    except WorkloadCorrupted as exc:
        return f"CORRUPTED: {exc}"
    except Exception as exc:  # a guest that does not answer is the finding
        return f"guest does not answer: {exc}"
    panics = panic_lines(vm.console.history)
    return f"intact ({copies} copies)" if not panics else f"PANIC: {panics[0]}"


def reap(*vms: VM) -> None:
    for vm in vms:
        if not vm.has_exited:
            vm.kill()
        vm.close()


def draw(runs: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(runs), 1, figsize=(11, 4.2 * len(runs)), squeeze=False)
    for row, (qemu, results) in enumerate(runs.items()):
        ax = axes[row][0]
        throttle_ax = ax.twinx()
        for index, result in enumerate(results):
            colour = f"C{index}"
            t = [s[0] for s in result["samples"]]
            ax.plot(t, [s[1] for s in result["samples"]], color=colour, label=f"{result['name']}: remaining")
            ax.plot(t, [s[2] for s in result["samples"]], color=colour, linestyle=":", alpha=0.7)
            if any(s[3] for s in result["samples"]):
                throttle_ax.plot(t, [s[3] for s in result["samples"]], color=colour, linestyle="--", alpha=0.6)
        ax.set_yscale("symlog", linthresh=10)
        ax.set_ylim(0, 600)
        for index, result in enumerate(results):
            for at, step, _change in result["escalations"]:
                ax.axvline(at, color=f"C{index}", linestyle="-.", alpha=0.6)
                ax.annotate(f" {step}", (at, 300 / (1 + index)), color=f"C{index}", fontsize=8)
        ax.set_title(f"QEMU {qemu}: busy 512 MiB guest, 32 MiB/s link (solid: MiB left, dotted: dirty MiB/s)")
        ax.set_xlabel("seconds since migrate")
        ax.set_ylabel("MiB / MiB/s")
        throttle_ax.set_ylabel("CPU throttle % (dashed)")
        throttle_ax.set_ylim(0, 100)
        ax.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw-seconds", type=float, default=120)
    parser.add_argument("--memory", type=int, default=512)
    parser.add_argument("--file-mib", type=int, default=48)
    parser.add_argument("--link-mib", type=int, default=32)
    parser.add_argument("--qemu", action="append")
    parser.add_argument("--png", type=Path, default=REPO / "bench" / "convergence.png")
    parser.add_argument("--draw-only", action="store_true", help="draw the figures of the last run again")
    args = parser.parse_args()
    figures = args.png.with_suffix(".json")  # the samples behind the picture
    if args.draw_only:
        draw(json.loads(figures.read_text()), args.png)
        return 0
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    qemus = args.qemu or [
        q for q in (shutil.which("qemu-system-x86_64"), str(REPO / ".cache/qemu-10.0/qemu-system-x86_64")) if q
    ]
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    bench = Bench(args, work)
    runs: dict[str, list[dict[str, Any]]] = {}
    for qemu in qemus:
        version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout.split()[3]
        results = [
            bench.raw(qemu),
            bench.vmctl(qemu, "vmctl, max downtime 500 ms", finish_within=60, max_downtime_ms=500),
            bench.vmctl(qemu, "vmctl, max downtime 3 s", finish_within=60, max_downtime_ms=3000, allow_throttle=False),
            bench.vmctl(qemu, "vmctl, postcopy allowed", finish_within=60, allow_postcopy=True),
        ]
        runs[str(version)] = results
        print(f"\n{qemu}")
        print(f"{'run':30} {'total s':>8} {'downtime ms':>12} {'sent MiB':>9}  data / outcome / escalations")
        for r in results:
            downtime = "-" if r["downtime_ms"] is None else str(r["downtime_ms"])
            sent = "-" if r["sent_mib"] is None else f"{r['sent_mib']:.0f}"
            print(f"{r['name']:30} {r['total_s']:8.1f} {downtime:>12} {sent:>9}  {r['intact']}; {r['outcome']}")
            for at, step, change in r["escalations"]:
                print(f"{'':30}   at {at:5.1f} s: {step}: {change}")
            for step, reason in r.get("skipped", []):
                print(f"{'':30}   skipped {step}: {reason}")
    figures.write_text(json.dumps(runs))
    try:
        draw(runs, args.png)
        print(f"\ndrawn: {args.png}")
    except ImportError:
        print("\nmatplotlib is not installed (pip install -e '.[bench]'): no picture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
