"""CPU and memory hotplug and the balloon, checked from inside the test guest."""

from __future__ import annotations

import time

import pytest

from integration.conftest import DomainFactory, VMFactory
from integration.versions import CPU_HOTPLUG, MEMORY_HOTPLUG
from vmctl import VM, Domain
from vmctl.errors import BalloonUnavailable, DeviceError, HotplugError, InvalidArgument
from vmctl.libvirt import LibvirtVM
from vmctl.testing import GuestShell
from vmctl.testing.faults import record

MIB = 1024 * 1024


def wait_until(predicate: object, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.1)
    return False


def recorded_cpus(vm: Domain) -> int:
    """How many vCPUs the VM's record says: vmctl's inventory, or libvirt's live XML."""
    if isinstance(vm, LibvirtVM):
        return vm.devices.vcpus()[0]
    assert isinstance(vm, VM)
    return vm.spec.cpus + len(vm.inventory.hotplugged_cpus)


@pytest.mark.versioned(CPU_HOTPLUG)
def test_cpu_hotplug_and_unplug_seen_by_the_guest(domains: DomainFactory) -> None:
    vm = domains.launch(domains.spec(cpus=1, max_cpus=3))
    with GuestShell(vm) as shell:

        def present() -> int:
            return int(shell.run("ls -d /sys/devices/system/cpu/cpu[0-9]* | wc -l").output)

        assert present() == 1
        added = vm.hotplug_cpus(2)
        assert len(added) == 2 and recorded_cpus(vm) == 3
        assert wait_until(lambda: present() == 3)
        shell.run("for c in /sys/devices/system/cpu/cpu[1-9]*; do echo 1 > $c/online; done", check=True)
        assert shell.run("cat /sys/devices/system/cpu/online").output.strip() == "0-2"
        assert int(shell.run("grep -c ^processor /proc/cpuinfo").output) == 3
        with pytest.raises(InvalidArgument, match="only 0 more"):
            vm.hotplug_cpus(1)
        if isinstance(vm, LibvirtVM):  # see unplug_cpus: libvirt's record would go stale under TCG
            with pytest.raises(DeviceError, match="TCG"):
                vm.unplug_cpus(1)
            assert recorded_cpus(vm) == 3 and present() == 3
            return
        removed = vm.unplug_cpus(1)
        assert removed == [added[-1]]
        assert wait_until(lambda: present() == 2)
        assert recorded_cpus(vm) == 2
    assert sum(1 for s in vm.qmp.execute("query-hotpluggable-cpus") if "qom-path" in s) == 2


@pytest.mark.versioned(MEMORY_HOTPLUG)
def test_memory_hotplug_and_unplug_seen_by_the_guest(domains: DomainFactory) -> None:
    vm = domains.launch(domains.spec(memory_mib=256, max_memory_mib=1024, memory_slots=2))
    with GuestShell(vm) as shell:

        def mem_total_kib() -> int:
            return int(shell.run("awk '/MemTotal/ {print $2}' /proc/meminfo").output)

        before = mem_total_kib()
        vm.hotplug_memory(256, id="dimm1")
        assert wait_until(lambda: mem_total_kib() >= before + 250 * 1024)
        [device] = vm.memory_devices()
        assert device.id == "dimm1" and device.size == 256 * MIB and device.hotplugged
        # Beyond maxmem: QEMU refuses vmctl's (rolled back); LibvirtVM refuses it before libvirt sees it.
        with pytest.raises(HotplugError if isinstance(vm, VM) else InvalidArgument, match=r"rolled back|exceeds"):
            vm.hotplug_memory(1024, id="toobig")
        objects = {o["name"] for o in vm.qmp.execute("qom-list", {"path": "/objects"})}
        assert not {"toobig-ram", "memua-toobig"} & objects
        with pytest.raises(InvalidArgument, match="128"):
            vm.hotplug_memory(100, id="odd")
        vm.unplug_memory("dimm1", timeout=30)
        assert wait_until(lambda: mem_total_kib() <= before + 1024)
    assert vm.memory_devices() == []
    assert "dimm1-ram" not in {o["name"] for o in vm.qmp.execute("qom-list", {"path": "/objects"})}


def test_balloon_reaches_its_target(domains: DomainFactory) -> None:
    vm = domains.launch(domains.spec(memory_mib=512, balloon=True))
    assert vm.balloon() == 512 * MIB
    assert vm.set_balloon(256 * MIB, timeout=30) == 256 * MIB
    with GuestShell(vm) as shell:
        total_kib = int(shell.run("awk '/MemTotal/ {print $2}' /proc/meminfo").output)
    assert total_kib < 300 * 1024  # the guest gave the memory back
    assert vm.set_balloon(512 * MIB, timeout=30) == 512 * MIB


def test_balloon_without_a_device_is_a_clear_error(vms: VMFactory) -> None:
    vm = vms.launch(wait_ready=False)
    with pytest.raises(BalloonUnavailable):
        vm.balloon()
    with pytest.raises(BalloonUnavailable):
        vm.set_balloon(128 * MIB)


@pytest.mark.versioned(MEMORY_HOTPLUG)
def test_virtio_mem_grows_and_shrinks_the_guest(domains: DomainFactory) -> None:
    vm = domains.launch(domains.spec(memory_mib=256, max_memory_mib=1280, memory_slots=1))
    with GuestShell(vm) as shell:

        def mem_total_kib() -> int:
            return int(shell.run("awk '/MemTotal/ {print $2}' /proc/meminfo").output)

        before = mem_total_kib()
        vm.add_virtio_mem("vmem0", max_size_mib=1024)
        vm.resize_virtio_mem("vmem0", 512)
        path = "/machine/peripheral/" + ("ua-vmem0" if isinstance(vm, LibvirtVM) else "vmem0")
        assert int(vm.qmp.execute("qom-get", {"path": path, "property": "size"})) == 512 * MIB
        assert wait_until(lambda: mem_total_kib() >= before + 500 * 1024)
        vm.resize_virtio_mem("vmem0", 128)
        assert wait_until(lambda: mem_total_kib() <= before + 130 * 1024)
        assert isinstance(vm, LibvirtVM | VM)
        recorded = vm.memory.virtio_mem() if isinstance(vm, LibvirtVM) else vm.inventory.virtio_mem
        assert recorded[0].size_mib == 128
        with pytest.raises(InvalidArgument):
            vm.resize_virtio_mem("vmem0", 2048)


@pytest.mark.versioned(CPU_HOTPLUG)
def test_a_cpu_hotplug_that_would_crash_qemu_under_tcg_is_refused_before_anything_is_sent(vms: VMFactory) -> None:
    """Measured here: under TCG, QEMU 7.2 dies (SIGSEGV) on a vCPU hotplug after an unplug, and
    10.0 aborts (tcg_max_ctxs) once max_cpus vCPUs have been created over its life."""
    vm = vms.launch(vms.spec(cpus=1, max_cpus=3))
    for _ in range(1 if vm.qmp.version.major < 8 else 2):
        vm.unplug_cpus(len(vm.hotplug_cpus(1)))  # each one plugged creates a vCPU for good
    with record(vm.qmp) as sent, pytest.raises(DeviceError, match=r"crashes|would abort"):
        vm.hotplug_cpus(1)
    assert "device_add" not in sent.names
    assert vm.status().running and vm.inventory.hotplugged_cpus == ()
    with GuestShell(vm) as shell:  # and the guest runs on
        assert shell.run("echo alive").output == "alive\n"
