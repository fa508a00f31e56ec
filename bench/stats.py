"""The cost of vm.stats(): wall time and this process's CPU per call, against the same queries
on a raw QMP socket (plus the same /proc reads), on one booted test guest.

    .venv/bin/python bench/stats.py [--calls N]

The guest has 2 vCPUs, a disk, a tap NIC and a balloon, so every part of ``stats()`` runs. The
figure that matters for a control plane polling 100 VMs every second is the CPU per call
times 100: the share of one core that polling costs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from rawqmp import RawQMP

from vmctl import VM, VMSpec
from vmctl.model import DiskSpec
from vmctl.model.names import TOOLS_SOCKET
from vmctl.testing import READY_MARKER, TestGuest


def raw_stats(raw: RawQMP, pid: int, tap: str) -> None:
    """The minimum a hand-written poller would do for the same figures."""
    cpus = raw.call("query-cpus-fast")
    raw.call("query-blockstats")
    raw.call("query-balloon")
    raw.call("qom-get", {"path": "/machine/peripheral/vmctl-balloon", "property": "guest-stats"})
    for cpu in cpus:
        with open(f"/proc/{pid}/task/{cpu['thread-id']}/schedstat") as file:
            file.read()
    for name in ("stat", "statm"):
        with open(f"/proc/{pid}/{name}") as file:
            file.read()
    for counter in ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets"):
        with open(f"/sys/class/net/{tap}/statistics/{counter}") as file:
            file.read()


def measure(call: Callable[[], object], calls: int) -> tuple[list[float], float]:
    times = []
    cpu_started = time.process_time()
    for _ in range(calls):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times, (time.process_time() - cpu_started) / calls


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    guest = TestGuest.ensure()
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    image = str(work / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    spec = VMSpec(
        name="bench",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        accel="tcg",
        cpus=2,
        balloon=True,
        disks=[DiskSpec(id="d1", path=image)],
    )
    vm = VM.launch(spec, run_dir=work / "vm")
    try:
        vm.console.wait_for(READY_MARKER, timeout=120)
        nic = vm.hotplug_nic(id="n1")
        tap = nic.tap
        assert tap is not None
        raw = RawQMP(str(vm.run_dir / TOOLS_SOCKET))  # the VM's second monitor
        pid = vm.pid
        vm.stats()
        raw_stats(raw, pid, tap)
        vmctl_times, vmctl_cpu = measure(vm.stats, args.calls)
        raw_times, raw_cpu = measure(lambda: raw_stats(raw, pid, tap), args.calls)
        raw.close()
    finally:
        vm.kill()
        vm.close()
    print(f"\nvm.stats() on a TCG test guest (2 vCPUs, a disk, a NIC, a balloon), {args.calls} calls each\n")
    print(f"{'client':10} {'median ms':>10} {'p99 ms':>8} {'CPU ms/call':>12} {'100 VMs at 1 Hz':>16}")
    for name, times, cpu in (("vmctl", vmctl_times, vmctl_cpu), ("raw QMP", raw_times, raw_cpu)):
        p99 = sorted(times)[int(len(times) * 0.99) - 1]
        print(
            f"{name:10} {statistics.median(times) * 1000:10.2f} {p99 * 1000:8.2f} {cpu * 1000:12.3f}"
            f" {cpu * 100 * 100:15.1f}%"
        )
    print(f"\nvmctl / raw: {statistics.median(vmctl_times) / statistics.median(raw_times):.2f}x wall, "
          f"{vmctl_cpu / raw_cpu:.2f}x CPU")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
