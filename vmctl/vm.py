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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog
import tenacity

from vmctl.console import Console
from vmctl.errors import (
    AbnormalExit,
    CommandError,
    ConnectError,
    DeviceExists,
    InvalidArgument,
    LaunchError,
    QMPError,
    StaleState,
    StateError,
    UnknownDevice,
    WaitTimeout,
)
from vmctl.ops import balloon as balloon_ops
from vmctl.ops import bitmaps as bitmap_ops
from vmctl.ops import chains as chain_ops
from vmctl.ops import chardevs as chardev_ops
from vmctl.ops import cpus as cpu_ops
from vmctl.ops import disks as disk_ops
from vmctl.ops import memory as memory_ops
from vmctl.ops import migration as migration_ops
from vmctl.ops import nbd as nbd_ops
from vmctl.ops import nics as nic_ops
from vmctl.ops.blockjobs import Job, JobProgress, query_jobs
from vmctl.ops.devices import device_present, pci_address
from vmctl.ops.storage_copy import StorageCopy
from vmctl.process import ExitStatus, QemuProcess
from vmctl.qmp import Event, Monitor, connect
from vmctl.spec import (
    CONSOLE_CHARDEV,
    LOG_FILE,
    MIGRATION_SOCKET,
    QMP_SOCKET,
    SHELL_SOCKET,
    Accelerator,
    DiskSpec,
    NicSpec,
    VMSpec,
)
from vmctl.state import STATE_FILE, Inventory, VMState, read_state, write_state

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


class VM:
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

    @property
    def inventory(self) -> Inventory:
        return self._inventory

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

    # -- devices ------------------------------------------------------------------------------

    def disks(self) -> tuple[DiskSpec, ...]:
        return self._inventory.disks

    def hotplug_disk(
        self,
        path: str | os.PathLike[str],
        *,
        id: str,
        format: str = "qcow2",
        read_only: bool = False,
        bus: disk_ops.Bus = "virtio-blk",
        cache: disk_ops.CacheMode = "writeback",
        aio: disk_ops.Aio = "threads",
        throttle: disk_ops.Throttle | None = None,
        timeout: float = 30.0,
    ) -> disk_ops.Disk:
        """Attach an image as a new disk; on any failure every step is undone (``HotplugError``)."""
        with self._ops_lock:
            self._refuse_duplicate(id)
            disk = disk_ops.hotplug_disk(
                self.qmp,
                self._log,
                path=path,
                disk_id=id,
                format=format,
                read_only=read_only,
                bus=bus,
                cache=cache,
                aio=aio,
                throttle=throttle,
                timeout=timeout,
            )
            pinned = attrs.evolve(disk.spec(), pci_addr=pci_address(self.qmp, id) if bus == "virtio-blk" else None)
            self._inventory = attrs.evolve(self._inventory, disks=(*self._inventory.disks, pinned))
            self._save_state()
            return disk

    def unplug_disk(self, id: str, *, timeout: float = 30.0) -> None:
        """Detach a disk: the guest releases it, then its nodes and fdset go. Safe to retry."""
        with self._ops_lock:
            self._require_disk(id)
            disk_ops.unplug_disk(self.qmp, self._log, disk_id=id, timeout=timeout)
            self._inventory = attrs.evolve(self._inventory, disks=tuple(d for d in self._inventory.disks if d.id != id))
            self._save_state()

    def nics(self) -> tuple[NicSpec, ...]:
        return self._inventory.nics

    def hotplug_nic(
        self,
        *,
        id: str,
        tap: str | None = None,
        mac: str | None = None,
        model: str = "virtio-net-pci",
        queues: int = 1,
        timeout: float = 30.0,
    ) -> nic_ops.Nic:
        """Add a NIC on a tap device that vmctl opens (``tap`` names it; else the kernel does).
        A MAC is generated when none is given, so it survives migration and re-attach."""
        with self._ops_lock:
            self._refuse_duplicate(id)
            nic = nic_ops.hotplug_nic(
                self.qmp, self._log, nic_id=id, tap=tap, mac=mac, model=model, queues=queues, timeout=timeout
            )
            pinned_nic = attrs.evolve(nic.spec(), pci_addr=pci_address(self.qmp, id))
            self._inventory = attrs.evolve(self._inventory, nics=(*self._inventory.nics, pinned_nic))
            self._save_state()
            return nic

    def unplug_nic(self, id: str, *, timeout: float = 30.0) -> None:
        with self._ops_lock:
            if not any(n.id == id for n in self._inventory.nics):
                raise UnknownDevice(f"{self.name} has no nic {id!r}")
            nic_ops.unplug_nic(self.qmp, self._log, nic_id=id, timeout=timeout)
            self._inventory = attrs.evolve(self._inventory, nics=tuple(n for n in self._inventory.nics if n.id != id))
            self._save_state()

    def resize_disk(self, id: str, size: int, *, allow_shrink: bool = False) -> None:
        """Grow a disk to ``size`` bytes; the guest sees the new size at once."""
        with self._ops_lock:
            disk = self._require_disk(id)
            disk_ops.resize_disk(self.qmp, self._log, disk=disk, size=size, allow_shrink=allow_shrink)

    def set_disk_throttle(self, id: str, throttle: disk_ops.Throttle) -> None:
        """Set (or, with ``Throttle()``, clear) a disk's I/O limits."""
        with self._ops_lock:
            bus = self._require_disk(id).bus
            disk_ops.set_throttle(self.qmp, disk_id=id, throttle=throttle, bus=bus)
            self._log.info("disk.throttled", disk=id, **throttle.arguments())

    def hotplug_chardev(
        self,
        id: str,
        *,
        kind: chardev_ops.Kind,
        path: str | os.PathLike[str] | None = None,
        size: int = 65536,
        port_name: str | None = None,
        timeout: float = 30.0,
    ) -> chardev_ops.Chardev:
        """Add a chardev (a unix socket QEMU listens on, or a ring buffer); with ``port_name`` the
        guest sees it as that virtio-serial port."""
        with self._ops_lock:
            self._refuse_duplicate(id)
            chardev = chardev_ops.hotplug_chardev(
                self.qmp, self._log, chardev_id=id, kind=kind, path=path, size=size, port_name=port_name,
                timeout=timeout,
            )  # fmt: skip
            self._inventory = attrs.evolve(self._inventory, chardevs=(*self._inventory.chardevs, chardev))
            self._save_state()
            return chardev

    def unplug_chardev(self, id: str, *, timeout: float = 30.0) -> None:
        with self._ops_lock:
            chardev = next((c for c in self._inventory.chardevs if c.id == id), None)
            if chardev is None:
                raise UnknownDevice(f"{self.name} has no chardev {id!r}")
            chardev_ops.unplug_chardev(self.qmp, self._log, chardev=chardev, timeout=timeout)
            remaining = tuple(c for c in self._inventory.chardevs if c.id != id)
            self._inventory = attrs.evolve(self._inventory, chardevs=remaining)
            self._save_state()

    def _require_disk(self, disk_id: str) -> DiskSpec:
        for disk in self._inventory.disks:
            if disk.id == disk_id:
                return disk
        raise UnknownDevice(f"{self.name} has no disk {disk_id!r}")

    def _refuse_duplicate(self, device_id: str) -> None:
        if device_id in self._inventory.device_ids() or device_present(self.qmp, device_id):
            raise DeviceExists(f"{self.name} already has a device {device_id!r}")

    def hotplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]:
        """Add ``count`` vCPUs (up to the spec's ``max_cpus``); the guest may need to online them."""
        with self._ops_lock:
            added = cpu_ops.hotplug_cpus(self.qmp, self._log, count, timeout=timeout)
            self._inventory = attrs.evolve(self._inventory, hotplugged_cpus=(*self._inventory.hotplugged_cpus, *added))
            self._save_state()
            return added

    def unplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]:
        """Remove the ``count`` most recently hotplugged vCPUs (the guest must release them)."""
        with self._ops_lock:
            removed = cpu_ops.unplug_cpus(self.qmp, self._log, count, timeout=timeout)
            remaining = tuple(c for c in self._inventory.hotplugged_cpus if c not in removed)
            self._inventory = attrs.evolve(self._inventory, hotplugged_cpus=remaining)
            self._save_state()
            return removed

    def hotplug_memory(self, size_mib: int, *, id: str, timeout: float = 30.0) -> memory_ops.MemorySpec:
        """Add a DIMM of ``size_mib`` (a multiple of 128); needs ``max_memory_mib`` and ``memory_slots``."""
        with self._ops_lock:
            self._refuse_duplicate(id)
            memory = memory_ops.hotplug_memory(self.qmp, self._log, memory_id=id, size_mib=size_mib, timeout=timeout)
            self._inventory = attrs.evolve(self._inventory, memory=(*self._inventory.memory, memory))
            self._save_state()
            return memory

    def unplug_memory(self, id: str, *, timeout: float = 30.0) -> None:
        with self._ops_lock:
            if not any(m.id == id for m in self._inventory.memory):
                raise UnknownDevice(f"{self.name} has no hotplugged memory {id!r}")
            memory_ops.unplug_memory(self.qmp, self._log, memory_id=id, timeout=timeout)
            self._inventory = attrs.evolve(
                self._inventory, memory=tuple(m for m in self._inventory.memory if m.id != id)
            )
            self._save_state()

    def memory_devices(self) -> list[memory_ops.MemoryDevice]:
        return memory_ops.memory_devices(self.qmp)

    def balloon(self) -> int:
        """The guest memory in bytes as the balloon reports it."""
        return balloon_ops.balloon_bytes(self.qmp)

    def set_balloon(self, target_bytes: int, *, wait: bool = True, timeout: float = 30.0) -> int:
        """Inflate or deflate the balloon to leave the guest ``target_bytes``; waits for the guest by default."""
        return balloon_ops.set_balloon(self.qmp, self._log, target_bytes, wait=wait, timeout=timeout)

    # -- block jobs, snapshots, bitmaps, NBD ----------------------------------------------------

    def _replace_disk(self, disk: DiskSpec) -> None:
        with self._ops_lock:
            self._inventory = attrs.evolve(
                self._inventory, disks=tuple(disk if d.id == disk.id else d for d in self._inventory.disks)
            )
            self._save_state()

    def snapshot_disks(
        self,
        ids: list[str],
        *,
        overlays: dict[str, str | os.PathLike[str]],
        bitmap: str | None = None,
    ) -> list[DiskSpec]:
        """External snapshots of these disks, switched atomically (one transaction); ``overlays``
        maps each id to its new qcow2 file. On failure nothing changes (``SnapshotError``)."""
        with self._ops_lock:
            disks = [self._require_disk(i) for i in ids]
            updated = chain_ops.snapshot_disks(self.qmp, self._log, disks, overlays, bitmap=bitmap)
            for disk in updated:
                self._replace_disk(disk)
            return updated

    def commit_disk(self, id: str, *, top: int | None = None, base: int | None = None, timeout: float = 300) -> None:
        """Commit layers down (``top``/``base`` are layer numbers, see ``DiskSpec.layers``): an
        active commit pivots the guest back onto the base; the chain in the inventory follows."""
        with self._ops_lock:
            disk = self._require_disk(id)
            job, result = chain_ops.start_commit(self.qmp, self._log, disk, top=top, base=base)
            job.on_success(lambda: self._replace_disk(result))
            if top is None or top == disk.layers[-1]:
                job.wait_ready(timeout)
                job.complete(timeout)
            else:
                job.wait(timeout)

    def stream_disk(self, id: str, *, base: int | None = None, timeout: float = 300) -> None:
        """Pull the backing layers' data into the active layer (all of them: a standalone image)."""
        with self._ops_lock:
            disk = self._require_disk(id)
            job, result = chain_ops.start_stream(self.qmp, self._log, disk, base=base)
            job.on_success(lambda: self._replace_disk(result))
            job.wait(timeout)

    def mirror_disk(
        self,
        id: str,
        target_path: str | os.PathLike[str],
        *,
        sync: chain_ops.MirrorSync = "full",
        format: Literal["qcow2", "raw"] = "qcow2",
    ) -> Job:
        """Start mirroring a disk to a new image; ``job.wait_ready()`` then ``job.complete()``
        pivots the guest onto it (the inventory follows) or ``job.cancel()`` keeps the source."""
        with self._ops_lock:
            disk = self._require_disk(id)
            job, result = chain_ops.start_mirror(self.qmp, self._log, disk, target_path, sync=sync, fmt=format)
            job.on_success(lambda: self._replace_disk(result))
            return job

    def block_jobs(self) -> list[JobProgress]:
        return query_jobs(self.qmp)

    def bitmaps(self, id: str) -> list[bitmap_ops.Bitmap]:
        return bitmap_ops.bitmaps(self.qmp, self._require_disk(id))

    def add_bitmap(self, id: str, name: str, *, persistent: bool = True, granularity: int | None = None) -> None:
        bitmap_ops.add_bitmap(self.qmp, self._require_disk(id), name, persistent=persistent, granularity=granularity)

    def remove_bitmap(self, id: str, name: str) -> None:
        bitmap_ops.remove_bitmap(self.qmp, self._require_disk(id), name)

    def clear_bitmap(self, id: str, name: str) -> None:
        bitmap_ops.clear_bitmap(self.qmp, self._require_disk(id), name)

    def merge_bitmaps(self, id: str, target: str, sources: list[str]) -> None:
        bitmap_ops.merge_bitmaps(self.qmp, self._require_disk(id), target, sources)

    def export_disk(
        self, id: str, *, address: nbd_ops.NbdAddress | None = None, writable: bool = False, name: str | None = None
    ) -> nbd_ops.Export:
        """Export a disk over NBD (the VM's NBD server starts on first use: ``address`` is a unix
        socket path or (host, port); default: nbd.sock in the run dir)."""
        with self._ops_lock:
            disk = self._require_disk(id)
            if id in self._exports:
                raise DeviceExists(f"disk {id} is exported already")
            if self._nbd_address is None:
                wanted = address if address is not None else str(self.run_dir / "nbd.sock")
                nbd_ops.start_server(self.qmp, wanted)
                self._nbd_address = wanted
            elif address is not None and address != self._nbd_address:
                raise InvalidArgument(f"the NBD server already listens on {self._nbd_address}")
            export = nbd_ops.add_export(self.qmp, disk, self._nbd_address, writable=writable, name=name)
            self._exports[id] = export
            self._log.info("disk.exported", disk=id, uri=export.uri, writable=writable)
            return export

    @property
    def nbd_address(self) -> nbd_ops.NbdAddress | None:
        """Where this VM's NBD server listens, while it has exports."""
        return self._nbd_address

    def unexport_disk(self, id: str) -> None:
        with self._ops_lock:
            if id not in self._exports:
                raise UnknownDevice(f"disk {id} is not exported")
            nbd_ops.remove_export(self.qmp, id)
            del self._exports[id]
            if not self._exports:
                nbd_ops.stop_server(self.qmp)
                self._nbd_address = None

    # -- migration ----------------------------------------------------------------------------

    def migration_target_spec(
        self, *, name: str | None = None, disk_paths: Mapping[str, str | os.PathLike[str]] | None = None
    ) -> VMSpec:
        """A spec for a migration target with this VM's devices as they are now, hotplugged ones
        included, at the same PCI addresses and memory slots. NIC backends are the target's own
        (user networking unless the caller sets taps). ``disk_paths`` gives the target its own
        (flat, same-size) images for those disks, for ``migrate(copy_storage=True)``."""
        inventory = self._inventory
        disks = tuple(
            attrs.evolve(d, path=os.fspath(disk_paths[d.id]), base_layer=0, overlays=())
            if disk_paths and d.id in disk_paths
            else d
            for d in inventory.disks
        )
        unknown = set(disk_paths or ()) - {d.id for d in inventory.disks}
        if unknown:
            raise InvalidArgument(f"{self.name} has no disks {', '.join(sorted(unknown))}")
        if inventory.chardevs:
            raise InvalidArgument(f"{self.name}: migrating hotplugged chardevs is not supported yet")
        if any(d.bus == "scsi" for d in inventory.disks) and not any(d.bus == "scsi" for d in self.spec.disks):
            raise InvalidArgument(f"{self.name}: migrating SCSI disks hotplugged at run time is not supported yet")
        extra = list(self.spec.extra_args)
        for memory in inventory.memory:
            backend = memory_ops.backend_id(memory.id)
            dimm = f"pc-dimm,id={memory.id},memdev={backend}"
            dimm += f",slot={memory.slot}" if memory.slot is not None else ""
            dimm += f",addr={memory.addr}" if memory.addr is not None else ""
            extra += ["-object", f"memory-backend-ram,id={backend},size={memory.size_mib}M", "-device", dimm]
        for slot in cpu_ops.cpu_slots(self.qmp):
            if slot.hotplugged_by_us:
                props = ",".join(f"{key}={value}" for key, value in slot.props.items())
                extra += ["-device", f"{slot.type},id={slot.device_id},{props}"]
        return attrs.evolve(
            self.spec,
            name=name or self.spec.name,
            disks=disks,
            nics=tuple(attrs.evolve(n, tap=None) for n in inventory.nics),
            extra_args=tuple(extra),
        )

    def migrate(
        self,
        target: VM | str,
        *,
        listen: tuple[str, int] | None = None,
        postcopy: bool = False,
        auto_converge: bool = False,
        bandwidth: int | None = None,
        downtime_limit: int | None = None,
        pause_before_switchover: bool = False,
        multifd_channels: int | None = None,
        resume_target: bool = True,
        stop_source: bool = True,
        copy_storage: bool = False,
        storage_timeout: float = 600.0,
    ) -> migration_ops.Migration:
        """Start migrating to ``target``: a VM from ``launch_incoming`` (it listens on a unix
        socket in its run dir, or on ``listen`` = (host, port) over TCP) or a migration URI.

        Capabilities (``events`` always) and parameters are set on both sides and restored on
        the source if the migration fails. On success the target is resumed and this source
        quits (unless told otherwise).

        ``copy_storage`` copies the disks whose image differs on the target (see
        ``migration_target_spec(disk_paths=...)``) first: each is mirrored into the target's NBD
        export until in sync (``storage_timeout``), then RAM follows."""
        options = migration_ops.MigrationOptions(
            postcopy=postcopy,
            auto_converge=auto_converge,
            bandwidth=bandwidth,
            downtime_limit=downtime_limit,
            pause_before_switchover=pause_before_switchover,
            multifd_channels=multifd_channels,
            copy_storage=copy_storage,
        )
        if isinstance(target, VM):
            mismatch = _device_mismatch(self._inventory, target.inventory)
            if mismatch:
                raise InvalidArgument(
                    f"{target.name} does not have {self.name}'s devices ({mismatch}); "
                    "launch it from source.migration_target_spec() with inventory=source.inventory"
                )
        elif not isinstance(target, str) or not target:
            raise InvalidArgument(f"migrate to a VM launched for incoming or a URI, not {target!r}")
        elif copy_storage:
            raise InvalidArgument("copy_storage needs a target VM (launched with launch_incoming)")
        storage = (
            self._copy_storage(target, listen, storage_timeout) if isinstance(target, VM) and copy_storage else None
        )
        target_events = None
        try:
            if isinstance(target, VM):
                uri = f"tcp:{listen[0]}:{listen[1]}" if listen else f"unix:{target.run_dir / MIGRATION_SOCKET}"
                migration_ops.set_capabilities(target.qmp, options.capabilities(source=False))
                migration_ops.set_parameters(target.qmp, options.parameters(source=False))
                target_events = target.qmp.events("MIGRATION")
                target.qmp.execute("migrate-incoming", {"uri": uri})
            else:
                uri = target
            previous_caps = migration_ops.set_capabilities(self.qmp, options.capabilities(source=True))
            previous_params = migration_ops.set_parameters(self.qmp, options.parameters(source=True))
        except BaseException:
            if target_events is not None:
                target_events.close()
            if storage is not None:
                storage.abort()
            raise

        def restore() -> None:
            migration_ops.set_capabilities(self.qmp, previous_caps)
            migration_ops.set_parameters(self.qmp, previous_params)

        events = self.qmp.events("MIGRATION")
        try:
            self.qmp.execute("migrate", {"uri": uri})
        except BaseException:
            events.close()
            if target_events is not None:
                target_events.close()
            restore()
            if storage is not None:
                storage.abort()
            raise
        self._log.info("vm.migration_started", uri=uri, postcopy=postcopy, copy_storage=copy_storage)
        target_inventory = self._inventory
        if isinstance(target, VM):  # its own images and NIC backends, the source's everything else
            target_inventory = attrs.evolve(self._inventory, disks=target.inventory.disks, nics=target.inventory.nics)
        return migration_ops.Migration(
            source=self,
            target=target if isinstance(target, VM) else None,
            uri=uri,
            options=options,
            source_events=events,
            target_events=target_events,
            restore=restore,
            resume_target=resume_target,
            stop_source=stop_source,
            target_inventory=target_inventory,
            on_completed=storage.finish if storage is not None else None,
            on_aborted=storage.abort if storage is not None else None,
        )

    def _copy_storage(self, target: VM, listen: tuple[str, int] | None, timeout: float) -> StorageCopy:
        """Mirror the disks whose image differs on the target into its NBD exports, until in sync."""
        theirs = {d.id: d for d in target.inventory.disks}
        to_copy = [d for d in self._inventory.disks if theirs[d.id].path != d.path or theirs[d.id].overlays]
        if not to_copy:
            raise InvalidArgument("copy_storage: the target uses the same images (launch it with disk_paths)")
        # Over TCP the NBD server listens next to the migration port; else on a socket in its run dir.
        address = (listen[0], listen[1] + 1) if listen else None
        return StorageCopy.start(self, target, to_copy, address=address, timeout=timeout, log=self._log)

    def adopt_inventory(self, inventory: Inventory) -> None:
        """Take over the device inventory of the VM this one was migrated from."""
        with self._ops_lock:
            self._inventory = inventory
            self._save_state()

    def finish_migrated_source(self, *, timeout: float = 10.0) -> None:
        """The guest runs elsewhere now: quit this QEMU (an expected exit)."""
        self._expected_exit = True
        with contextlib.suppress(QMPError):
            self.qmp.execute("quit", timeout=timeout)
        if self.process.wait(timeout) is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout)
        self._exited.wait(1.0)
        self._log.info("vm.migrated_away")

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


def _device_mismatch(source: Inventory, target: Inventory) -> str:
    """What differs between two VMs' device sets, in words (empty when they match)."""
    differences = []
    for kind, mine, theirs in (
        ("disks", {d.id for d in source.disks}, {d.id for d in target.disks}),
        ("nics", {n.id for n in source.nics}, {n.id for n in target.nics}),
        ("memory", {m.id for m in source.memory}, {m.id for m in target.memory}),
        ("cpus", set(source.hotplugged_cpus), set(target.hotplugged_cpus)),
    ):
        if mine - theirs:
            differences.append(f"{kind} missing on the target: {', '.join(sorted(mine - theirs))}")
        if theirs - mine:
            differences.append(f"{kind} only on the target: {', '.join(sorted(theirs - mine))}")
    return "; ".join(differences)


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
