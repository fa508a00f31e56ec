"""The VM a control plane holds: launch or attach, then everything through its parts.

A VM is composed of parts that own their state: the ``StateStore`` (inventory and state file),
the ``Lifecycle`` (alive, exited, crashed; resets; stopping), ``Devices``, ``Blocks`` and
``Migrations``. Its public methods are the parts' methods, bound here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from vmctl.agent.client import AgentClient
from vmctl.agent.guest import GuestAgent
from vmctl.errors import (
    AbnormalExit,
    AgentUnavailable,
    ConnectionLost,
    InvalidArgument,
    QMPError,
    StateError,
)
from vmctl.logs import get_logger
from vmctl.model import Inventory, VMSpec
from vmctl.model.migration import MigrationKeywords, MigrationRequest
from vmctl.model.names import (
    AGENT_CHARDEV,
    AGENT_SOCKET,
    CONSOLE_CHARDEV,
    LOG_FILE,
)
from vmctl.model.stats import VMStats
from vmctl.model.status import (
    DiskIOError,
    ExitStatus,
    ResetEvent,
    ShutdownEvent,
    ShutdownMethod,
    ShutdownResult,
    VMStatus,
)
from vmctl.ops import chardevs as chardev_ops
from vmctl.ops import screen as screen_ops
from vmctl.ops.blockjobs import JobProgress, query_jobs
from vmctl.ops.devices import pin_pci_address
from vmctl.ops.live_migration import Migration
from vmctl.ops.nbd import NbdAddress
from vmctl.ops.screen import ImageFormat
from vmctl.qmp import Event, Monitor
from vmctl.vm import startup
from vmctl.vm.backups import Backups
from vmctl.vm.blocks import Blocks
from vmctl.vm.console import Console
from vmctl.vm.devices import Devices
from vmctl.vm.isolation import Isolation
from vmctl.vm.lifecycle import STEPS, Life, Lifecycle
from vmctl.vm.migration import Migrations
from vmctl.vm.process import QemuProcess
from vmctl.vm.statefile import VMRecord
from vmctl.vm.stats import take as take_stats
from vmctl.vm.store import StateStore

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = get_logger(__name__)


class VM:
    """A running QEMU. Get one with :meth:`launch` or :meth:`attach`; ``close()`` detaches."""

    def __init__(self, *, run_dir: Path, record: VMRecord, process: QemuProcess, qmp: Monitor) -> None:
        self.run_dir = run_dir
        self.spec = record.spec
        self.name = record.spec.name
        self.process = process
        self.qmp = qmp
        self.log = log.bind(vm=self.name)
        self.store = StateStore(
            run_dir=run_dir,
            spec=record.spec,
            inventory=record.inventory,
            pid=process.pid,
            start_time=process.start_time,
            qmp=qmp,
            pending=record.pending,
            vcpus_created=record.vcpus_created,
        )
        self.lifecycle = Lifecycle(name=self.name, process=process, qmp=qmp, log_path=run_dir / LOG_FILE, log=self.log)
        self.devices = Devices(name=self.name, qmp=qmp, store=self.store, log=self.log)
        self._agent = _guest_agent(run_dir, record.spec, qmp)
        self.blocks = Blocks(name=self.name, qmp=qmp, store=self.store, log=self.log, agent=lambda: self.agent)
        self.backups = Backups(name=self.name, qmp=qmp, store=self.store, log=self.log, agent=lambda: self.agent)
        self.migrations = Migrations(
            name=self.name, qmp=qmp, store=self.store, blocks=self.blocks, lifecycle=self.lifecycle, log=self.log
        )
        self._console = Console(qmp, CONSOLE_CHARDEV) if record.spec.serial_console else None
        self.leftover_jobs: list[JobProgress] = []

        # The public API is the parts' own methods.
        devices, blocks, migrations = self.devices, self.blocks, self.migrations
        self.disks = devices.disks
        self.hotplug_disk = devices.hotplug_disk
        self.unplug_disk = devices.unplug_disk
        self.resize_disk = devices.resize_disk
        self.set_disk_throttle = devices.set_disk_throttle
        self.nics = devices.nics
        self.hotplug_nic = devices.hotplug_nic
        self.unplug_nic = devices.unplug_nic
        self.set_nic_link = devices.set_nic_link
        self.hotplug_chardev = devices.hotplug_chardev
        self.unplug_chardev = devices.unplug_chardev
        self.hotplug_cpus = devices.hotplug_cpus
        self.unplug_cpus = devices.unplug_cpus
        self.hotplug_memory = devices.hotplug_memory
        self.unplug_memory = devices.unplug_memory
        self.add_virtio_mem = devices.add_virtio_mem
        self.resize_virtio_mem = devices.resize_virtio_mem
        self.memory_devices = devices.memory_devices
        self.balloon = devices.balloon
        self.set_balloon = devices.set_balloon
        self.snapshot_disks = blocks.snapshot_disks
        self.commit_disk = blocks.commit_disk
        self.stream_disk = blocks.stream_disk
        self.mirror_disk = blocks.mirror_disk
        self.block_jobs = blocks.block_jobs
        self.bitmaps = blocks.bitmaps
        self.add_bitmap = blocks.add_bitmap
        self.remove_bitmap = blocks.remove_bitmap
        self.clear_bitmap = blocks.clear_bitmap
        self.merge_bitmaps = blocks.merge_bitmaps
        self.backup = self.backups.backup
        self.checkpoints = self.backups.checkpoints
        self.remove_checkpoint = self.backups.remove_checkpoint
        self.export_disk = blocks.export_disk
        self.unexport_disk = blocks.unexport_disk
        self.migration_target_spec = migrations.migration_target_spec
        self.adopt_inventory = migrations.adopt_inventory
        self.finish_migrated_source = migrations.finish_migrated_source

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
        isolation: Isolation | None = None,
    ) -> VM:
        """Start QEMU for ``spec`` with its monitor, log, pidfile and state file in ``run_dir``.

        QEMU starts with ``-S``; once the monitor is connected and vmctl listens for its events,
        the guest is started (unless ``paused``). A QEMU that fails to start raises ``LaunchError``
        with QEMU's own message. ``isolation`` is the host's rules (a uid from the pool and a
        private /dev per QEMU; default ``Isolation.from_env()``). ``incoming`` waits for a
        migration (see ``launch_incoming``); ``netns`` runs QEMU in that network namespace (``ip
        netns exec``), as on another host.
        """
        started = startup.start(
            spec, run_dir, qemu_binary=qemu_binary, timeout=timeout, incoming=incoming, netns=netns,
            inventory=inventory, isolation=isolation,
        )  # fmt: skip
        try:
            vm = cls(run_dir=started.directory, record=started.record, process=started.process, qmp=started.qmp)
        except BaseException:
            startup.reap(started.process)
            raise
        try:
            vm._pin_pci_addresses()
            vm.devices.apply_settings()
            vm.store.save()
            if not paused and not incoming:
                vm.qmp.execute("cont")
        except BaseException:
            vm.kill()
            vm.close()
            raise
        vm.log.info("vm.launched", pid=vm.pid, accel=started.accel, run_dir=str(started.directory))
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
        isolation: Isolation | None = None,
    ) -> VM:
        """Start QEMU waiting for an incoming migration (``-incoming defer``); ``vm.migrate(this)``
        then tells it where to listen. Build ``spec`` with ``source.migration_target_spec()``.
        On the same host, the target gets a uid of its own from the pool, as any launch does."""
        return cls.launch(
            spec,
            run_dir=run_dir,
            qemu_binary=qemu_binary,
            timeout=timeout,
            incoming=True,
            netns=netns,
            inventory=inventory,
            isolation=isolation,
        )

    @classmethod
    def attach(cls, run_dir: str | os.PathLike[str], *, timeout: float = 10.0) -> VM:
        """Reconnect to the VM described by ``run_dir`` (after a control-plane restart).

        Raises ``StaleState`` when that VM is gone or its pid now names another process.
        """
        directory = Path(run_dir).resolve()
        record, process, qmp = startup.connect_to_record(directory, timeout=timeout)
        vm = cls(run_dir=directory, record=record, process=process, qmp=qmp)
        vm.log.info("vm.attached", pid=process.pid, run_dir=str(directory))
        try:
            vm._take_over(record)
        except ConnectionLost as exc:
            # Connected, then gone: a target whose incoming migration failed quits on its own.
            exited = process.wait(startup.EXIT_GRACE)
            if exited is None:
                raise
            vm.close()
            raise startup.exited_while_attached(record, exited) from exc
        return vm

    def _take_over(self, record: VMRecord) -> None:
        """What an attach finds of the last control plane's work, settled or reported."""
        # A device operation the last control plane did not finish: settle it from what QEMU has.
        if record.pending:
            self.store.settle()
            for intent in record.pending:
                self.log.warning("vm.interrupted_operation", operation=intent.operation, device=intent.device_id)
            if self.leftovers:
                self.log.warning("vm.leftovers", leftovers=list(self.leftovers))
        # Block jobs a crashed control plane left behind are QEMU's still: report them.
        self.leftover_jobs = query_jobs(self.qmp)
        for job in self.leftover_jobs:
            self.log.warning("vm.leftover_block_job", job=job.id, type=job.type, status=job.status, error=job.error)
        # A control plane that died inside a quiesced snapshot left the guest's writes waiting.
        if self._agent is not None:
            self._agent.thaw_if_frozen()

    def close(self) -> None:
        """Detach: stop watching and close the monitor. The VM keeps running (see ``attach``)."""
        if self.lifecycle.state is Life.DETACHED:
            return
        self.lifecycle.detach()
        self.qmp.close()
        self.process.close()

    def _pin_pci_addresses(self) -> None:
        """Record where QEMU put the spec's PCI devices, so a migration target can match it."""

        def pinned(inventory: Inventory) -> Inventory:
            disks = tuple(pin_pci_address(self.qmp, d) for d in inventory.disks)
            nics = tuple(pin_pci_address(self.qmp, n) for n in inventory.nics)
            return attrs.evolve(inventory, disks=disks, nics=nics)

        self.store.update(pinned)

    # -- what it is ---------------------------------------------------------------------------

    def screendump(self, path: str | os.PathLike[str], *, format: ImageFormat = "png") -> Path:
        """The guest's screen as an image file (``VMSpec(vga=True)``)."""
        self._need_display("a screendump")
        return screen_ops.screendump(self.qmp, self.log, path, format=format)

    def send_keys(self, keys: Sequence[str], *, hold_ms: int | None = None) -> None:
        """Press these keys together on the guest's keyboard, then release them."""
        screen_ops.send_keys(self.qmp, self.log, keys, hold_ms=hold_ms)

    def inject_nmi(self) -> None:
        screen_ops.inject_nmi(self.qmp, self.log)

    def _need_display(self, what: str) -> None:
        if not self.spec.vga:
            raise InvalidArgument(f"{self.name}: {what} needs a display: launch the VM with VMSpec(vga=True)")

    def stats(self) -> VMStats:
        """What the VM uses now: per-vCPU time, per-disk I/O, per-NIC traffic, memory (see
        ``VMStats.rates`` for per-second figures between two)."""
        inventory = self.store.inventory
        return take_stats(
            name=self.name, qmp=self.qmp, pid=self.process.pid, disk_ids=[d.id for d in inventory.disks],
            nics=inventory.nics,
        )  # fmt: skip

    @property
    def agent(self) -> GuestAgent:
        """The QEMU guest agent in this VM (``VMSpec(guest_agent=True)``)."""
        if self._agent is None:
            raise AgentUnavailable(f"{self.name}: this VM has no guest agent port (launch it with guest_agent=True)")
        return self._agent

    @property
    def inventory(self) -> Inventory:
        return self.store.inventory

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

    @property
    def resets(self) -> list[ResetEvent]:
        return list(self.lifecycle.resets)

    @property
    def leftovers(self) -> tuple[str, ...]:
        """What a device operation that stopped half-way (a failure vmctl could not undo, or a
        control plane killed in the middle) left in QEMU; ``clean_leftovers()`` removes it."""
        return self.store.leftovers

    def clean_leftovers(self, *, timeout: float = 30.0) -> None:
        """Finish the cleanup of ``leftovers``: an interrupted hotplug is undone, an interrupted
        unplug completed, a source whose guest migrated away quits. ``HotplugError`` if something
        still cannot go (say, the guest holds it)."""
        self.store.clean_leftovers(self.log, timeout=timeout, quit_source=self.finish_migrated_source)

    @property
    def nbd_address(self) -> NbdAddress | None:
        """Where this VM's NBD server listens, while it has exports."""
        return self.blocks.nbd_address

    # -- lifecycle ----------------------------------------------------------------------------

    def pause(self) -> None:
        self.qmp.execute("stop")
        self.log.info("vm.paused")

    def resume(self) -> None:
        self.qmp.execute("cont")
        self.log.info("vm.resumed")

    def reset(self) -> None:
        """A hard reset; its RESET event is classified as expected."""
        with self.lifecycle.expected_reset():
            self.qmp.execute("system_reset")
        self.log.info("vm.reset")

    def kill(self, *, timeout: float = 10.0) -> ExitStatus:
        """SIGKILL QEMU and wait for it to go (an expected exit, not a crash)."""
        result = self.lifecycle.escalate((ShutdownMethod.KILL,), step_timeout=timeout)
        return result.exit

    def shutdown(self, timeout: float = 30.0, *, step_timeout: float = 5.0) -> ShutdownResult:
        """Shut down, escalating: the guest agent's shutdown when it answers, then ACPI powerdown
        (``timeout`` each), then quit, SIGTERM, SIGKILL (``step_timeout`` each). Returns how it ended."""
        steps: tuple[ShutdownMethod, ...] = STEPS
        agent = self._agent_for_shutdown(step_timeout)
        if agent is not None:
            steps = (ShutdownMethod.AGENT, *STEPS)
        return self.lifecycle.escalate(
            steps,
            powerdown_timeout=timeout,
            step_timeout=step_timeout,
            agent_shutdown=agent.shutdown if agent is not None else None,
        )

    def _agent_for_shutdown(self, step_timeout: float) -> GuestAgent | None:
        """The agent, if it can shut the guest down now: a paused guest's agent never answers."""
        if self._agent is None or self.lifecycle.has_exited:
            return None
        try:
            running = self.status().running
        except QMPError:
            return None
        return self._agent if running and self._agent.answers(timeout=min(step_timeout, 2.0)) else None

    def wait(self, timeout: float) -> ExitStatus:
        """Wait for QEMU to exit. Raises ``AbnormalExit`` if it crashed, ``WaitTimeout`` if it still runs."""
        return self.lifecycle.wait(timeout)

    @property
    def has_exited(self) -> bool:
        return self.lifecycle.has_exited

    def on_unexpected_reset(self, callback: Callable[[ResetEvent], Any]) -> Callable[[], None]:
        return self.lifecycle.register("unexpected_reset", callback)

    def on_shutdown(self, callback: Callable[[ShutdownEvent], Any]) -> Callable[[], None]:
        return self.lifecycle.register("shutdown", callback)

    def on_panic(self, callback: Callable[[Event], Any]) -> Callable[[], None]:
        return self.lifecycle.register("panic", callback)

    def on_io_error(self, callback: Callable[[DiskIOError], Any]) -> Callable[[], None]:
        """Called (off the QMP reader thread) for each BLOCK_IO_ERROR: which disk, read or
        write, what QEMU did (``DiskSpec.on_error``); ``vm.resume()`` continues a stopped guest."""
        return self.lifecycle.register("io_error", callback)

    def on_crash(self, callback: Callable[[AbnormalExit], Any]) -> Callable[[], None]:
        """Called (off the QMP reader thread) when QEMU exits abnormally or its monitor is lost."""
        return self.lifecycle.register("crash", callback)

    # -- migration ----------------------------------------------------------------------------

    def migrate(
        self, target: VM | str, request: MigrationRequest | None = None, /, **options: Unpack[MigrationKeywords]
    ) -> Migration:
        """Start migrating to ``target``: a VM from ``launch_incoming`` or a migration URI, as
        ``request`` asks, or its keywords (``MigrationRequest.of``; ``finish_within`` adds the
        convergence policy). See :meth:`vmctl.vm.migration.Migrations.migrate`."""
        return self.migrations.migrate(
            target.migrations if isinstance(target, VM) else target, MigrationRequest.of(request, **options)
        )


def _guest_agent(run_dir: Path, spec: VMSpec, qmp: Monitor) -> GuestAgent | None:
    if not spec.guest_agent:
        return None

    def port_open() -> bool:
        try:
            return chardev_ops.frontend_open(qmp, AGENT_CHARDEV)
        except QMPError:
            return True  # QEMU cannot say: the agent's socket will

    return GuestAgent(AgentClient(run_dir / AGENT_SOCKET, name=spec.name, port_open=port_open))
