"""Soak: many hotplug/unplug, snapshot/commit and migration cycles on one guest; nothing may grow.

    .venv/bin/python bench/soak.py [--warm-up N] [--disk-cycles N] [--nic-cycles N] [--snapshots N] [--migrations N]

One booted test guest (TCG, q35). Reports, at the start and at the end, the vmctl process's RSS
and open fds and QEMU's block nodes, fdsets, devices and objects (the QEMU that runs at the end
is another one after migrations: it must hold the same as the first did, except that it opened
its images by path, from its command line, where the first had fdsets for hotplugged ones).
The start is measured after ``--warm-up`` disk cycles: by then the monitor's event history (the
last 1,000 events, about 0.5 KiB each) is full, so that what follows shows growth, not filling.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import structlog

from vmctl import VM, VMSpec
from vmctl.testing import READY_MARKER, GuestShell, TestGuest


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(vm: VM) -> dict[str, int]:
    gc.collect()
    qmp = vm.qmp
    return {
        "vmctl RSS (KiB)": rss_kib(),
        "vmctl open fds": len(os.listdir("/proc/self/fd")),
        "threads": len(os.listdir("/proc/self/task")),
        "QEMU block nodes": len(qmp.execute("query-named-block-nodes", {"flat": True})),
        "QEMU fdsets": len(qmp.execute("query-fdsets")),
        "QEMU devices": len(qmp.execute("qom-list", {"path": "/machine/peripheral"})),
        "QEMU objects": len(qmp.execute("qom-list", {"path": "/objects"})),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-up", type=int, default=600)
    parser.add_argument("--disk-cycles", type=int, default=1000)
    parser.add_argument("--nic-cycles", type=int, default=1000)
    parser.add_argument("--snapshots", type=int, default=200)
    parser.add_argument("--migrations", type=int, default=50)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    guest = TestGuest.ensure()
    work = Path(tempfile.mkdtemp(prefix="vmctl-soak-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    spec = VMSpec(
        name="soak", kernel=guest.kernel, initrd=guest.initrd, append=guest.append, accel="tcg", shell_serial=True
    )
    vm = VM.launch(spec, run_dir=work / "vm0")
    timings: dict[str, float] = {}
    try:
        vm.console.wait_for(READY_MARKER, timeout=120)
        disk = work / "disk.qcow2"
        base = work / "snap-base.qcow2"
        for image in (disk, base):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
        vm.hotplug_disk(base, id="snap")  # the disk the snapshots are taken of (in both measures)
        warm = measure(vm)
        for _ in range(args.warm_up):
            vm.hotplug_disk(disk, id="soak1")
            vm.unplug_disk("soak1")
        start = measure(vm)

        started = time.perf_counter()
        for _ in range(args.disk_cycles):
            vm.hotplug_disk(disk, id="soak1")
            vm.unplug_disk("soak1")
        timings["disk hotplug+unplug"] = time.perf_counter() - started

        started = time.perf_counter()
        for _ in range(args.nic_cycles):
            vm.hotplug_nic(id="soakn1")
            vm.unplug_nic("soakn1")
        timings["NIC hotplug+unplug"] = time.perf_counter() - started

        started = time.perf_counter()
        overlay = work / "snap-overlay.qcow2"
        for _ in range(args.snapshots):
            vm.snapshot_disks(["snap"], overlays={"snap": overlay})
            vm.commit_disk("snap")
            overlay.unlink()
        timings["snapshot+commit"] = time.perf_counter() - started
        middle = measure(vm)  # the first QEMU, before the migrations

        started = time.perf_counter()
        for hop in range(1, args.migrations + 1):
            target = VM.launch_incoming(
                vm.migration_target_spec(), run_dir=work / f"vm{hop % 2}-{hop}", inventory=vm.inventory
            )
            vm.migrate(target).wait(120)
            vm.close()
            shutil.rmtree(vm.run_dir, ignore_errors=True)
            vm = target
        timings["migration"] = time.perf_counter() - started
        with GuestShell(vm) as shell:
            alive = shell.run("echo alive").output.strip()
        end = measure(vm)
    finally:
        if not vm.has_exited:
            vm.kill()
        vm.close()
        shutil.rmtree(work, ignore_errors=True)

    counts = {
        "disk hotplug+unplug": args.disk_cycles,
        "NIC hotplug+unplug": args.nic_cycles,
        "snapshot+commit": args.snapshots,
        "migration": args.migrations,
    }
    print(f"guest after the soak: {alive}")
    print(f"{'cycles':<22} {'count':>6} {'total s':>9} {'per cycle ms':>13}")
    for name, seconds in timings.items():
        count = counts[name]
        print(f"{name:<22} {count:>6} {seconds:>9.1f} {1000 * seconds / max(count, 1):>13.1f}")
    print(f"{'measure':<22} {'booted':>9} {'start':>9} {'pre-migr.':>9} {'end':>9}")
    for key in start:
        print(f"{key:<22} {warm[key]:>9} {start[key]:>9} {middle[key]:>9} {end[key]:>9}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
