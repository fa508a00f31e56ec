"""Disk hotplug + unplug end to end: vmctl against the same QMP commands by hand on a raw socket.

    .venv/bin/python bench/hotplug.py [--rounds N]

One booted test guest (TCG); the raw client is on its second QMP monitor (tools.sock); the two take turns,
N rounds each. The raw client does the minimum: add-fd (SCM_RIGHTS), blockdev-add x2, device_add,
then device_del, wait for DEVICE_DELETED, blockdev-del x2, remove-fd. vmctl adds its checks
(duplicate id, device present, nodes and fdsets left) and keeps its state file.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog
from rawqmp import RawQMP

from vmctl import VM, VMSpec
from vmctl.model.names import TOOLS_SOCKET, root_port_id
from vmctl.testing import READY_MARKER, TestGuest


def raw_round(raw: RawQMP, image: str, bus: str) -> float:
    started = time.perf_counter()
    fd = os.open(image, os.O_RDWR | os.O_CLOEXEC)
    fdset = raw.call("add-fd", {"opaque": "raw"}, fds=[fd])["fdset-id"]
    os.close(fd)
    raw.call("blockdev-add", {"driver": "file", "node-name": "r-file", "filename": f"/dev/fdset/{fdset}"})
    raw.call("blockdev-add", {"driver": "qcow2", "node-name": "r-fmt", "file": "r-file"})
    raw.call("device_add", {"driver": "virtio-blk-pci", "id": "r1", "drive": "r-fmt", "bus": bus})
    raw.call("device_del", {"id": "r1"})
    raw.wait_event("DEVICE_DELETED", device="r1")
    raw.call("blockdev-del", {"node-name": "r-fmt"})
    raw.call("blockdev-del", {"node-name": "r-file"})
    raw.call("remove-fd", {"fdset-id": fdset})
    return time.perf_counter() - started


def vmctl_round(vm: VM, image: str) -> float:
    started = time.perf_counter()
    vm.hotplug_disk(image, id="v1")
    vm.unplug_disk("v1")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    guest = TestGuest.ensure()
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    spec = VMSpec(
        name="bench",
        kernel=guest.kernel,
        initrd=guest.initrd,
        append=guest.append,
        accel="tcg",
    )
    image = str(work / "disk.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, "64M"], check=True)
    vm = VM.launch(spec, run_dir=work / "vm")
    try:
        vm.console.wait_for(READY_MARKER, timeout=120)
        raw = RawQMP(str(vm.run_dir / TOOLS_SOCKET))  # the VM's second monitor
        bus = root_port_id(spec.layout().root_ports - 1)  # q35: the last free root port
        vmctl_times, raw_times = [], []
        for _ in range(args.rounds):
            vmctl_times.append(vmctl_round(vm, image))
            raw_times.append(raw_round(raw, image, bus))
        raw.close()
    finally:
        vm.kill()
        vm.close()
    vmctl_median, raw_median = statistics.median(vmctl_times), statistics.median(raw_times)
    print(f"\ndisk hotplug + unplug end to end, {args.rounds} rounds each, one TCG test guest\n")
    print(f"{'client':10} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for name, times in (("vmctl", vmctl_times), ("raw QMP", raw_times)):
        print(f"{name:10} {statistics.median(times) * 1000:10.1f} {min(times) * 1000:8.1f} {max(times) * 1000:8.1f}")
    print(f"\nvmctl overhead over raw QMP: {(vmctl_median - raw_median) * 1000:+.1f} ms per round trip "
          f"({vmctl_median / raw_median:.2f}x)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
