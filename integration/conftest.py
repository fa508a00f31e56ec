from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmctl import VM, Domain, RunState, VMSpec, VMStatus
from vmctl.errors import QMPError, StaleState
from vmctl.libvirt import LibvirtVM
from vmctl.qmp import Monitor, connect
from vmctl.testing import READY_MARKER, TestGuest
from vmctl.testing.libvirtd import PrivateLibvirtd
from vmctl.vm.process import qemu_binary

REPO = Path(__file__).resolve().parent.parent
BOOT_TIMEOUT = 60.0
#: libvirt's probe of each QEMU, shared by the tests' private daemons (only the first one probes).
CAPABILITIES_CACHE = REPO / ".cache" / "libvirt-capabilities"

QEMU = qemu_binary()  # $VMCTL_QEMU selects another QEMU for the whole suite
_started: list[subprocess.Popen[bytes]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)
            callspec = getattr(item, "callspec", None)
            on_libvirt = callspec is not None and callspec.params.get("domains") == "libvirt"
            if item.path.name.startswith("test_libvirt") or on_libvirt:
                item.add_marker(pytest.mark.libvirt)
            # Guests boot and migrate under TCG: allow a slow machine more than the unit tests' 60 s.
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(180))


def _require_qemu() -> str:
    if QEMU is None:
        pytest.fail("qemu-system-x86_64 is not installed: run .ci/run or `make test`, which install it")
    return QEMU


class QemuProcess:
    """A bare QEMU (``-machine none``) whose QMP monitor is one end of a socketpair."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        ours, theirs = socket.socketpair()
        self.log_path = tmp_path / "qemu.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    _require_qemu(),
                    "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
                    "-chardev", f"socket,id=mon0,fd={theirs.fileno()}",
                    "-mon", "chardev=mon0,mode=control",
                    *extra,
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        theirs.close()
        _started.append(self.process)
        self.socket = ours

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)
        self.socket.close()


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuProcess]:
    process = QemuProcess(tmp_path)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def qmp(qemu: QemuProcess) -> Iterator[Monitor]:
    with connect(qemu.socket, name="qemu", timeout=10) as monitor:
        yield monitor


@pytest.fixture(scope="session")
def guest() -> TestGuest:
    return TestGuest.ensure(REPO / ".cache")


# In every run dir and namespace name this session creates, so that its leftover check (and
# cleanup) only ever touches its own QEMUs, never another test session's.
_RUN_DIR_MARK = f"vmctl-it{os.getpid()}-"


def make_image(path: Path, fmt: str, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), size], check=True)
    return path


def let_qemu_through(path: Path) -> None:
    """Let QEMU's unprivileged user search its way to run dirs below ``path``: pytest makes its
    tmp dirs closed (0700), and QEMU makes its sockets in its run dir."""
    for directory in (path, *path.parents):
        mode = stat.S_IMODE(directory.stat().st_mode)
        if not mode & stat.S_IXOTH:
            directory.chmod(mode | stat.S_IXOTH)


def taps_held(pid: int) -> set[str]:
    """The taps a process holds open (the kernel names each in its fd's fdinfo). Counting the
    host's taps instead would count those of any other VM on it (tests run in parallel); a tap
    no process holds is gone."""
    held = set()
    for info in Path(f"/proc/{pid}/fdinfo").iterdir():
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            held.update(re.findall(r"^iff:\s*(\S+)$", info.read_text(), re.MULTILINE))
    return held


class VMFactory:
    """Launches test-guest VMs and makes sure every one of them is gone after the test."""

    def __init__(self, guest: TestGuest, tmp_path: Path) -> None:
        self.guest = guest
        self.tmp_path = tmp_path
        self.vms: list[VM] = []
        let_qemu_through(tmp_path)

    def spec(self, name: str = "vm1", *, append: str = "", **overrides: object) -> VMSpec:
        fields: dict[str, object] = {
            "name": name,
            "kernel": self.guest.kernel,
            "initrd": self.guest.initrd,
            "append": f"{self.guest.append} {append}".strip(),
            "accel": "tcg",
            "memory_mib": 256,
            "shell_serial": True,
        }
        fields.update(overrides)
        return VMSpec(**fields)  # type: ignore[arg-type]

    def run_dir(self, name: str) -> Path:
        return self.tmp_path / f"{_RUN_DIR_MARK}{name}"

    def launch(self, spec: VMSpec | None = None, *, wait_ready: bool = True, **kwargs: object) -> VM:
        spec = spec or self.spec()
        vm = VM.launch(spec, run_dir=self.run_dir(spec.name), **kwargs)  # type: ignore[arg-type]
        self.vms.append(vm)
        if wait_ready:
            vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
        return vm

    def incoming(self, source: VM, name: str = "dst", **kwargs: object) -> VM:
        """A migration target for ``source``: its devices as they are now, waiting for the guest."""
        target = VM.launch_incoming(
            source.migration_target_spec(name=name),
            run_dir=self.run_dir(name),
            inventory=source.inventory,
            **kwargs,  # type: ignore[arg-type]
        )
        self.vms.append(target)
        return target

    def cleanup(self) -> None:
        for vm in self.vms:
            if not vm.has_exited:
                vm.kill()
            vm.close()


def running_side(vms: VMFactory, pair: list[Path], where: str) -> VM:
    """Attach both sides of a migration whose control plane died, the source first (it decides:
    it cancels a migration under way, or finds it completed and quits at ``clean_leftovers``),
    and return the one the guest runs on; the other QEMU must be gone, or waiting empty (then it
    is killed). A source that migrated away and quit is not attached (``StaleState``)."""
    sides = []
    for run_dir in pair:
        try:
            side = VM.attach(run_dir)
        except StaleState:
            continue
        vms.vms.append(side)
        side.clean_leftovers()
        assert side.leftovers == (), where
        sides.append(side)
    statuses = {side.name: _status(side) for side in sides}
    running = [side for side in sides if (status := statuses[side.name]) is not None and status.running]
    assert len(running) == 1, f"{where}: the guest runs on {[s.name for s in running]}; sides {statuses} of {pair}"
    for other in sides:
        status = statuses[other.name]
        if other is not running[0] and status is not None:  # never connected to, or never reached: empty
            assert status.run_state is RunState.INMIGRATE, f"{where}: {other.name} is {status}"
            other.kill()
    return running[0]


def _status(vm: VM) -> VMStatus | None:
    """The VM's status, or ``None`` once its QEMU is gone (it quits after migrating away)."""
    try:
        return vm.status()
    except QMPError:
        return None


@pytest.fixture
def vms(guest: TestGuest, tmp_path: Path) -> Iterator[VMFactory]:
    factory = VMFactory(guest, tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


class DomainFactory:
    """Launches test-guest VMs as ``Domain``s: vmctl's own (``VM``) or libvirt's (``LibvirtVM``,
    on a private libvirtd of the test's own), and makes sure every one of them is gone after."""

    def __init__(self, kind: str, vms: VMFactory) -> None:
        self.kind = kind
        self.vms = vms
        self.spec = vms.spec
        self.daemon: PrivateLibvirtd | None = None
        self.libvirt_vms: list[LibvirtVM] = []

    def launch(self, spec: VMSpec | None = None) -> Domain:
        spec = spec or self.spec()
        if self.kind == "vmctl":
            return self.vms.launch(spec)
        if self.daemon is None:
            self.daemon = PrivateLibvirtd(self.vms.tmp_path / "libvirtd", capabilities_cache=CAPABILITIES_CACHE).start()
        vm = LibvirtVM.define(self.daemon.uri, spec, run_dir=self.vms.run_dir(spec.name))
        self.libvirt_vms.append(vm)
        vm.console.wait_for(READY_MARKER, timeout=BOOT_TIMEOUT)
        return vm

    def cleanup(self) -> None:
        for vm in self.libvirt_vms:
            vm.close()
        if self.daemon is not None:
            self.daemon.stop()  # destroys what still runs, then reaps the daemon


@pytest.fixture(params=["vmctl", "libvirt"])
def domains(request: pytest.FixtureRequest, vms: VMFactory) -> Iterator[DomainFactory]:
    """The same test on a VM vmctl runs and on one libvirt runs."""
    factory = DomainFactory(request.param, vms)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def netns() -> Iterator[str]:
    """A network namespace of this test's own (deleted afterwards)."""
    name = f"{_RUN_DIR_MARK}{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


class TwoHosts:
    """Two network namespaces joined by a veth pair: two hosts with addresses a and b."""

    a_address = "10.232.0.1"
    b_address = "10.232.0.2"

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.a = f"{_RUN_DIR_MARK}a-{tag}"
        self.b = f"{_RUN_DIR_MARK}b-{tag}"
        self.a_link, self.b_link = f"va{tag}", f"vb{tag}"
        for namespace in (self.a, self.b):
            subprocess.run(["ip", "netns", "add", namespace], check=True)
        commands = [
            ["ip", "-n", self.a, "link", "add", self.a_link, "type", "veth",
             "peer", "name", self.b_link, "netns", self.b],
            ["ip", "-n", self.a, "addr", "add", f"{self.a_address}/24", "dev", self.a_link],
            ["ip", "-n", self.b, "addr", "add", f"{self.b_address}/24", "dev", self.b_link],
            ["ip", "-n", self.a, "link", "set", self.a_link, "up"],
            ["ip", "-n", self.b, "link", "set", self.b_link, "up"],
            ["ip", "-n", self.a, "link", "set", "lo", "up"],
            ["ip", "-n", self.b, "link", "set", "lo", "up"],
        ]  # fmt: skip
        for command in commands:
            subprocess.run(command, check=True)

    def cut(self) -> None:
        subprocess.run(["ip", "-n", self.a, "link", "set", self.a_link, "down"], check=True)

    def restore(self) -> None:
        subprocess.run(["ip", "-n", self.a, "link", "set", self.a_link, "up"], check=True)

    def remove(self) -> None:
        for namespace in (self.a, self.b):
            subprocess.run(["ip", "netns", "del", namespace], check=False)


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    hosts = TwoHosts()
    try:
        yield hosts
    finally:
        hosts.remove()


def _leftover_qemus(base: str) -> list[int]:
    """QEMU processes started by this test process (bare ones, or VMs in run directories under its
    ``base`` temporary directory: another xdist worker's VMs, under its own, are not ours)."""
    pids = [p.pid for p in _started if p.poll() is None]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmdline and _RUN_DIR_MARK.encode() in cmdline and base.encode() in cmdline:
            pids.append(int(entry.name))
    return sorted(set(pids))


#: QEMUs that pytest-xdist's workers found left running, reported to the controlling process
#: (a worker's own exit status does not reach the run's).
_workers_leftovers: list[int] = []


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook
def pytest_testnodedown(node: Any, error: object) -> None:
    _workers_leftovers.extend(getattr(node, "workeroutput", {}).get("leftover_qemus", ()))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    alive = _leftover_qemus(str(session.config._tmp_path_factory.getbasetemp()))  # type: ignore[attr-defined]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:  # an xdist worker: its controller fails the run
        worker_output["leftover_qemus"] = alive
    alive += _workers_leftovers
    if alive:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: QEMU processes left running after the tests: {alive}")
