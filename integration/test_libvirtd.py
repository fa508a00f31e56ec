"""vmctl.testing.PrivateLibvirtd against the real libvirtd: private, answering, and leaving nothing behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import BOOT_TIMEOUT, CAPABILITIES_CACHE, TwoHosts
from integration.versions import LIBVIRT_PROBE
from vmctl.testing import READY_MARKER, PrivateLibvirtd, TestGuest
from vmctl.testing.libvirtd import LIBVIRT_DIRS
from vmctl.vm.process import qemu_binary

# Shared by every daemon of every session: libvirt checks each entry against its QEMU's and its
# own ctime, and the kernel, before it uses it, so only the first daemon ever probes a QEMU.


@pytest.fixture
def libvirtd(tmp_path: Path) -> Iterator[PrivateLibvirtd]:
    with PrivateLibvirtd(tmp_path / "libvirtd", capabilities_cache=CAPABILITIES_CACHE) as daemon:
        yield daemon


def guest_domain_xml(guest: TestGuest, name: str, serial_log: Path) -> str:
    """The test guest as a transient libvirt domain: q35 under TCG, its console in ``serial_log``."""
    # <acpi/>: without it libvirt 9.0 passes -no-acpi, which QEMU 10 no longer knows.
    return f"""
<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{guest.kernel}</kernel>
    <initrd>{guest.initrd}</initrd>
    <cmdline>{guest.append}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>{qemu_binary()}</emulator>
    <serial type='file'><source path='{serial_log}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
</domain>"""


def boot_guest(daemon: PrivateLibvirtd, guest: TestGuest, serial_log: Path) -> int:
    """Boot the test guest on ``daemon`` until it is ready; its QEMU's pid."""
    connection = daemon.connect()
    try:
        connection.createXML(guest_domain_xml(guest, "guest", serial_log), 0)
    finally:
        connection.close()
    deadline = time.monotonic() + BOOT_TIMEOUT
    while READY_MARKER not in (serial_log.read_text(errors="replace") if serial_log.exists() else ""):
        assert time.monotonic() < deadline, f"no {READY_MARKER} in {serial_log}"
        time.sleep(0.2)
    return int(daemon.private("/run/libvirt/qemu/guest.pid").read_text())


def host_libvirt_state() -> dict[Path, list[str] | None]:
    """What the host has in libvirt's directories (None: no such directory)."""
    return {
        directory: sorted(str(path) for path in directory.rglob("*")) if directory.is_dir() else None
        for directory in LIBVIRT_DIRS
    }


def host_libvirt_mounts() -> list[str]:
    return [line for line in Path("/proc/self/mounts").read_text().splitlines() if "libvirt" in line]


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def assert_host_unchanged(before: dict[Path, list[str] | None]) -> None:
    for directory, listing in host_libvirt_state().items():
        # start() may make a missing directory, empty, as the mount point of its bind mount.
        assert listing == before[directory] or (before[directory] is None and listing == []), directory


def test_private_daemon_answers_with_its_own_host_uuid_and_hostname_and_leaves_host_dirs_unchanged(
    tmp_path: Path,
) -> None:
    before = host_libvirt_state()
    mounts_before = host_libvirt_mounts()
    daemon = PrivateLibvirtd(tmp_path / "libvirtd", capabilities_cache=CAPABILITIES_CACHE)
    with daemon:
        connection = daemon.connect()
        try:
            capabilities = connection.getCapabilities()
            host_uuid = re.search(r"<host>\s*<uuid>([^<]+)</uuid>", capabilities)
            assert host_uuid is not None and host_uuid[1] == daemon.host_uuid
            assert connection.getHostname() == daemon.hostname
        finally:
            connection.close()
        assert daemon.socket_path.is_socket()
        assert daemon.log_path.exists()
        assert host_libvirt_mounts() == mounts_before, "the daemon's bind mounts showed on the host"
        assert_host_unchanged(before)
        pid = daemon.pid
        assert pid is not None
    assert not is_running(pid)
    assert_host_unchanged(before)
    assert host_libvirt_mounts() == mounts_before


@pytest.mark.versioned(LIBVIRT_PROBE)
def test_guest_boots_as_a_transient_domain_and_stop_leaves_no_qemu_and_no_daemon(
    libvirtd: PrivateLibvirtd, guest: TestGuest, tmp_path: Path
) -> None:
    qemu_pid = boot_guest(libvirtd, guest, tmp_path / "serial.log")
    daemon_pid = libvirtd.pid
    assert daemon_pid is not None and is_running(qemu_pid)
    libvirtd.stop()
    assert not is_running(qemu_pid)
    assert not is_running(daemon_pid)


def test_stop_kills_the_qemu_of_a_daemon_that_died_without_destroying_it(
    libvirtd: PrivateLibvirtd, guest: TestGuest, tmp_path: Path
) -> None:
    qemu_pid = boot_guest(libvirtd, guest, tmp_path / "serial.log")
    assert libvirtd.pid is not None
    os.kill(libvirtd.pid, signal.SIGKILL)  # libvirtd would not destroy its domains anyway
    libvirtd.stop()
    assert not is_running(qemu_pid)


def test_daemons_in_two_network_namespaces_each_open_the_others_tcp_uri(two_hosts: TwoHosts, tmp_path: Path) -> None:
    a = PrivateLibvirtd(
        tmp_path / "a", netns=two_hosts.a, listen_address=two_hosts.a_address, capabilities_cache=CAPABILITIES_CACHE
    )
    b = PrivateLibvirtd(
        tmp_path / "b", netns=two_hosts.b, listen_address=two_hosts.b_address, capabilities_cache=CAPABILITIES_CACHE
    )
    with a, b:
        assert a.tcp_uri == f"qemu+tcp://{two_hosts.a_address}:16509/system"
        for here, there in ((a, b), (b, a)):
            assert here.netns is not None and there.tcp_uri is not None
            answer = subprocess.run(
                ["ip", "netns", "exec", here.netns, "virsh", "-c", there.tcp_uri, "hostname"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert answer.returncode == 0, answer.stderr
            assert answer.stdout.strip() == there.hostname
