"""Starting QEMU for a spec, and finding the one a run dir describes: the run dir made ready,
the command line with the files passed by fd, the monitor connected, or a clear refusal.

``VM.launch`` and ``VM.attach`` are built on these; what a VM does once it has a monitor is
``vmctl.vm.machine``'s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import attrs
import tenacity

from vmctl.errors import ConnectError, LaunchError, StaleState
from vmctl.model import Accelerator, Inventory, VMSpec
from vmctl.model.names import (
    AGENT_SOCKET,
    LOG_FILE,
    MASTER_KEY_TAG,
    QMP_SOCKET,
    SHELL_SOCKET,
    TOOLS_SOCKET,
    secret_object_id,
)
from vmctl.model.pcie import Controller
from vmctl.qmp import Monitor, connect
from vmctl.qmp.timeouts import deadline
from vmctl.vm.firmware import prepare_firmware
from vmctl.vm.isolation import Isolation
from vmctl.vm.logtail import tail
from vmctl.vm.passing import Fd, opened
from vmctl.vm.process import QemuProcess
from vmctl.vm.process import qemu_binary as default_qemu
from vmctl.vm.secrets import create_master_key, master_key_fd, secret_object
from vmctl.vm.statefile import STATE_FILE, VMRecord, read_record

#: How long attach waits, after its connection fails, for a QEMU that may be exiting.
EXIT_GRACE = 1.0


def default_accelerator() -> Accelerator:
    """KVM when /dev/kvm is usable, else TCG."""
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


@attrs.frozen(kw_only=True)
class Started:
    """A QEMU just started for a spec, its monitor connected, the guest not yet running."""

    directory: Path
    process: QemuProcess
    qmp: Monitor
    record: VMRecord
    accel: Accelerator


def start(
    spec: VMSpec,
    run_dir: str | os.PathLike[str],
    *,
    qemu_binary: str | None,
    timeout: float,
    incoming: bool,
    netns: str | None,
    inventory: Inventory | None,
    isolation: Isolation | None = None,
) -> Started:
    """Start QEMU for ``spec`` (``-S``) in ``run_dir`` and connect to its monitor within
    ``timeout``; a QEMU that fails to start is reaped and its own message raised (``LaunchError``)."""
    directory = Path(run_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    _refuse_live_vm(directory)
    binary = qemu_binary or default_qemu()
    if binary is None:
        raise LaunchError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86, or set VMCTL_QEMU)")
    for leftover in (QMP_SOCKET, TOOLS_SOCKET, SHELL_SOCKET, AGENT_SOCKET, STATE_FILE):
        with contextlib.suppress(FileNotFoundError):
            (directory / leftover).unlink()
    confinement = (isolation or Isolation.from_env()).confine(spec.run_as, vm=spec.name)
    with contextlib.closing(confinement):  # QEMU holds its own copy of the lease from its start
        user = confinement.user
        files = spec.passed_files(directory)
        if user is not None:  # its run dir, and the files QEMU reopens itself, must be in its reach
            user.share_run_dir(directory)
            user.check_reachable(directory, what="the run dir")
            for file in files:
                if file.read_by_qemu:
                    user.check_readable(file.path)
        prepare_firmware(spec, directory)
        accel = spec.accel or default_accelerator()
        log_path = directory / LOG_FILE
        ends = deadline(timeout)
        key = create_master_key(directory)
        objects = [
            secret_object(secret_object_id(disk.id), disk.encryption, key)
            for disk in spec.disks
            if disk.encryption is not None
        ]
        with opened(files) as passed, contextlib.closing(Fd(master_key_fd(key))) as key_fd:
            passed = {**passed, MASTER_KEY_TAG: key_fd.fd}
            argv = spec.command_line(qemu_binary=binary, run_dir=directory, accel=accel, passed=passed, objects=objects)
            if incoming:
                argv += ["-incoming", "defer"]
            argv = [*confinement.prefix, *argv]
            if netns is not None:
                argv = ["ip", "netns", "exec", netns, *argv]
            try:
                process = QemuProcess.start(argv, log_path=log_path, pass_fds=[*passed.values(), *confinement.pass_fds])
            except OSError as exc:
                raise LaunchError(f"cannot run {binary}: {exc}") from exc
    try:
        socket_path = _wait_for_socket(process, directory / QMP_SOCKET, ends, log_path)
        try:
            qmp = connect(str(socket_path), name=spec.name, timeout=max(0.1, ends - time.monotonic()))
        except ConnectError as exc:
            _raise_if_exited(process, log_path)
            raise LaunchError(f"cannot connect to QEMU's monitor: {exc}", log=tail(log_path)) from exc
        record = VMRecord(
            pid=process.pid,
            start_time=process.start_time,
            qmp_socket=str(socket_path),
            spec=spec,
            inventory=_launched_inventory(spec, inventory),
        )
    except BaseException:
        reap(process)
        raise
    return Started(directory=directory, process=process, qmp=qmp, record=record, accel=accel)


def reap(process: QemuProcess) -> None:
    """End a QEMU that will not become a VM (SIGKILL, then wait for it)."""
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    process.close()


def connect_to_record(directory: Path, *, timeout: float) -> tuple[VMRecord, QemuProcess, Monitor]:
    """The VM ``directory`` records, its process adopted and its monitor connected; ``StaleState``
    when it is gone (or went as it was reached)."""
    record = read_record(directory)
    process = QemuProcess.adopt(record.pid, record.start_time)
    try:
        qmp = connect(record.qmp_socket, name=record.spec.name, timeout=timeout)
    except ConnectError as exc:
        exited = process.wait(EXIT_GRACE)  # it may be on its way out (a failed incoming migration)
        process.close()
        if exited is not None:
            raise exited_while_attached(record, exited) from exc
        raise ConnectError(
            f"{exc} (is another control plane still connected? QEMU serves one monitor client at a time)"
        ) from exc
    return record, process, qmp


def exited_while_attached(record: VMRecord, exited: object) -> StaleState:
    return StaleState(f"{record.spec.name}: QEMU (pid {record.pid}) exited as it was attached: {exited}")


def _launched_inventory(spec: VMSpec, inventory: Inventory | None) -> Inventory:
    """The spec says which disks, NICs and ports this QEMU has; an inventory passed in (from a
    migration source) brings what was hotplugged besides them."""
    layout = spec.layout()
    return attrs.evolve(
        inventory or Inventory(),
        disks=layout.disks,
        nics=layout.nics,
        root_ports=layout.root_ports,
        controllers=_merged(layout.controllers, inventory.controllers if inventory else ()),
    )


def _merged(launched: tuple[Controller, ...], handed_over: tuple[Controller, ...]) -> tuple[Controller, ...]:
    """The controllers on the command line, then those a migration source added at run time."""
    ids = {c.id for c in launched}
    return launched + tuple(c for c in handed_over if c.id not in ids)


def _refuse_live_vm(run_dir: Path) -> None:
    try:
        record = read_record(run_dir)
    except StaleState:
        return
    try:
        QemuProcess.adopt(record.pid, record.start_time).close()
    except StaleState:
        return
    raise LaunchError(f"{run_dir} belongs to a running VM (pid {record.pid}); attach to it or choose another run_dir")


def _wait_for_socket(process: QemuProcess, path: Path, ends: float, log_path: Path) -> Path:
    def ready() -> bool:
        _raise_if_exited(process, log_path)
        return path.exists()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_before_delay(max(0.0, ends - time.monotonic())),
        wait=tenacity.wait_exponential(multiplier=0.002, max=0.05),
        retry=tenacity.retry_if_result(lambda found: not found),
    )
    try:
        retrying(ready)
        return path
    except tenacity.RetryError:
        raise LaunchError("QEMU did not create its monitor socket in time", log=tail(log_path)) from None


def _raise_if_exited(process: QemuProcess, log_path: Path) -> None:
    status = process.poll()
    if status is not None:
        raise LaunchError(f"QEMU exited during start-up ({status})", log=tail(log_path))
