"""TLS for migration and NBD: the stream between two hosts (network namespaces) is encrypted and
each end verifies the other against the CA; a peer the CA did not sign is refused."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import TwoHosts, VMFactory, make_image
from integration.test_migration import pattern_intact, write_pattern
from integration.versions import MIGRATION
from vmctl import VM, Secret, TLSCreds
from vmctl.errors import InvalidArgument, MigrationError
from vmctl.testing import GuestShell
from vmctl.testing.certs import make_tls_creds

pytestmark = pytest.mark.versioned(MIGRATION)

#: A string the guest holds in RAM (a tmpfs file): in clear on the wire unless the stream is encrypted.
MARKER = "vmctl-ram-marker-6e1f0b93"


@contextlib.contextmanager
def captured(namespace: str, link: str, port: int, out: Path) -> Iterator[Path]:
    """The TCP traffic to and from ``port`` on ``link``, as tcpdump writes it, up to the end of
    the connections: the capture stops once both ends' FIN (or RST) are in the file."""
    # A 64 MiB kernel buffer: with the default 2 MiB, tcpdump dropped a tenth of a disk copy in CI.
    command = ["ip", "netns", "exec", namespace, "tcpdump", "-i", link, "-U", "-B", "65536", "-s", "0", "-w", str(out)]
    with subprocess.Popen([*command, "tcp", "port", str(port)], stderr=subprocess.PIPE, text=True) as dump:
        try:
            assert dump.stderr is not None
            assert "listening on" in dump.stderr.readline()  # it captures from here on
            yield out
            # tcpdump hands packets over in batches: wait for the last ones rather than guess how long they take.
            deadline = time.monotonic() + 30
            while len(closed_by(out, port)) < 2:
                assert time.monotonic() < deadline, f"the capture never saw both ends of port {port} close"
                time.sleep(0.05)
        finally:
            dump.terminate()
            dump.wait(10)


def closed_by(capture: Path, port: int) -> set[str]:
    """The addresses that sent a FIN or RST on ``port``, in the capture so far (tcpdump reads a
    file it is still writing, up to its last whole packet)."""
    flags = f"tcp port {port} and tcp[tcpflags] & (tcp-fin|tcp-rst) != 0"
    listed = subprocess.run(["tcpdump", "-n", "-r", str(capture), flags], capture_output=True, text=True).stdout
    # "12:00:00.000000 IP 10.232.0.1.4460 > 10.232.0.2.51234: Flags [F.], ..."
    return {line.split()[2].rsplit(".", 1)[0] for line in listed.splitlines() if " IP " in line}


def test_a_tls_migration_between_hosts_moves_the_guest_and_never_its_ram_in_clear(
    vms: VMFactory, two_hosts: TwoHosts, tmp_path: Path
) -> None:
    vm = vms.launch(vms.spec("src"), netns=two_hosts.a)
    write_pattern(vm)
    with GuestShell(vm) as shell:
        shell.run(f"yes {MARKER} | head -c 1000000 > /tmp/marker", check=True)
    # In clear first, to show that the capture would see the guest's RAM.
    middle = vms.incoming(vm, "middle", netns=two_hosts.b)
    with captured(two_hosts.b, two_hosts.b_link, 4460, tmp_path / "clear.pcap") as clear:
        vm.migrate(middle, listen=(two_hosts.b_address, 4460)).wait(120)
    assert MARKER.encode() in clear.read_bytes()
    creds = make_tls_creds(tmp_path / "pki", hostname=two_hosts.a_address)  # the next target is on host a
    final = vms.incoming(middle, "final", netns=two_hosts.a)
    with captured(two_hosts.b, two_hosts.b_link, 4461, tmp_path / "tls.pcap") as encrypted:
        result = middle.migrate(final, listen=(two_hosts.a_address, 4461), tls=creds).wait(120)
    assert result.status == "completed"
    wire = encrypted.read_bytes()
    assert len(wire) > 64 << 20  # the whole guest went through the capture
    assert MARKER.encode() not in wire
    assert pattern_intact(final)
    params = final.qmp.execute("query-migrate-parameters")
    assert params["tls-creds"] == "vmctl-tls-migration-server"


def test_a_target_whose_certificate_another_ca_signed_is_refused_and_the_source_runs_on(
    vms: VMFactory, two_hosts: TwoHosts, tmp_path: Path
) -> None:
    vm = vms.launch(vms.spec("src"), netns=two_hosts.a)
    write_pattern(vm)
    ours = make_tls_creds(tmp_path / "ours", hostname=two_hosts.b_address)
    theirs = make_tls_creds(tmp_path / "theirs", hostname=two_hosts.b_address)  # its own CA
    before = vm.qmp.execute("query-migrate-parameters")
    target = vms.incoming(vm, "dst", netns=two_hosts.b)
    with pytest.raises(MigrationError):
        vm.migrate(target, listen=(two_hosts.b_address, 4462), tls=ours, target_tls=theirs).wait(60)
    assert vm.status().running and pattern_intact(vm)
    after = vm.qmp.execute("query-migrate-parameters")
    assert (after["tls-creds"], after["tls-hostname"]) == (before["tls-creds"], before["tls-hostname"])
    assert "vmctl-tls-migration-client" not in {o["name"] for o in vm.qmp.execute("qom-list", {"path": "/objects"})}


def test_tls_needs_a_tcp_migration(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(wait_ready=False)
    target = vms.incoming(vm, "dst")
    with pytest.raises(InvalidArgument, match="listen="):
        vm.migrate(target, tls=make_tls_creds(tmp_path / "pki", hostname="127.0.0.1"))
    with pytest.raises(InvalidArgument, match="missing"):
        vm.migrate(target, listen=("127.0.0.1", 4463), tls=TLSCreds(dir=tmp_path / "nothing"))


def test_an_nbd_export_over_tls_serves_only_clients_the_ca_signed(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(wait_ready=False)
    vm.hotplug_disk(make_image(tmp_path / "data.qcow2", "qcow2", "8M"), id="n1")
    creds = make_tls_creds(tmp_path / "pki", hostname="127.0.0.1")
    export = vm.export_disk("n1", address=("127.0.0.1", 10809), tls=creds)

    def info(*tls: str) -> subprocess.CompletedProcess[str]:
        image = f"driver=nbd,host=127.0.0.1,port=10809,export={export.name}"
        if tls:
            image += ",tls-creds=c"
        return subprocess.run(
            ["qemu-img", "info", *tls, "--image-opts", image], capture_output=True, text=True, timeout=30
        )

    with_creds = info("--object", f"tls-creds-x509,id=c,dir={creds.dir},endpoint=client")
    assert with_creds.returncode == 0 and "virtual size: 8 MiB" in with_creds.stdout, with_creds.stderr
    assert info().returncode != 0  # in clear: refused
    other = make_tls_creds(tmp_path / "other", hostname="127.0.0.1")  # a client another CA signed
    assert info("--object", f"tls-creds-x509,id=c,dir={other.dir},endpoint=client").returncode != 0
    vm.unexport_disk("n1")
    assert "vmctl-tls-nbd-server" not in {o["name"] for o in vm.qmp.execute("qom-list", {"path": "/objects"})}


def test_a_storage_copy_migration_over_tls_with_password_protected_keys_carries_the_disk(
    vms: VMFactory, two_hosts: TwoHosts, tmp_path: Path
) -> None:
    source = vms.launch(vms.spec("src"), netns=two_hosts.a)
    source.hotplug_disk(make_image(tmp_path / "src.qcow2", "qcow2", "32M"), id="data1")
    with GuestShell(source) as shell:
        device = shell.block_device("data1")  # once the guest has it
        shell.run(f"yes {MARKER} | head -c 4000000 | dd of=/dev/{device} bs=1M conv=fsync 2>/dev/null", check=True)
        guest_sum = shell.run(f"dd if=/dev/{device} bs=1M count=4 2>/dev/null | md5sum").output.split()[0]
    password = Secret(b"tls-key-password")
    creds = make_tls_creds(tmp_path / "pki", hostname=two_hosts.b_address, key_password=password)
    assert b"ENCRYPTED PRIVATE KEY" in (tmp_path / "pki" / "server-key.pem").read_bytes()
    copy = make_image(tmp_path / "dst.qcow2", "qcow2", "32M")
    target = VM.launch_incoming(
        source.migration_target_spec(name="dst", disk_paths={"data1": copy}),
        run_dir=vms.run_dir("dst"),
        inventory=source.inventory,
        netns=two_hosts.b,
    )
    vms.vms.append(target)
    listen = (two_hosts.b_address, 4464)  # the disks' NBD copy goes to the port after it
    with captured(two_hosts.b, two_hosts.b_link, listen[1] + 1, tmp_path / "nbd.pcap") as wire:
        source.migrate(target, listen=listen, copy_storage=True, tls=creds).wait(180)
    # Most of the 4 MB disk went through this port (tcpdump may still drop packets on two busy cores),
    # and every 64 KiB of it would show the marker many times if it were in clear.
    assert len(wire.read_bytes()) > 2_000_000 and MARKER.encode() not in wire.read_bytes()
    with GuestShell(target) as shell:
        assert shell.run(f"dd if=/dev/{device} bs=1M count=4 2>/dev/null | md5sum").output.split()[0] == guest_sum
    for vm in (target,):  # the password reached QEMU encrypted, never in clear
        assert b"tls-key-password" not in Path(f"/proc/{vm.pid}/cmdline").read_bytes()
        assert b"tls-key-password" not in (vm.run_dir / "vm.json").read_bytes()
