"""Chardevs hotplugged as virtio-serial ports: the guest sees the port and its bytes reach the host."""

from __future__ import annotations

import socket
import time

import pytest

from integration.conftest import VMFactory
from vmctl.errors import DeviceExists, InvalidArgument
from vmctl.testing import GuestShell


def guest_port(shell: GuestShell, name: str) -> str | None:
    out = shell.run(f"grep -l '^{name}$' /sys/class/virtio-ports/*/name 2>/dev/null").output.strip()
    return out.split("/")[4] if out else None


def wait_for_port(shell: GuestShell, name: str) -> str:
    return shell.poll(f"grep -l '^{name}$' /sys/class/virtio-ports/*/name | cut -d/ -f5")


def test_ringbuf_port_carries_guest_output(vms: VMFactory) -> None:
    vm = vms.launch()
    vm.hotplug_chardev("log0", kind="ringbuf", size=4096, port_name="org.vmctl.log")
    with GuestShell(vm) as shell:
        port = wait_for_port(shell, "org.vmctl.log")
        shell.run(f"echo hello-from-the-port > /dev/{port}", check=True)
    text = vm.qmp.execute("ringbuf-read", {"device": "log0", "size": 4096, "format": "utf8"})
    assert text == "hello-from-the-port\n"
    with pytest.raises(DeviceExists):
        vm.hotplug_chardev("log0", kind="ringbuf")
    vm.unplug_chardev("log0")
    with GuestShell(vm) as shell:
        assert guest_port(shell, "org.vmctl.log") is None
    assert "log0" not in [c["label"] for c in vm.qmp.execute("query-chardev")]
    assert [c.id for c in vm.inventory.chardevs] == []


def test_socket_port_reaches_the_control_plane(vms: VMFactory) -> None:
    vm = vms.launch()
    path = vm.run_dir / "agent.sock"  # QEMU makes it: where its (unprivileged) user may write
    vm.hotplug_chardev("agent0", kind="socket", path=path, port_name="org.vmctl.agent")
    with GuestShell(vm) as shell, socket.socket(socket.AF_UNIX) as host_end:
        host_end.connect(str(path))
        port = wait_for_port(shell, "org.vmctl.agent")
        shell.run(f"echo ping-over-virtio-serial > /dev/{port}", check=True)
        host_end.settimeout(10)
        received = b""
        deadline = time.monotonic() + 10
        while b"\n" not in received and time.monotonic() < deadline:
            received += host_end.recv(100)
        assert received == b"ping-over-virtio-serial\n"
    vm.unplug_chardev("agent0")
    assert "agent0" not in [c["label"] for c in vm.qmp.execute("query-chardev")]
    with pytest.raises(InvalidArgument):
        vm.hotplug_chardev("bad0", kind="socket")  # no path
