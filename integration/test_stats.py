"""vm.stats() on real QEMU: the counters move with what the guest does.

The NIC's tap is moved into a network namespace of the test's own for the traffic (the only
host the guest reaches), then back into vmctl's, where ``stats()`` reads its counters.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

from integration.conftest import VMFactory, make_image
from vmctl.model import DiskSpec
from vmctl.model.stats import VMStats
from vmctl.testing import GuestShell

HOST_ADDRESS = "10.231.9.1"
GUEST_ADDRESS = "10.231.9.2"
MIB = 1024 * 1024


def test_stats_move_when_the_guest_computes_writes_to_a_disk_and_sends_packets(vms: VMFactory, netns: str) -> None:
    disk = DiskSpec(id="data", path=make_image(vms.tmp_path / "data.qcow2", "qcow2"))
    vm = vms.launch(vms.spec("stats", cpus=2, balloon=True, disks=[disk]))
    nic = vm.hotplug_nic(id="net1")
    assert nic.tap is not None
    before = vm.stats()
    assert [v.index for v in before.vcpus] == [0, 1]
    assert all(v.thread_id > 0 for v in before.vcpus) and before.vcpus[0].thread_id != before.vcpus[1].thread_id
    assert [d.id for d in before.disks] == ["data"]
    assert [n.id for n in before.nics] == ["net1"]
    assert before.memory.balloon_bytes == 256 * MIB
    assert 0 < before.memory.rss_bytes < 2048 * MIB

    subprocess.run(["ip", "link", "set", nic.tap, "netns", netns], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{HOST_ADDRESS}/24", "dev", nic.tap], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", nic.tap, "up"], check=True)
    with GuestShell(vm) as shell:
        device = shell.block_device("data")
        shell.run(f"dd if=/dev/zero of=/dev/{device} bs=1M count=4 oflag=direct", check=True)
        name = shell.poll(f"grep -l '^{nic.mac}$' /sys/class/net/*/address | cut -d/ -f5")
        shell.run(f"ip addr add {GUEST_ADDRESS}/24 dev {name} && ip link set {name} up", check=True)
        assert shell.run(f"ping -c 5 -i 0.2 -W 3 {HOST_ADDRESS}", timeout=30).ok
        shell.run("i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done", timeout=60, check=True)  # CPU
    subprocess.run(["ip", "-n", netns, "link", "set", nic.tap, "netns", "1"], check=True)  # back to vmctl's
    after = vm.stats()

    [written_before], [written] = before.disks, after.disks
    assert written.write_bytes - written_before.write_bytes >= 4 * MIB
    assert written.write_ops > written_before.write_ops and written.write_ns > written_before.write_ns
    [traffic] = after.nics
    assert traffic.tx_packets - before.nics[0].tx_packets >= 5  # the echo requests (and ARP)
    assert traffic.rx_packets - before.nics[0].rx_packets >= 5  # the replies
    assert traffic.rx_bytes > before.nics[0].rx_bytes
    assert sum(v.cpu_ns for v in after.vcpus) > sum(v.cpu_ns for v in before.vcpus)
    assert after.qemu_cpu_ns > before.qemu_cpu_ns
    rates = after.rates(before)
    assert rates.write_bytes > 0 and rates.cpu > 0 and rates.rx_bytes > 0


def test_the_guests_own_memory_figures_come_from_the_balloon_driver(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("stats-mem", balloon=True))
    stats = _guest_reported(vm.stats, timeout=30)
    assert stats.memory.guest_total_bytes is not None and stats.memory.guest_free_bytes is not None
    assert 150 * MIB < stats.memory.guest_total_bytes <= 256 * MIB
    assert 0 < stats.memory.guest_free_bytes < stats.memory.guest_total_bytes


def _guest_reported(take: Callable[[], VMStats], timeout: float) -> VMStats:
    deadline = time.monotonic() + timeout
    while True:
        stats = take()
        if stats.memory.guest_total_bytes is not None or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)  # a poll: the guest's first report comes when its driver is up


def test_a_vm_without_balloon_disks_or_nics_reports_its_cpu_and_memory(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("stats-bare"), wait_ready=False)
    stats = vm.stats()
    assert (stats.disks, stats.nics, stats.memory.balloon_bytes) == ((), (), None)
    assert len(stats.vcpus) == 1 and stats.memory.rss_bytes > 0
