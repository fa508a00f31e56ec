"""NIC hotplug on the test guest, with its tap moved into a network namespace the test creates.

The only hosts are the guest and that namespace (joined by the tap); no traffic leaves them.
"""

from __future__ import annotations

import subprocess

import pytest

from integration.conftest import DomainFactory, VMFactory
from vmctl.errors import HotplugError
from vmctl.model import NicSpec
from vmctl.ops import nics as nic_ops
from vmctl.testing import GuestShell

HOST_ADDRESS = "10.231.7.1"
GUEST_ADDRESS = "10.231.7.2"


def guest_interface(shell: GuestShell, mac: str) -> str | None:
    out = shell.run(f"grep -l '^{mac}$' /sys/class/net/*/address 2>/dev/null").output.strip()
    return out.split("/")[4] if out else None


def test_hotplugged_nic_carries_traffic_then_unplugs(domains: DomainFactory, netns: str) -> None:
    vm = domains.launch(domains.spec(cpus=2))
    nic = vm.hotplug_nic(id="net1", queues=2)
    assert nic.mac is not None and nic.tap is not None and nic.queues == 2  # hotplug fills them in
    assert nic.mac.startswith("52:54:00:")
    assert [n.id for n in vm.nics()] == ["net1"] and vm.nics()[0].mac == nic.mac
    subprocess.run(["ip", "link", "set", nic.tap, "netns", netns], check=True)
    subprocess.run(["ip", "-n", netns, "addr", "add", f"{HOST_ADDRESS}/24", "dev", nic.tap], check=True)
    subprocess.run(["ip", "-n", netns, "link", "set", nic.tap, "up"], check=True)
    with GuestShell(vm) as shell:
        name = shell.poll(f"grep -l '^{nic.mac}$' /sys/class/net/*/address | cut -d/ -f5")
        queues = shell.run(f"ls /sys/class/net/{name}/queues").output.split()
        assert {"rx-0", "rx-1", "tx-0", "tx-1"} <= set(queues)
        shell.run(f"ip addr add {GUEST_ADDRESS}/24 dev {name} && ip link set {name} up", check=True)
        ping = shell.run(f"ping -c 3 -W 3 {HOST_ADDRESS}", timeout=30)
        assert ping.ok, ping.output
        assert "3 packets received" in ping.output
        vm.unplug_nic("net1")
        assert guest_interface(shell, nic.mac) is None
    assert vm.nics() == ()
    network = vm.qmp.execute("human-monitor-command", {"command-line": "info network"})
    assert "net1-net" not in network and "ua-net1" not in network  # vmctl's backend, or libvirt's
    # QEMU let go of the tap, so the (non-persistent) interface is gone from the namespace.
    gone = subprocess.run(["ip", "-n", netns, "link", "show", nic.tap], capture_output=True)
    assert gone.returncode != 0


def test_failed_nic_hotplug_is_rolled_back(vms: VMFactory) -> None:
    vm = vms.launch(wait_ready=False)
    vm.hotplug_nic(id="net1")
    with pytest.raises(HotplugError, match="rolled back"):
        nic_ops.hotplug_nic(vm.qmp, vm.log, NicSpec(id="net1"))  # the device id is taken in QEMU
    network = vm.qmp.human("info network")
    assert network.count("net1-net") == 1  # only the working NIC's backend
