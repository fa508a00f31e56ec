"""What is LibvirtVM's own: defining and taking over domains, refusals before libvirt sees anything,
shutting down, and libvirt's domain XML agreeing with what happened."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import BOOT_TIMEOUT, CAPABILITIES_CACHE, VMFactory, make_image
from vmctl import DiskSpec, ShutdownMethod
from vmctl.errors import DeviceExists, InvalidArgument, SpecError, UnknownDevice
from vmctl.libvirt import LibvirtError, LibvirtVM
from vmctl.testing import READY_MARKER, GuestShell
from vmctl.testing.libvirtd import PrivateLibvirtd


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[PrivateLibvirtd]:
    with PrivateLibvirtd(tmp_path / "libvirtd", capabilities_cache=CAPABILITIES_CACHE) as started:
        yield started


def domain_names(daemon: PrivateLibvirtd) -> list[str]:
    conn = daemon.connect()
    try:
        return sorted(d.name() for d in conn.listAllDomains(0))
    finally:
        conn.close()


def booted(daemon: PrivateLibvirtd, vms: VMFactory, **overrides: Any) -> LibvirtVM:
    spec = vms.spec(**overrides)
    vm = LibvirtVM.define(daemon.uri, spec, run_dir=vms.run_dir(spec.name))
    vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
    return vm


def test_specs_libvirt_cannot_carry_and_taken_names_are_refused_before_anything_is_defined(
    daemon: PrivateLibvirtd, vms: VMFactory
) -> None:
    with pytest.raises(SpecError, match="extra_args"):
        LibvirtVM.define(daemon.uri, vms.spec(extra_args=("-S",)), run_dir=vms.run_dir("vm1"))
    with pytest.raises(SpecError, match="no_shutdown"):
        LibvirtVM.define(daemon.uri, vms.spec(no_shutdown=True), run_dir=vms.run_dir("vm1"))
    assert domain_names(daemon) == []
    vm = LibvirtVM.define(daemon.uri, vms.spec(), run_dir=vms.run_dir("vm1"))
    with pytest.raises(InvalidArgument, match="already has a domain"):
        LibvirtVM.define(daemon.uri, vms.spec(), run_dir=vms.run_dir("other"))
    assert domain_names(daemon) == ["vm1"]
    vm.kill()
    vm.close()


def test_open_takes_over_a_running_domain_with_its_disks_and_shell(
    daemon: PrivateLibvirtd, vms: VMFactory, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "data.qcow2", "qcow2")
    first = booted(daemon, vms, disks=[DiskSpec(id="data", path=image, cache="none", aio="native")])
    first.close()  # the control plane goes; the domain runs on
    vm = LibvirtVM.open(daemon.uri, "vm1")
    try:
        assert vm.status().running
        assert vm.run_dir == vms.run_dir("vm1")
        assert vm.spec.shell_serial and vm.spec.cpus == 1 and vm.spec.memory_mib == 256
        [disk] = vm.disks()
        assert (disk.id, disk.path, disk.cache, disk.aio) == ("data", str(image), "none", "native")
        with GuestShell(vm) as shell:
            assert shell.block_device("data")
    finally:
        vm.kill()
        vm.close()


def test_bad_device_requests_are_refused_and_a_failed_attach_leaves_the_xml_as_it_was(
    daemon: PrivateLibvirtd, vms: VMFactory, tmp_path: Path
) -> None:
    vm = booted(daemon, vms)
    try:
        before = vm.xml()
        with pytest.raises(UnknownDevice):
            vm.unplug_disk("nothing")
        with pytest.raises(LibvirtError):
            vm.hotplug_disk(tmp_path / "missing.qcow2", id="gone")
        assert vm.disks() == ()
        disk = vm.hotplug_disk(make_image(tmp_path / "a.qcow2", "qcow2"), id="a")
        with pytest.raises(DeviceExists):
            vm.hotplug_disk(make_image(tmp_path / "b.qcow2", "qcow2"), id="a")
        assert vm.disks() == (disk,)
        vm.unplug_disk("a")
        assert vm.xml() == before
    finally:
        vm.kill()
        vm.close()


def test_acpi_powerdown_ends_the_domain(daemon: PrivateLibvirtd, vms: VMFactory) -> None:
    vm = booted(daemon, vms)
    result = vm.shutdown(timeout=30)
    assert result.method is ShutdownMethod.POWERDOWN
    assert vm.has_exited
    assert domain_names(daemon) == ["vm1"]  # defined: it stays, stopped
    vm.undefine()
    assert domain_names(daemon) == []
    vm.close()


def test_a_guest_ignoring_acpi_is_ended_in_bounded_time(daemon: PrivateLibvirtd, vms: VMFactory) -> None:
    vm = booted(daemon, vms, append="vmctl.noacpi")
    started = time.monotonic()
    result = vm.shutdown(timeout=10, step_timeout=2)
    assert result.method is ShutdownMethod.TERMINATE
    assert time.monotonic() - started < 10
    assert vm.has_exited
    vm.close()
