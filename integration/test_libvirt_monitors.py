"""QMP through libvirt: LibvirtMonitor (libvirtd's RPC) and VirshMonitor (the virsh CLI) on a real
private libvirtd running the test guest."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from integration.conftest import BOOT_TIMEOUT, CAPABILITIES_CACHE, make_image
from vmctl import DiskSpec, VMSpec
from vmctl.errors import CommandNotFound, CommandTimeout, ConnectionLost, DeviceNotFound, GenericError, InvalidArgument
from vmctl.libvirt import DomainNotFound, LibvirtMonitor, VirshMonitor
from vmctl.libvirt.domainxml import domain_xml
from vmctl.ops.balloon import balloon_bytes
from vmctl.ops.nodes import block_nodes
from vmctl.qmp import QMPMonitor
from vmctl.testing import READY_MARKER, TestGuest
from vmctl.testing.libvirtd import PrivateLibvirtd
from vmctl.vm.process import qemu_binary

MONITORS = ["libvirt", "virsh"]


class Booted:
    """One private libvirtd running one domain of the test guest, shared by the module's tests."""

    def __init__(self, daemon: PrivateLibvirtd, domain: Any, run_dir: Path) -> None:
        self.daemon = daemon
        self.domain = domain
        self.run_dir = run_dir
        self.name = str(domain.name())

    def qemu_pid(self) -> int:
        return int((self.daemon.private("/run/libvirt/qemu") / f"{self.name}.pid").read_text())


@pytest.fixture(scope="module")
def booted(guest: TestGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    root = tmp_path_factory.mktemp("libvirt-monitors")
    run_dir = root / "vm"
    run_dir.mkdir()
    image = make_image(root / "data.qcow2", "qcow2")
    spec = VMSpec(
        name="mon1", kernel=guest.kernel, initrd=guest.initrd, append=guest.append, balloon=True,
        disks=[DiskSpec(id="data", path=image)],
    )  # fmt: skip
    with PrivateLibvirtd(root / "daemon", capabilities_cache=CAPABILITIES_CACHE) as daemon:
        conn = daemon.connect()
        domain = conn.createXML(domain_xml(spec, run_dir=run_dir, emulator=str(qemu_binary())), 0)
        console = run_dir / "console.log"
        deadline = time.monotonic() + BOOT_TIMEOUT
        while READY_MARKER not in (console.read_text(errors="replace") if console.exists() else ""):
            assert time.monotonic() < deadline, "the test guest did not boot under libvirt"
            time.sleep(0.1)
        yield Booted(daemon, domain, run_dir)
        conn.close()


@pytest.fixture(params=MONITORS)
def monitor(request: pytest.FixtureRequest, booted: Booted) -> Iterator[QMPMonitor]:
    opened: QMPMonitor
    if request.param == "libvirt":
        opened = LibvirtMonitor.open(booted.daemon.uri, booted.name)
    else:
        opened = VirshMonitor(booted.daemon.uri, booted.name)
    try:
        yield opened
    finally:
        opened.close()


def test_queries_version_commands_and_schema_come_through(monitor: QMPMonitor) -> None:
    assert monitor.version.major >= 7
    assert monitor.execute("query-status")["status"] == "running"
    assert monitor.supports("device_add") and not monitor.supports("no-such-thing")
    assert monitor.schema.has_argument("blockdev-add", "node-name")


def test_qemus_errors_come_through_typed(monitor: QMPMonitor) -> None:
    with pytest.raises(CommandNotFound):
        monitor.execute("no-such-command")
    with pytest.raises(DeviceNotFound, match="missing0"):
        monitor.execute("device_del", {"id": "missing0"})
    with pytest.raises(GenericError):
        monitor.execute("closefd", {"fdname": "never-passed"})


def test_read_only_ops_run_unchanged(monitor: QMPMonitor, booted: Booted) -> None:
    files = [node["file"] for node in block_nodes(monitor).values()]
    assert str(booted.run_dir.parent / "data.qcow2") in files
    assert balloon_bytes(monitor) == 256 * 1024 * 1024
    assert [cpu["cpu-index"] for cpu in monitor.execute("query-cpus-fast")] == [0]


def test_stop_and_resume_through_libvirt_arrive_within_a_second(monitor: QMPMonitor, booted: Booted) -> None:
    with monitor.events("STOP", "RESUME") as events:
        asked = time.monotonic()
        booted.domain.suspend()
        assert events.get(1.0).name == "STOP"
        booted.domain.resume()
        assert events.get(1.0).name == "RESUME"
        assert time.monotonic() - asked < 2.0
    assert monitor.execute("query-status")["status"] == "running"


def test_one_fd_passes_with_a_command_and_qemu_holds_it(monitor: QMPMonitor) -> None:
    read_end, write_end = os.pipe()
    try:
        monitor.execute("getfd", {"fdname": "vmctl-pipe"}, fds=[write_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    monitor.execute("closefd", {"fdname": "vmctl-pipe"})
    with pytest.raises(GenericError, match="vmctl-pipe"):
        monitor.execute("closefd", {"fdname": "vmctl-pipe"})
    with pytest.raises(InvalidArgument, match="at most 1"):
        monitor.execute("getfd", {"fdname": "x"}, fds=[0, 1])


def test_a_stopped_qemu_gives_command_timeout_in_bounded_time_and_the_monitor_recovers(
    monitor: QMPMonitor, booted: Booted
) -> None:
    pid = booted.qemu_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(CommandTimeout):
            monitor.execute("query-status", timeout=1.0)
        assert time.monotonic() - started < 3.0
    finally:
        os.kill(pid, signal.SIGCONT)
    deadline = time.monotonic() + 30
    while True:  # libvirt holds its job until QEMU answered the late command
        try:
            assert monitor.execute("query-status", timeout=5.0)["running"] is True
            break
        except CommandTimeout:
            assert time.monotonic() < deadline


def test_an_unknown_domain_is_domain_not_found(booted: Booted) -> None:
    with pytest.raises(DomainNotFound):
        LibvirtMonitor.open(booted.daemon.uri, "no-such-domain")
    with pytest.raises(DomainNotFound):
        VirshMonitor(booted.daemon.uri, "no-such-domain")


def test_the_cli_runs_a_command_through_libvirt_and_through_virsh(booted: Booted) -> None:
    for through in ([], ["--virsh"]):
        done = subprocess.run(
            [sys.executable, "-m", "vmctl.cli", "qmp", "--libvirt", booted.daemon.uri, *through, booted.name,
             "query-status"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert '"running"' in done.stdout


def test_the_cli_event_tail_prints_a_stop_through_libvirt(booted: Booted) -> None:
    tail = subprocess.Popen(
        [sys.executable, "-m", "vmctl.cli", "events", "--libvirt", booted.daemon.uri, booted.name],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()
    assert tail.stdout is not None

    def read() -> None:
        for line in tail.stdout or ():
            lines.put(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 30
        while True:  # until the tail has registered (Python's start-up takes most of a second)
            booted.domain.suspend()
            booted.domain.resume()
            try:
                line = json.loads(lines.get(timeout=0.5))
                break
            except queue.Empty:
                assert tail.poll() is None and time.monotonic() < deadline
        # The tail may have registered between the two calls and so print a lone RESUME first;
        # once it prints anything it is registered, and a pause now shows as STOP then RESUME.
        if line["event"] != "STOP":
            assert line["event"] == "RESUME", line
            booted.domain.suspend()
            booted.domain.resume()
            line = json.loads(lines.get(timeout=5))
        assert line["event"] == "STOP"
        assert json.loads(lines.get(timeout=5))["event"] == "RESUME"
    finally:
        tail.terminate()
        tail.wait(10)
        reader.join(10)
        tail.stdout.close()


def test_a_destroyed_domain_fails_waiting_subscribers_at_once(guest: TestGuest, booted: Booted) -> None:
    spec = VMSpec(name="mon-doomed", kernel=guest.kernel, initrd=guest.initrd, append=guest.append)
    run_dir = booted.run_dir.parent / "doomed"
    run_dir.mkdir()
    conn = booted.daemon.connect()
    domain = conn.createXML(domain_xml(spec, run_dir=run_dir, emulator=str(qemu_binary())), 0)
    monitor = LibvirtMonitor.open(booted.daemon.uri, "mon-doomed")
    try:
        with monitor.events("RESUME") as events:
            domain.destroy()
            started = time.monotonic()
            with pytest.raises(ConnectionLost):
                events.get(30.0)
            assert time.monotonic() - started < 5.0
        with pytest.raises(ConnectionLost):
            monitor.execute("query-status")
    finally:
        monitor.close()
        conn.close()
