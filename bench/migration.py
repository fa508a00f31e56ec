"""Migration of an idle test guest: driven by vmctl against the same QMP commands on raw sockets.

    .venv/bin/python bench/migration.py [--rounds N]

The guest hops from QEMU to QEMU (unix socket), vmctl and raw taking turns. Each VM has a second
QMP monitor for the raw driver. Timed for both: from setting capabilities until the target runs
(``cont`` answered). The raw driver sets the ``events`` capability on both sides, sends
migrate-incoming and migrate, reads events until ``completed`` on the source and on the target,
then sends ``cont``. vmctl also restores nothing (success) but checks and keeps its state file.
"vmctl, finish_within" adds the convergence policy (an idle guest needs none of its steps: its cost
is a MIGRATION_PASS subscription, two queries and the parameters it sets).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import structlog
from rawqmp import RawQMP

from vmctl import VM, VMSpec
from vmctl.testing import READY_MARKER, TestGuest


def raw_monitor_args(run_dir: Path) -> tuple[str, ...]:
    return ("-chardev", f"socket,id=raw,path={run_dir}/raw.sock,server=on,wait=off", "-mon", "chardev=raw,mode=control")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    guest = TestGuest.ensure()
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    base = VMSpec(name="hop", kernel=guest.kernel, initrd=guest.initrd, append=guest.append, accel="tcg")
    hop = 0

    def spec_for(run_dir: Path) -> VMSpec:
        return VMSpec.from_dict({**base.to_dict(), "extra_args": raw_monitor_args(run_dir)})

    first_dir = work / "hop0"
    vm = VM.launch(spec_for(first_dir), run_dir=first_dir)
    vm.console.wait_for(READY_MARKER, timeout=120)
    times: dict[str, list[float]] = {"vmctl": [], "vmctl, finish_within": [], "raw QMP": []}
    try:
        for _ in range(args.rounds):
            for driver in times:
                hop += 1
                run_dir = work / f"hop{hop}"
                target = VM.launch_incoming(spec_for(run_dir), run_dir=run_dir, inventory=vm.inventory)
                if driver.startswith("vmctl"):
                    finish_within = 60.0 if driver != "vmctl" else None
                    started = time.perf_counter()
                    vm.migrate(target, stop_source=False, finish_within=finish_within).wait(120)
                    times[driver].append(time.perf_counter() - started)
                else:
                    source_raw, target_raw = RawQMP(str(vm.run_dir / "raw.sock")), RawQMP(str(run_dir / "raw.sock"))
                    started = time.perf_counter()
                    for monitor in (source_raw, target_raw):
                        monitor.call(
                            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]}
                        )
                    uri = f"unix:{run_dir}/migrate.sock"
                    target_raw.call("migrate-incoming", {"uri": uri})
                    source_raw.call("migrate", {"uri": uri})
                    source_raw.wait_event("MIGRATION", status="completed")
                    target_raw.wait_event("MIGRATION", status="completed")
                    target_raw.call("cont")
                    times[driver].append(time.perf_counter() - started)
                    source_raw.close()
                    target_raw.close()
                vm.finish_migrated_source()
                vm.close()
                vm = target
    finally:
        vm.kill()
        vm.close()
    print(f"\nmigration of an idle 256 MiB test guest over a unix socket, {args.rounds} rounds each\n")
    print(f"{'driver':22} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, values in times.items():
        median, low, high = statistics.median(values) * 1000, min(values) * 1000, max(values) * 1000
        print(f"{name:22} {median:10.1f} {low:8.1f} {high:8.1f}")
    raw = statistics.median(times["raw QMP"])
    print(f"\nvmctl / raw QMP: {statistics.median(times['vmctl']) / raw:.2f}x (goal <= 1.10)")
    policy_ratio = statistics.median(times["vmctl, finish_within"]) / raw
    print(f"vmctl with the convergence policy / raw QMP: {policy_ratio:.2f}x (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
