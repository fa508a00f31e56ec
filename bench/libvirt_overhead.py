"""vmctl on libvirt against vmctl on its own: QMP round trips, disk hotplug, migration; one run, ratios.

    .venv/bin/python bench/libvirt_overhead.py [--calls 500] [--virsh-calls 50] [--rounds 20] [--migrations 6]

Needs libvirtd, virsh and libvirt-python; starts a private libvirtd (``PrivateLibvirtd``) and
two TCG test guests booted to READY: a libvirt domain and a VM vmctl runs itself.

QMP: ``query-status`` round trips on the libvirt domain's one QEMU, through ``LibvirtMonitor``
(libvirtd's RPC), ``VirshMonitor`` (a ``virsh qemu-monitor-command`` process per command) and
vmctl's own monitor on a second QMP socket of that QEMU (libvirt holds the first; the domain's
XML adds ``-qmp`` through libvirt's QEMU namespace). Calls are made in interleaved blocks, so
that drift in the machine touches every client alike; median and p99 per call.

Disk hotplug + unplug of a small qcow2, ``--rounds`` rounds each, taking turns: ``LibvirtVM``
(attachDeviceFlags / detachDeviceAlias) on the libvirt domain against vmctl's ``VM`` on its own
QEMU of the same spec.

Live migration of an idle guest between two network namespaces joined by a veth pair (two
"hosts"), over TCP, ``--migrations`` hops each, back and forth, taking turns: ``LibvirtVM.migrate``
(peer to peer between two private libvirtds, one in each namespace; timed from ``migrate`` until
``wait`` returns, which includes libvirt starting the target's QEMU) against vmctl's
``VM.migrate`` (QEMUs in the same namespaces; timed from ``launch_incoming`` of the target until
``wait`` returns, and from ``migrate`` alone). Every daemon, QEMU and namespace started here is
gone when the script ends.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import structlog

from vmctl import VM, VMSpec
from vmctl.libvirt import LibvirtMonitor, LibvirtVM, VirshMonitor
from vmctl.libvirt.domainxml import CONSOLE_LOG, domain_xml
from vmctl.qmp import QMPMonitor, connect
from vmctl.testing import READY_MARKER, TestGuest
from vmctl.testing.libvirtd import PrivateLibvirtd
from vmctl.vm.console import LogConsole
from vmctl.vm.process import qemu_binary

REPO = Path(__file__).resolve().parent.parent
CAPABILITIES_CACHE = REPO / ".cache" / "libvirt-capabilities"
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
BOOT_TIMEOUT = 120.0
BLOCKS = 5  # each QMP client's calls are made in this many blocks, taking turns
MIGRATE_TIMEOUT = 120.0
ADDRESSES = ("10.233.0.1", "10.233.0.2")  # of the two namespaces (each has its own addresses)


def spec_for(guest: TestGuest, name: str) -> VMSpec:
    """As integration/conftest.py's ``VMFactory.spec``."""
    return VMSpec(
        name=name, kernel=guest.kernel, initrd=guest.initrd, append=guest.append,
        accel="tcg", memory_mib=256, shell_serial=True,
    )  # fmt: skip


def with_second_qmp(xml: str, socket_path: Path) -> str:
    """``xml`` with a second QMP monitor on ``socket_path``, passed to QEMU through libvirt's QEMU namespace."""
    ET.register_namespace("qemu", QEMU_NS)
    domain = ET.fromstring(xml)
    commandline = ET.SubElement(domain, f"{{{QEMU_NS}}}commandline")
    for value in ("-qmp", f"unix:{socket_path},server=on,wait=off"):
        ET.SubElement(commandline, f"{{{QEMU_NS}}}arg", value=value)
    return ET.tostring(domain, encoding="unicode")


def wait_for_socket(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"QEMU made no socket at {path} in {timeout:g} s")
        time.sleep(0.05)


def time_calls(monitor: QMPMonitor, calls: int) -> list[float]:
    execute = monitor.execute
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        execute("query-status")
        times.append(time.perf_counter() - started)
    return times


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98]


def time_round(hotplug: Callable[..., object], unplug: Callable[[str], None], image: Path) -> float:
    started = time.perf_counter()
    hotplug(image, id="bench1")
    unplug("bench1")
    return time.perf_counter() - started


def measure_qmp(uri: str, name: str, own_socket: Path, calls: int, virsh_calls: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"vmctl, own socket": [], "LibvirtMonitor": [], "VirshMonitor": []}
    per_block = {"vmctl, own socket": calls // BLOCKS, "LibvirtMonitor": calls // BLOCKS}
    per_block["VirshMonitor"] = max(1, virsh_calls // BLOCKS)
    monitors: dict[str, QMPMonitor] = {}
    try:
        monitors["vmctl, own socket"] = connect(str(own_socket), timeout=10)
        monitors["LibvirtMonitor"] = LibvirtMonitor.open(uri, name)
        monitors["VirshMonitor"] = VirshMonitor(uri, name)
        for client, monitor in monitors.items():  # warm-up: the first calls fetch what is fetched once
            time_calls(monitor, 3 if client == "VirshMonitor" else 20)
        for _ in range(BLOCKS):
            for client, monitor in monitors.items():
                times[client] += time_calls(monitor, per_block[client])
    finally:
        for monitor in monitors.values():
            monitor.close()
    return times


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[str, str]]:
    """Two network namespaces joined by a veth pair, with ``ADDRESSES``; deleted on exit."""
    tag = uuid.uuid4().hex[:6]
    names = (f"vmctl-bench-lv{tag}-a", f"vmctl-bench-lv{tag}-b")
    links = (f"vla{tag}", f"vlb{tag}")
    made: list[str] = []
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
            made.append(name)
        a, b = names
        commands = [
            ["ip", "-n", a, "link", "add", links[0], "type", "veth", "peer", "name", links[1], "netns", b],
            *(
                ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", link]
                for ns, addr, link in zip(names, ADDRESSES, links, strict=True)
            ),
            *(["ip", "-n", ns, "link", "set", link, "up"] for ns, link in zip(names, links, strict=True)),
            *(["ip", "-n", ns, "link", "set", "lo", "up"] for ns in names),
        ]
        for command in commands:
            subprocess.run(command, check=True)
        yield a, b
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], check=False)


def measure_migration(guest: TestGuest, work: Path, hops: int) -> tuple[dict[str, list[float]], dict[str, list[int]]]:
    """Wall times of each driver's hops, and the downtimes (ms) each reported."""
    times: dict[str, list[float]] = {
        "LibvirtVM": [],
        "LibvirtVM, migrateToURI3 only": [],
        "vmctl VM, with launch_incoming": [],
        "vmctl VM, migrate only": [],
    }
    downtimes: dict[str, list[int]] = {"LibvirtVM": [], "vmctl VM": []}
    with two_hosts() as namespaces:
        daemons = [
            PrivateLibvirtd(
                work / f"libvirtd-{side}", netns=ns, listen_address=address, capabilities_cache=CAPABILITIES_CACHE
            )
            for side, ns, address in zip("ab", namespaces, ADDRESSES, strict=True)
        ]
        with daemons[0], daemons[1]:
            libvirt_dirs = [work / "mig-on-a", work / "mig-on-b"]
            for directory in libvirt_dirs:
                directory.mkdir()
            libvirt_vm = LibvirtVM.define(daemons[0].uri, spec_for(guest, "mig"), run_dir=libvirt_dirs[0])
            own: VM | None = None
            target: VM | None = None
            try:
                own = VM.launch(spec_for(guest, "vmig0"), run_dir=work / "vmig0", netns=namespaces[0])
                libvirt_vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
                own.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
                for hop in range(1, hops + 1):
                    there = hop % 2  # 1: a to b, 0: b to a
                    tcp_uri = daemons[there].tcp_uri
                    assert tcp_uri is not None
                    started = time.perf_counter()
                    migration = libvirt_vm.migrate(tcp_uri, target_run_dir=libvirt_dirs[there])
                    while migration.status == "active":  # until libvirt's blocking migrateToURI3 has returned
                        time.sleep(0.002)
                    returned = time.perf_counter()
                    result = migration.wait(MIGRATE_TIMEOUT)
                    times["LibvirtVM"].append(time.perf_counter() - started)
                    times["LibvirtVM, migrateToURI3 only"].append(returned - started)
                    downtimes["LibvirtVM"].append(result.downtime_ms)
                    moved = migration.target(daemons[there].uri)  # reached by its unix socket, from here
                    libvirt_vm.close()
                    libvirt_vm = moved

                    name = f"vmig{hop}"
                    started = time.perf_counter()
                    target = VM.launch_incoming(
                        own.migration_target_spec(name=name), run_dir=work / name, netns=namespaces[there],
                        inventory=own.inventory,
                    )  # fmt: skip
                    asked = time.perf_counter()
                    result = own.migrate(target, listen=(ADDRESSES[there], 4600 + hop)).wait(MIGRATE_TIMEOUT)
                    ended = time.perf_counter()
                    downtimes["vmctl VM"].append(result.downtime_ms)
                    times["vmctl VM, with launch_incoming"].append(ended - started)
                    times["vmctl VM, migrate only"].append(ended - asked)
                    own.close()
                    own, target = target, None
            finally:
                libvirt_vm.close()
                for vm in (own, target):
                    if vm is not None:
                        if not vm.has_exited:
                            vm.kill()
                        vm.close()
    return times, downtimes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=500, help="query-status calls through libvirtd and own socket")
    parser.add_argument("--virsh-calls", type=int, default=50, help="query-status calls through virsh")
    parser.add_argument("--rounds", type=int, default=20, help="disk hotplug+unplug rounds on each VM")
    parser.add_argument("--migrations", type=int, default=6, help="migration hops of each (0: none)")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    qemu = qemu_binary()
    if qemu is None or shutil.which("libvirtd") is None or shutil.which("virsh") is None:
        print("qemu-system-x86_64, libvirtd and virsh are required", file=sys.stderr)
        return 2
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    guest = TestGuest.ensure(os.environ.get("VMCTL_CACHE_DIR") or REPO / ".cache")
    CAPABILITIES_CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-libvirt-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    images = {}
    for which in ("libvirt", "vmctl"):
        images[which] = work / f"{which}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(images[which]), "64M"], check=True)
    try:
        with PrivateLibvirtd(work / "libvirtd", capabilities_cache=CAPABILITIES_CACHE) as daemon:
            own_vm = VM.launch(spec_for(guest, "own"), run_dir=work / "own")
            try:
                qmp_times, hotplug_times = run(args, daemon, guest, own_vm, images, work, qemu)
            finally:
                own_vm.kill()
                own_vm.close()
        migration = measure_migration(guest, work, args.migrations) if args.migrations > 0 else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, version, qmp_times, hotplug_times, migration)
    return 0


def run(
    args: argparse.Namespace,
    daemon: PrivateLibvirtd,
    guest: TestGuest,
    own_vm: VM,
    images: dict[str, Path],
    work: Path,
    qemu: str,
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    name = "lv"
    run_dir = work / name
    run_dir.mkdir()
    own_socket = run_dir / "own-qmp.sock"
    xml = with_second_qmp(domain_xml(spec_for(guest, name), run_dir=run_dir, emulator=qemu), own_socket)
    conn = daemon.connect()
    try:
        conn.createXML(xml, 0)  # transient: the daemon's stop() destroys it
        LogConsole(run_dir / CONSOLE_LOG).wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
        own_vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
        wait_for_socket(own_socket, 10)
        qmp_times = measure_qmp(daemon.uri, name, own_socket, args.calls, args.virsh_calls)
        hotplug_times: dict[str, list[float]] = {"LibvirtVM": [], "vmctl VM": []}
        with LibvirtVM.open(daemon.uri, name, run_dir=run_dir) as libvirt_vm:
            for _ in range(args.rounds):
                hotplug_times["LibvirtVM"].append(
                    time_round(libvirt_vm.hotplug_disk, libvirt_vm.unplug_disk, images["libvirt"])
                )
                hotplug_times["vmctl VM"].append(time_round(own_vm.hotplug_disk, own_vm.unplug_disk, images["vmctl"]))
    finally:
        conn.close()
    return qmp_times, hotplug_times


def report(
    args: argparse.Namespace,
    version: str,
    qmp_times: dict[str, list[float]],
    hotplug_times: dict[str, list[float]],
    migration: tuple[dict[str, list[float]], dict[str, list[int]]] | None,
) -> None:
    print(f"\n{version}; TCG test guests booted to READY; one run\n")
    print("query-status round trip, the same QEMU (a libvirt domain)\n")
    print(f"{'client':20} {'calls':>6} {'median ms':>10} {'p99 ms':>8} {'median / own':>13}")
    own = statistics.median(qmp_times["vmctl, own socket"])
    for client, times in qmp_times.items():
        median = statistics.median(times)
        print(f"{client:20} {len(times):6} {median * 1000:10.3f} {p99(times) * 1000:8.3f} {median / own:12.1f}x")
    print(f"\ndisk hotplug + unplug (qcow2, virtio-blk), {args.rounds} rounds each, taking turns\n")
    print(f"{'client':20} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for client, times in hotplug_times.items():
        low, high = min(times) * 1000, max(times) * 1000
        print(f"{client:20} {statistics.median(times) * 1000:10.1f} {low:8.1f} {high:8.1f}")
    ratio = statistics.median(hotplug_times["LibvirtVM"]) / statistics.median(hotplug_times["vmctl VM"])
    print(f"\nLibvirtVM / vmctl VM: {ratio:.2f}x")
    if migration is None:
        return
    migration_times, downtimes = migration
    print(f"\nlive migration of an idle 256 MiB guest, TCP between two namespaces, {args.migrations} hops each\n")
    print(f"{'driver':32} {'median ms':>10} {'min ms':>8} {'max ms':>8}")
    for driver, times in migration_times.items():
        low, high = min(times) * 1000, max(times) * 1000
        print(f"{driver:32} {statistics.median(times) * 1000:10.1f} {low:8.1f} {high:8.1f}")
    for driver, values in downtimes.items():
        print(f"downtime reported by {driver}: median {statistics.median(values):.0f} ms, max {max(values)} ms")
    libvirt = statistics.median(migration_times["LibvirtVM"])
    for driver in ("vmctl VM, with launch_incoming", "vmctl VM, migrate only"):
        print(f"LibvirtVM / {driver}: {libvirt / statistics.median(migration_times[driver]):.2f}x")


if __name__ == "__main__":
    sys.exit(main())
