"""The VM object a control plane holds: launch or attach, lifecycle, resets, crash detection."""

from __future__ import annotations

import collections
import contextlib
import enum
import os
import select
import shutil
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import structlog
import tenacity

from vmctl.console import Console
from vmctl.errors import (
    AbnormalExit,
    CommandError,
    ConnectError,
    LaunchError,
    QMPError,
    StaleState,
    StateError,
    WaitTimeout,
)
from vmctl.model import Accelerator, Inventory, VMSpec
from vmctl.model.names import CONSOLE_CHARDEV, LOG_FILE, QMP_SOCKET, SHELL_SOCKET
from vmctl.ops import disks as disk_ops
from vmctl.ops import nbd as nbd_ops
from vmctl.ops.blockjobs import JobProgress, query_jobs
from vmctl.ops.devices import pci_address
from vmctl.process import ExitStatus, QemuProcess
from vmctl.qmp import Event, Monitor, connect
from vmctl.state import STATE_FILE, VMState, read_state, write_state
from vmctl.vm_blocks import BlockMethods
from vmctl.vm_devices import DeviceMethods
from vmctl.vm_migration import MigrationMethods

log = structlog.get_logger(__name__)

_LOG_TAIL_LINES = 30
# A guest-side reset this soon after another one is the firmware finishing that reset.
_RESET_FOLLOW_UP = 1.0


class RunState(enum.Enum):
    """QEMU's run states (QAPI ``RunState``)."""

    DEBUG = "debug"
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"


@attrs.frozen(kw_only=True)
class VMStatus:
    run_state: RunState
    running: bool

    @classmethod
    def from_qmp(cls, status: dict[str, Any]) -> VMStatus:
        return cls(run_state=RunState(status["status"]), running=bool(status["running"]))


@attrs.frozen(kw_only=True)
class ResetEvent:
    """A RESET, classified: ``expected`` when vmctl asked for it (``vm.reset()``)."""

    expected: bool
    guest: bool
    reason: str
    timestamp: float


@attrs.frozen(kw_only=True)
class ShutdownEvent:
    guest: bool
    reason: str
    timestamp: float


class ShutdownMethod(enum.Enum):
    POWERDOWN = "powerdown"  # the guest powered off after an ACPI power button press
    QUIT = "quit"  # QEMU quit on a QMP quit
    TERMINATE = "terminate"  # QEMU exited on SIGTERM
    KILL = "kill"  # QEMU was killed with SIGKILL
    ALREADY_EXITED = "already-exited"


@attrs.frozen(kw_only=True)
class ShutdownResult:
    method: ShutdownMethod
    exit: ExitStatus
    seconds: float


def default_accelerator() -> Accelerator:
    """KVM when /dev/kvm is usable, else TCG."""
    return "kvm" if os.access("/dev/kvm", os.R_OK | os.W_OK) else "tcg"


class VM(DeviceMethods, BlockMethods, MigrationMethods):
    """A running QEMU. Get one with :meth:`launch` or :meth:`attach`; ``close()`` detaches."""

    def __init__(self, *, run_dir: Path, state: VMState, process: QemuProcess, qmp: Monitor) -> None:
        self.run_dir = run_dir
        self.spec = state.spec
        self.name = state.spec.name
        self.process = process
        self.qmp = qmp
        self._inventory = state.inventory
        self._log = log.bind(vm=self.name)
        self._lock = threading.Lock()
        self._ops_lock = threading.RLock()  # one device operation at a time keeps the inventory true
        self._expected_resets = 0
        self._expected_exit = False
        self._closed = False
        self._exited = threading.Event()
        self._monitor_gone = threading.Event()
        self._exit_status: ExitStatus | None = None
        self._crash: AbnormalExit | None = None
        self.resets: collections.deque[ResetEvent] = collections.deque(maxlen=100)
        self._callbacks: dict[str, tuple[Callable[[Any], Any], ...]] = {
            "unexpected_reset": (),
            "shutdown": (),
            "panic": (),
            "crash": (),
        }
        self._console = Console(qmp, CONSOLE_CHARDEV) if state.spec.serial_console else None
        self._nbd_address: nbd_ops.NbdAddress | None = None
        self._exports: dict[str, nbd_ops.Export] = {}
        self.leftover_jobs: list[JobProgress] = []
        self._watch_wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        qmp.on_event(self._on_reset, "RESET")
        qmp.on_event(self._on_shutdown, "SHUTDOWN")
        qmp.on_event(self._on_panic, "GUEST_PANICKED")
        qmp.on_disconnect(self._on_monitor_gone)
        self._watcher = threading.Thread(target=self._watch, name=f"vmctl-watch-{self.name}", daemon=True)
        self._watcher.start()

    # -- launch and attach ----------------------------------------------------------------

    @classmethod
    def launch(
        cls,
        spec: VMSpec,
        *,
        run_dir: str | os.PathLike[str],
        qemu_binary: str | None = None,
        timeout: float = 30.0,
        paused: bool = False,
        incoming: bool = False,
        netns: str | None = None,
        inventory: Inventory | None = None,
    ) -> VM:
        """Start QEMU for ``spec`` with its monitor, log, pidfile and state file in ``run_dir``.

        QEMU starts with ``-S``; once the monitor is connected and vmctl listens for its events,
        the guest is started (unless ``paused``). A QEMU that fails to start raises ``LaunchError``
        with QEMU's own message. ``incoming`` waits for a migration (see ``launch_incoming``);
        ``netns`` runs QEMU in that network namespace (``ip netns exec``), as on another host.
        """
        directory = Path(run_dir).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        _refuse_live_vm(directory)
        binary = qemu_binary or shutil.which("qemu-system-x86_64")
        if binary is None:
            raise LaunchError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
        for leftover in (QMP_SOCKET, SHELL_SOCKET, STATE_FILE):
            with contextlib.suppress(FileNotFoundError):
                (directory / leftover).unlink()
        accel = spec.accel or default_accelerator()
        argv = spec.command_line(qemu_binary=binary, run_dir=directory, accel=accel)
        if incoming:
            argv += ["-incoming", "defer"]
        if netns is not None:
            argv = ["ip", "netns", "exec", netns, *argv]
        log_path = directory / LOG_FILE
        log_path.write_bytes(b"")
        deadline = time.monotonic() + timeout
        try:
            process = QemuProcess.start(argv, log_path=log_path)
        except OSError as exc:
            raise LaunchError(f"cannot run {binary}: {exc}") from exc
        bound = log.bind(vm=spec.name)
        try:
            socket_path = _wait_for_socket(process, directory / QMP_SOCKET, deadline, log_path)
            try:
                qmp = connect(str(socket_path), name=spec.name, timeout=max(0.1, deadline - time.monotonic()))
            except ConnectError as exc:
                _raise_if_exited(process, log_path)
                raise LaunchError(f"cannot connect to QEMU's monitor: {exc}", log=_tail(log_path)) from exc
            state = VMState(
                pid=process.pid,
                start_time=process.start_time,
                qmp_socket=str(socket_path),
                spec=spec,
                # The spec says which disks and NICs this QEMU has; an inventory passed in (from a
                # migration source) brings what was hotplugged besides them.
                inventory=attrs.evolve(inventory or Inventory(), disks=spec.disks, nics=spec.nics),
            )
            vm = cls(run_dir=directory, state=state, process=process, qmp=qmp)
        except BaseException:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
            process.close()
            raise
        try:
            vm._pin_pci_addresses()
            for disk in vm._inventory.disks:  # I/O limits are not -device properties: set them now
                if disk.throttle is not None:
                    disk_ops.set_throttle(vm.qmp, disk_id=disk.id, throttle=disk.throttle, bus=disk.bus)
            vm._save_state()
            if not paused and not incoming:
                vm.qmp.execute("cont")
        except BaseException:
            vm.kill()
            vm.close()
            raise
        bound.info("vm.launched", pid=process.pid, accel=accel, run_dir=str(directory))
        return vm

    @classmethod
    def launch_incoming(
        cls,
        spec: VMSpec,
        *,
        run_dir: str | os.PathLike[str],
        netns: str | None = None,
        inventory: Inventory | None = None,
        qemu_binary: str | None = None,
        timeout: float = 30.0,
    ) -> VM:
        """Start QEMU waiting for an incoming migration (``-incoming defer``); ``vm.migrate(this)``
        then tells it where to listen. Build ``spec`` with ``source.migration_target_spec()``."""
        return cls.launch(
            spec,
            run_dir=run_dir,
            qemu_binary=qemu_binary,
            timeout=timeout,
            incoming=True,
            netns=netns,
            inventory=inventory,
        )

    @classmethod
    def attach(cls, run_dir: str | os.PathLike[str], *, timeout: float = 10.0) -> VM:
        """Reconnect to the VM described by ``run_dir`` (after a control-plane restart).

        Raises ``StaleState`` when that VM is gone or its pid now names another process.
        """
        directory = Path(run_dir).resolve()
        state = read_state(directory)
        process = QemuProcess.adopt(state.pid, state.start_time)
        try:
            qmp = connect(state.qmp_socket, name=state.spec.name, timeout=timeout)
        except ConnectError as exc:
            process.close()
            raise ConnectError(
                f"{exc} (is another control plane still connected? QEMU serves one monitor client at a time)"
            ) from exc
        vm = cls(run_dir=directory, state=state, process=process, qmp=qmp)
        bound = log.bind(vm=vm.name)
        bound.info("vm.attached", pid=process.pid, run_dir=str(directory))
        # Block jobs a crashed control plane left behind are QEMU's still: report them.
        vm.leftover_jobs = query_jobs(qmp)
        for job in vm.leftover_jobs:
            bound.warning("vm.leftover_block_job", job=job.id, type=job.type, status=job.status, error=job.error)
        return vm

    def close(self) -> None:
        """Detach: stop watching and close the monitor. The VM keeps running (see ``attach``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        os.eventfd_write(self._watch_wake, 1)
        if self._watcher is not threading.current_thread():
            self._watcher.join(2.0)
        self.qmp.close()
        self.process.close()
        os.close(self._watch_wake)

    # -- state --------------------------------------------------------------------------------

    def _pin_pci_addresses(self) -> None:
        """Record where QEMU put the spec's PCI devices, so a migration target can match it."""
        disks = tuple(
            d if d.pci_addr or d.bus != "virtio-blk" else attrs.evolve(d, pci_addr=pci_address(self.qmp, d.id))
            for d in self._inventory.disks
        )
        nics = tuple(
            n if n.pci_addr else attrs.evolve(n, pci_addr=pci_address(self.qmp, n.id)) for n in self._inventory.nics
        )
        self._inventory = attrs.evolve(self._inventory, disks=disks, nics=nics)

    def _save_state(self) -> None:
        write_state(
            self.run_dir,
            VMState(
                pid=self.process.pid,
                start_time=self.process.start_time,
                qmp_socket=str(self.run_dir / QMP_SOCKET),
                spec=self.spec,
                inventory=self._inventory,
            ),
        )

    def status(self) -> VMStatus:
        return VMStatus.from_qmp(self.qmp.execute("query-status"))

    @property
    def console(self) -> Console:
        if self._console is None:
            raise StateError(f"{self.name} has no serial console (spec.serial_console is off)")
        return self._console

    @property
    def pid(self) -> int:
        return self.process.pid

    # -- lifecycle ----------------------------------------------------------------------------

    def pause(self) -> None:
        self.qmp.execute("stop")
        self._log.info("vm.paused")

    def resume(self) -> None:
        self.qmp.execute("cont")
        self._log.info("vm.resumed")

    def reset(self) -> None:
        """A hard reset; its RESET event is classified as expected."""
        with self._lock:
            self._expected_resets += 1  # registered before the command: the event may beat the reply
        try:
            self.qmp.execute("system_reset")
        except CommandError:
            with self._lock:
                self._expected_resets -= 1
            raise
        self._log.info("vm.reset")

    def kill(self, *, timeout: float = 10.0) -> ExitStatus:
        """SIGKILL QEMU and wait for it to go (an expected exit, not a crash)."""
        self._expected_exit = True
        self.process.send_signal(signal.SIGKILL)
        status = self.process.wait(timeout)
        if status is None:
            raise WaitTimeout(f"{self.name}: QEMU (pid {self.pid}) did not die within {timeout:g}s of SIGKILL")
        self._exited.wait(1.0)
        self._log.info("vm.killed", exit=str(status))
        return status

    def wait(self, timeout: float) -> ExitStatus:
        """Wait for QEMU to exit. Raises ``AbnormalExit`` if it crashed, ``WaitTimeout`` if it still runs."""
        if not self._exited.wait(timeout):
            raise WaitTimeout(f"{self.name}: QEMU still runs after {timeout:g}s")
        if self._crash is not None:
            raise self._crash
        assert self._exit_status is not None
        return self._exit_status

    @property
    def has_exited(self) -> bool:
        return self._exited.is_set()

    def shutdown(self, timeout: float = 30.0, *, step_timeout: float = 5.0) -> ShutdownResult:
        """Shut down, escalating: ACPI powerdown (``timeout``), then quit, SIGTERM, SIGKILL
        (``step_timeout`` each). Returns how it ended."""
        started = time.monotonic()
        if self.process.poll() is not None:
            return self._result(ShutdownMethod.ALREADY_EXITED, started)
        self._expected_exit = True
        if self._powerdown(timeout, step_timeout):
            return self._result(ShutdownMethod.POWERDOWN, started)
        with contextlib.suppress(QMPError):
            self.qmp.execute("quit", timeout=step_timeout)
        if self.process.wait(step_timeout) is not None:
            return self._result(ShutdownMethod.QUIT, started)
        self.process.send_signal(signal.SIGTERM)
        if self.process.wait(step_timeout) is not None:
            return self._result(ShutdownMethod.TERMINATE, started)
        self.process.send_signal(signal.SIGKILL)
        if self.process.wait(step_timeout) is not None:
            return self._result(ShutdownMethod.KILL, started)
        raise WaitTimeout(f"{self.name}: QEMU (pid {self.pid}) survived SIGKILL for {step_timeout:g}s")

    def _powerdown(self, timeout: float, step_timeout: float) -> bool:
        """Press the power button; True if the guest powered off (QEMU then exits, or with
        ``-no-shutdown`` is quit here)."""
        try:
            with self.qmp.events("SHUTDOWN") as shutdown_events:
                self.qmp.execute("system_powerdown", timeout=step_timeout)
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if self.process.wait(0.05) is not None:
                        return True
                    if shutdown_events.get_nowait() is not None:
                        break
                else:
                    self._log.info("vm.powerdown_ignored", timeout=timeout)
                    return False
        except QMPError:
            return self.process.poll() is not None
        # The guest powered off but QEMU stays (-no-shutdown): finish with quit.
        with contextlib.suppress(QMPError):
            self.qmp.execute("quit", timeout=step_timeout)
        return self.process.wait(step_timeout) is not None

    def _result(self, method: ShutdownMethod, started: float) -> ShutdownResult:
        status = self.process.poll()
        assert status is not None
        self._exited.wait(1.0)
        self._log.info("vm.shutdown", method=method.value, exit=str(status))
        return ShutdownResult(method=method, exit=status, seconds=time.monotonic() - started)

    # -- events and callbacks -----------------------------------------------------------------

    def on_unexpected_reset(self, callback: Callable[[ResetEvent], Any]) -> Callable[[], None]:
        return self._register("unexpected_reset", callback)

    def on_shutdown(self, callback: Callable[[ShutdownEvent], Any]) -> Callable[[], None]:
        return self._register("shutdown", callback)

    def on_panic(self, callback: Callable[[Event], Any]) -> Callable[[], None]:
        return self._register("panic", callback)

    def on_crash(self, callback: Callable[[AbnormalExit], Any]) -> Callable[[], None]:
        """Called (off the QMP reader thread) when QEMU exits abnormally or its monitor is lost."""
        return self._register("crash", callback)

    def _register(self, kind: str, callback: Callable[[Any], Any]) -> Callable[[], None]:
        with self._lock:
            self._callbacks[kind] = (*self._callbacks[kind], callback)

        def unregister() -> None:
            with self._lock:
                self._callbacks[kind] = tuple(c for c in self._callbacks[kind] if c is not callback)

        return unregister

    def _notify(self, kind: str, value: Any) -> None:
        for callback in self._callbacks[kind]:
            try:
                callback(value)
            except Exception:
                self._log.exception("vm.callback_failed", kind=kind)

    def _on_reset(self, event: Event) -> None:
        guest = bool(event.data.get("guest", True))
        previous = self.resets[-1] if self.resets else None
        if guest and previous is not None and event.timestamp - previous.timestamp < _RESET_FOLLOW_UP:
            # SeaBIOS answers a reset with a hard reset of its own a few milliseconds later:
            # that is the tail of the reset just classified, not a new one.
            self._log.debug("vm.reset_follow_up", reason=event.data.get("reason"))
            return
        with self._lock:
            expected = not guest and self._expected_resets > 0
            if expected:
                self._expected_resets -= 1
        reset = ResetEvent(
            expected=expected, guest=guest, reason=str(event.data.get("reason", "")), timestamp=event.timestamp
        )
        self.resets.append(reset)
        if not expected:
            self._log.warning("vm.unexpected_reset", guest=guest, reason=reset.reason)
            self._notify("unexpected_reset", reset)

    def _on_shutdown(self, event: Event) -> None:
        shutdown = ShutdownEvent(
            guest=bool(event.data.get("guest", False)),
            reason=str(event.data.get("reason", "")),
            timestamp=event.timestamp,
        )
        self._log.info("vm.shutdown_event", guest=shutdown.guest, reason=shutdown.reason)
        self._notify("shutdown", shutdown)

    def _on_panic(self, event: Event) -> None:
        self._log.error("vm.guest_panicked", info=dict(event.data))
        self._notify("panic", event)

    def _on_monitor_gone(self, error: QMPError | None) -> None:
        if error is not None:
            self._monitor_gone.set()
            with contextlib.suppress(OSError):
                os.eventfd_write(self._watch_wake, 1)

    def _shut_down_cleanly(self) -> bool:
        """Whether the last lifecycle event was a SHUTDOWN (not followed by a RESUME)."""
        lifecycle = self.qmp.recent_events("SHUTDOWN", "RESUME")
        return bool(lifecycle) and lifecycle[-1].name == "SHUTDOWN"

    def _watch(self) -> None:
        """Notice QEMU's exit (pidfd) or the loss of its monitor, and classify it."""
        while True:
            readable, _, _ = select.select([self.process.fileno(), self._watch_wake], [], [])
            if self.process.fileno() in readable:
                status = self.process.poll()
                assert status is not None
                # Let the reader take in what QEMU said before it died (a SHUTDOWN event).
                self._monitor_gone.wait(0.05)
                self._exit_status = status
                if not (self._expected_exit or self._shut_down_cleanly()):
                    self._crashed(f"QEMU exited unexpectedly: {status}", status)
                else:
                    self._log.info("vm.exited", exit=str(status))
                self._exited.set()
                return
            with contextlib.suppress(OSError):
                os.eventfd_read(self._watch_wake)
            if self._closed:
                return
            lost_monitor = self._monitor_gone.is_set() and self.process.wait(0.1) is None
            if lost_monitor and not (self._expected_exit or self._shut_down_cleanly()):
                self._crashed("QEMU's monitor connection was lost while QEMU still runs", None)
                self._exited.set()
                return

    def _crashed(self, message: str, status: ExitStatus | None) -> None:
        crash = AbnormalExit(
            f"{self.name}: {message}",
            exit_code=status.code if status else None,
            signal=status.signal if status else None,
            log_tail=_tail(self.run_dir / LOG_FILE),
        )
        self._crash = crash
        self._log.error("vm.crashed", reason=message)
        self._notify("crash", crash)


def _refuse_live_vm(run_dir: Path) -> None:
    try:
        state = read_state(run_dir)
    except StaleState:
        return
    try:
        QemuProcess.adopt(state.pid, state.start_time).close()
    except StaleState:
        return
    raise LaunchError(f"{run_dir} belongs to a running VM (pid {state.pid}); attach to it or choose another run_dir")


def _wait_for_socket(process: QemuProcess, path: Path, deadline: float, log_path: Path) -> Path:
    def ready() -> bool:
        _raise_if_exited(process, log_path)
        return path.exists()

    retrying = tenacity.Retrying(
        stop=tenacity.stop_before_delay(max(0.0, deadline - time.monotonic())),
        wait=tenacity.wait_exponential(multiplier=0.002, max=0.05),
        retry=tenacity.retry_if_result(lambda found: not found),
    )
    try:
        retrying(ready)
        return path
    except tenacity.RetryError:
        raise LaunchError("QEMU did not create its monitor socket in time", log=_tail(log_path)) from None


def _raise_if_exited(process: QemuProcess, log_path: Path) -> None:
    status = process.poll()
    if status is not None:
        raise LaunchError(f"QEMU exited during start-up ({status})", log=_tail(log_path))


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - 16384))
            text = log_file.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
