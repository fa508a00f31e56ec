"""LibvirtVM.migrate between two real libvirtds, each in a network namespace of its own, over
``qemu+tcp://`` (peer to peer: the source's libvirtd talks to the target's). Both namespaces
share this filesystem: the target runs the guest's console log and shell socket in a run dir
of its own (``target_run_dir``), and disk images are shared (``unsafe=True``) or copied into
an image of the target's (``copy_storage``)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import BOOT_TIMEOUT, CAPABILITIES_CACHE, TwoHosts, VMFactory, make_image
from integration.versions import MIGRATION
from vmctl.errors import WaitTimeout
from vmctl.libvirt import DomainNotFound, LibvirtMigrationError, LibvirtVM
from vmctl.libvirt.eventloop import libvirt_module
from vmctl.libvirt.migration import MIB, LibvirtMigration
from vmctl.model.migration import MigrationProgress
from vmctl.testing import READY_MARKER, GuestShell
from vmctl.testing.libvirtd import PrivateLibvirtd

pytestmark = [pytest.mark.timeout(120), pytest.mark.versioned(MIGRATION)]

#: Random, so that neither zero-page detection nor compression shrinks it on the wire.
RAM_FILE_MIB = 32
MIGRATE_TIMEOUT = 60.0


class Hosts:
    """Two private libvirtds, a (the source) and b (the target), in two joined namespaces."""

    def __init__(self, a: PrivateLibvirtd, b: PrivateLibvirtd, vms: VMFactory) -> None:
        self.a = a
        self.b = b
        self.vms = vms
        self.opened: list[LibvirtVM] = []

    @property
    def b_tcp(self) -> str:
        assert self.b.tcp_uri is not None
        return self.b.tcp_uri

    def boot(self, name: str = "mig1") -> LibvirtVM:
        vm = LibvirtVM.define(self.a.uri, self.vms.spec(name), run_dir=self.vms.run_dir(name))
        self.opened.append(vm)
        vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
        return vm

    def target_run_dir(self, name: str = "mig1") -> Path:
        run_dir = self.vms.run_dir(f"{name}-on-b")
        run_dir.mkdir(parents=True, exist_ok=True)  # on the target host, which shares our filesystem
        return run_dir

    def on_target(self, migration: LibvirtMigration[LibvirtVM]) -> LibvirtVM:
        target = migration.target(self.b.uri)  # we reach b by its unix socket, not by its namespace's TCP
        self.opened.append(target)
        return target

    def domain_names(self, daemon: PrivateLibvirtd) -> list[str]:
        conn = daemon.connect()
        try:
            return sorted(str(domain.name()) for domain in conn.listAllDomains())
        finally:
            conn.close()


@pytest.fixture
def hosts(two_hosts: TwoHosts, vms: VMFactory, tmp_path: Path) -> Iterator[Hosts]:
    a = PrivateLibvirtd(
        tmp_path / "a", netns=two_hosts.a, listen_address=two_hosts.a_address, capabilities_cache=CAPABILITIES_CACHE
    )
    b = PrivateLibvirtd(
        tmp_path / "b", netns=two_hosts.b, listen_address=two_hosts.b_address, capabilities_cache=CAPABILITIES_CACHE
    )
    with a, b:
        hosts = Hosts(a, b, vms)
        try:
            yield hosts
        finally:
            for vm in hosts.opened:
                vm.close()


def fill_ram(shell: GuestShell, mib: int = RAM_FILE_MIB) -> str:
    """A random file of ``mib`` MiB in the guest's tmpfs; its sha256."""
    shell.run(f"head -c {mib * MIB} /dev/urandom > /tmp/ram.bin", check=True, timeout=60)
    return checksum(shell, "/tmp/ram.bin")


def checksum(shell: GuestShell, path: str) -> str:
    return shell.run(f"sha256sum < {path}", check=True, timeout=60).output.split()[0]


def source_gone(vm: LibvirtVM) -> bool:
    """The source's domain stopped, or (undefined after a persistent migration) is no more."""
    try:
        return vm.has_exited
    except DomainNotFound:
        return True


def begun(migration: LibvirtMigration[LibvirtVM], timeout: float = 30.0) -> None:
    """Wait until QEMU has sent some of the guest's memory."""
    deadline = time.monotonic() + timeout
    while migration.progress().transferred == 0:
        assert time.monotonic() < deadline, "the migration sent nothing"
        time.sleep(0.1)


def test_live_migration_carries_the_guests_ram_intact_and_the_target_runs_in_its_own_run_dir(hosts: Hosts) -> None:
    vm = hosts.boot()
    with GuestShell(vm) as shell:
        before = fill_ram(shell)
    console_before = (vm.run_dir / "console.log").read_bytes()
    target_run_dir = hosts.target_run_dir()
    samples: list[MigrationProgress] = []
    migration = vm.migrate(hosts.b_tcp, target_run_dir=target_run_dir, downtime_limit=500)
    result = migration.wait(MIGRATE_TIMEOUT, on_progress=samples.append, progress_interval=0.2)
    assert result.status == "completed" and migration.status == "completed"
    assert result.transferred >= RAM_FILE_MIB * MIB and result.total_time_ms > 0 and not result.postcopy
    assert {sample.status for sample in samples} <= {"setup", "active"}
    assert all(sample.total >= 256 * MIB for sample in samples if sample.status == "active")
    transferred = [sample.transferred for sample in samples]
    assert transferred == sorted(transferred)
    assert source_gone(vm)
    assert hosts.domain_names(hosts.a) == [], "persistent: the source no longer defines it"
    assert hosts.domain_names(hosts.b) == ["mig1"]
    # The target's QEMU neither took the source's console log over nor its shell socket's path.
    assert (vm.run_dir / "console.log").read_bytes().startswith(console_before)
    target = hosts.on_target(migration)
    assert target.run_dir == target_run_dir and target.shell_socket.is_socket()
    assert target.status().running
    assert target.domain.isPersistent()
    assert str(target_run_dir) in target.domain.XMLDesc(libvirt_module().VIR_DOMAIN_XML_INACTIVE)  # its config too
    with GuestShell(target) as shell:
        assert checksum(shell, "/tmp/ram.bin") == before


def test_cancel_keeps_the_source_running_with_its_guest_alive(hosts: Hosts) -> None:
    vm = hosts.boot()
    with GuestShell(vm) as shell:
        before = fill_ram(shell)
    migration = vm.migrate(hosts.b_tcp, bandwidth=MIB, target_run_dir=hosts.target_run_dir())  # 32+ s at 1 MiB/s
    begun(migration)
    with pytest.raises(WaitTimeout):
        migration.wait(0.5)
    migration.cancel(timeout=30)
    assert migration.status == "cancelled"
    with pytest.raises(LibvirtMigrationError) as failure:
        migration.wait(5)
    assert failure.value.status == "cancelled" and failure.value.reason, failure.value
    assert vm.status().running and not vm.has_exited
    assert hosts.domain_names(hosts.b) == []
    with GuestShell(vm) as shell:  # a new connection: the shell socket is still the source's
        assert checksum(shell, "/tmp/ram.bin") == before


def test_postcopy_moves_the_guest_with_its_ram_intact(hosts: Hosts) -> None:
    vm = hosts.boot()
    with GuestShell(vm) as shell:
        before = fill_ram(shell)
    migration = vm.migrate(hosts.b_tcp, postcopy=True, bandwidth=MIB, target_run_dir=hosts.target_run_dir())
    begun(migration)
    libvirt = libvirt_module()
    postcopy_began = (libvirt.VIR_DOMAIN_EVENT_SUSPENDED, libvirt.VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY)
    with vm.events.waiting(lambda e: e.kind == "lifecycle" and (e.status, e.detail) == postcopy_began) as suspended:
        migration.start_postcopy()
        assert migration.status == "postcopy-active"
        suspended.get(10, "the source's switch to postcopy")  # libvirt's own word that it did
    result = migration.wait(MIGRATE_TIMEOUT)
    assert result.postcopy and result.status == "completed"
    assert source_gone(vm)
    with GuestShell(hosts.on_target(migration)) as shell:
        assert checksum(shell, "/tmp/ram.bin") == before


def write_disk(shell: GuestShell, serial: str, mib: int = 8) -> tuple[str, str]:
    """Random data on the guest's disk ``serial`` (written through to its image); the guest's
    device name and the data's sha256."""
    device = shell.block_device(serial)
    shell.run(f"head -c {mib * MIB} /dev/urandom > /tmp/disk.bin", check=True, timeout=60)
    shell.run(f"dd if=/tmp/disk.bin of=/dev/{device} bs=1M oflag=direct conv=fsync 2>/dev/null", check=True)
    return device, checksum(shell, "/tmp/disk.bin")


def read_disk(shell: GuestShell, device: str, mib: int = 8) -> str:
    read = f"dd if=/dev/{device} bs=1M count={mib} iflag=direct 2>/dev/null | sha256sum"
    return shell.run(read, check=True, timeout=60).output.split()[0]


def test_a_hotplugged_disk_on_shared_storage_arrives_with_its_data(hosts: Hosts, tmp_path: Path) -> None:
    vm = hosts.boot()
    image = make_image(tmp_path / "data.qcow2", "qcow2")
    vm.hotplug_disk(image, id="data")
    with GuestShell(vm) as shell:
        device, written = write_disk(shell, "data")
    migration = vm.migrate(hosts.b_tcp, unsafe=True, target_run_dir=hosts.target_run_dir())
    migration.wait(MIGRATE_TIMEOUT)
    target = hosts.on_target(migration)
    assert [(disk.id, Path(disk.path)) for disk in target.disks()] == [("data", image)]
    with GuestShell(target) as shell:
        assert read_disk(shell, device) == written


def test_a_local_disk_is_refused_without_unsafe_and_the_source_runs_on(hosts: Hosts, tmp_path: Path) -> None:
    vm = hosts.boot()
    vm.hotplug_disk(make_image(tmp_path / "data.qcow2", "qcow2"), id="data")
    migration = vm.migrate(hosts.b_tcp, target_run_dir=hosts.target_run_dir())
    with pytest.raises(LibvirtMigrationError) as failure:
        migration.wait(MIGRATE_TIMEOUT)
    assert failure.value.status == "failed" and "unsafe" in failure.value.reason.lower(), failure.value
    assert vm.status().running


def test_copy_storage_copies_a_hotplugged_disk_into_the_targets_own_image(hosts: Hosts, tmp_path: Path) -> None:
    vm = hosts.boot()
    image = make_image(tmp_path / "data.qcow2", "qcow2")
    target_image = make_image(tmp_path / "data-on-b.qcow2", "qcow2")  # libvirt copies into it; it makes none
    vm.hotplug_disk(image, id="data")
    with GuestShell(vm) as shell:
        device, written = write_disk(shell, "data")
    migration = vm.migrate(
        hosts.b_tcp, copy_storage=True, target_disks={"data": target_image}, target_run_dir=hosts.target_run_dir()
    )
    migration.wait(MIGRATE_TIMEOUT)
    target = hosts.on_target(migration)
    assert [(disk.id, Path(disk.path)) for disk in target.disks()] == [("data", target_image)]
    config = target.domain.XMLDesc(libvirt_module().VIR_DOMAIN_XML_INACTIVE)
    assert str(target_image) in config and str(image) not in config  # defined on b with b's image
    with GuestShell(target) as shell:
        assert read_disk(shell, device) == written
    # The target's image holds the whole disk; the source's was left as it was.
    compare = ["qemu-img", "compare", "-U", str(image), str(target_image)]
    assert subprocess.run(compare, capture_output=True, text=True, check=False).returncode == 0
