"""``LibvirtVM``: vmctl's VM API on a libvirt domain, for hosts where libvirt owns QEMU.

Every change goes through libvirt's own APIs, so that libvirt's domain XML stays true (a later
migration, restart or hotplug is built from it); QMP, through libvirtd, only reads.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from structlog.typing import FilteringBoundLogger

from vmctl.errors import InvalidArgument, WaitTimeout
from vmctl.libvirt.blocks import LibvirtBlocks
from vmctl.libvirt.calls import bounded
from vmctl.libvirt.devices import LibvirtDevices
from vmctl.libvirt.domainxml import CONSOLE_LOG, domain_xml, spec_from_xml
from vmctl.libvirt.errors import DomainNotFound, LibvirtError
from vmctl.libvirt.eventloop import libvirt_module, open_connection
from vmctl.libvirt.events import DomainEvents
from vmctl.libvirt.memory import LibvirtMemory
from vmctl.libvirt.migration import LibvirtMigration, start_migration
from vmctl.libvirt.monitor import LibvirtMonitor, domain_at
from vmctl.logs import get_logger
from vmctl.model import VMSpec
from vmctl.model.migration import MigrationKeywords, MigrationRequest
from vmctl.model.names import SHELL_SOCKET
from vmctl.model.status import ExitStatus, ShutdownMethod, ShutdownResult, VMStatus
from vmctl.vm.console import Console, LogConsole
from vmctl.vm.process import qemu_binary

if TYPE_CHECKING:
    from typing_extensions import Unpack

log: FilteringBoundLogger = get_logger(__name__)

_UNKNOWN_EXIT = ExitStatus(code=None, signal=None)  # libvirt reaps QEMU; vmctl never sees its status


class LibvirtVM:
    """A VM whose QEMU libvirt runs: ``define(uri, spec, run_dir=...)`` or ``open(uri, name)``."""

    def __init__(self, conn: Any, domain: Any, *, spec: VMSpec, run_dir: Path | None, uri: str) -> None:
        self.uri = uri
        self.spec = spec
        self.name = spec.name
        self._run_dir = run_dir
        self._conn = conn
        self._domain = domain
        self._log = log.bind(vm=self.name)
        self._closed = False
        self.qmp = LibvirtMonitor(domain, watch_lifecycle=False)
        try:
            self.events = DomainEvents(conn, domain, on_stopped=self.qmp.domain_stopped)
        except BaseException:
            self.qmp.close()
            raise
        self.devices = LibvirtDevices(
            name=self.name, domain=domain, events=self.events, qmp=self.qmp, vhost=spec.accel == "kvm"
        )
        self.xml = self.devices.xml
        self.disks = self.devices.disks
        self.hotplug_disk = self.devices.hotplug_disk
        self.unplug_disk = self.devices.unplug_disk
        self.nics = self.devices.nics
        self.hotplug_nic = self.devices.hotplug_nic
        self.unplug_nic = self.devices.unplug_nic
        self.hotplug_cpus = self.devices.hotplug_cpus
        self.unplug_cpus = self.devices.unplug_cpus
        self.balloon = self.devices.balloon
        self.set_balloon = self.devices.set_balloon
        self.memory = LibvirtMemory(name=self.name, domain=domain, devices=self.devices, qmp=self.qmp)
        self.memory_devices = self.memory.memory_devices
        self.hotplug_memory = self.memory.hotplug_memory
        self.unplug_memory = self.memory.unplug_memory
        self.add_virtio_mem = self.memory.add_virtio_mem
        self.resize_virtio_mem = self.memory.resize_virtio_mem
        self.blocks = LibvirtBlocks(name=self.name, domain=domain, events=self.events, devices=self.devices)
        self.snapshot_disks = self.blocks.snapshot_disks
        self.commit_disk = self.blocks.commit_disk
        self.stream_disk = self.blocks.stream_disk
        self.mirror_disk = self.blocks.mirror_disk
        self._console = LogConsole(run_dir / CONSOLE_LOG) if run_dir is not None and spec.serial_console else None

    # -- define and open --------------------------------------------------------------------

    @classmethod
    def define(
        cls, uri: str, spec: VMSpec, *, run_dir: str | Path, emulator: str | None = None, timeout: float = 60.0
    ) -> LibvirtVM:
        """Define ``spec`` as a persistent libvirt domain at ``uri`` and start it.

        ``run_dir`` (made if missing) holds the console log and the shell socket. Whatever libvirt
        refuses leaves nothing defined behind."""
        if not isinstance(spec, VMSpec):
            raise InvalidArgument(f"define needs a VMSpec, not {type(spec).__name__}")
        run_dir = Path(run_dir)
        binary = emulator or qemu_binary()
        if binary is None:
            raise InvalidArgument("no QEMU to name as the domain's emulator (install qemu-system-x86)")
        xml = domain_xml(spec, run_dir=run_dir.absolute(), emulator=binary)  # refuses before anything is sent
        run_dir.mkdir(parents=True, exist_ok=True)
        conn = open_connection(uri)
        libvirt = libvirt_module()
        try:
            # Listed, not looked up: a failed lookup is an error libvirt's default handler prints.
            if spec.name in (d.name() for d in bounded(f"{uri}: list domains", timeout, conn.listAllDomains, 0)):
                raise InvalidArgument(f"{uri} already has a domain called {spec.name!r}")
            domain = bounded(f"{spec.name}: define", timeout, conn.defineXML, xml)
            try:
                bounded(f"{spec.name}: start", timeout, domain.create)
                vm = cls(conn, domain, spec=spec, run_dir=run_dir, uri=uri)
            except BaseException:
                # A start that timed out may still happen: end what runs, then forget the definition.
                for undo in (domain.destroy, domain.undefine):
                    with contextlib.suppress(libvirt.libvirtError):
                        undo()
                raise
            log.info("libvirt.defined", vm=spec.name, uri=uri)
            return vm
        except BaseException:
            conn.close()
            raise

    @classmethod
    def open(cls, uri: str, name: str, *, run_dir: str | Path | None = None) -> LibvirtVM:
        """Take over the running domain ``name`` at ``uri``. Its spec is read back from libvirt's
        XML (disks, NICs, memory, vCPUs); ``run_dir`` defaults to where its shell socket is."""
        with domain_at(uri, name) as (conn, domain):
            spec, found_run_dir = spec_from_xml(str(domain.XMLDesc(0)))
            return cls(conn, domain, spec=spec, run_dir=Path(run_dir) if run_dir else found_run_dir, uri=uri)

    # -- what it is -------------------------------------------------------------------------

    @property
    def domain(self) -> Any:
        """The ``libvirt.virDomain``."""
        return self._domain

    @property
    def run_dir(self) -> Path:
        if self._run_dir is None:
            raise InvalidArgument(f"{self.name}: no run_dir is known (open it with run_dir=...)")
        return self._run_dir

    @property
    def known_run_dir(self) -> Path | None:
        return self._run_dir

    def reopened(self, uri: str, run_dir: Path | None) -> LibvirtVM:
        """This domain, found again at ``uri`` (where a migration moved it)."""
        return LibvirtVM.open(uri, self.name, run_dir=run_dir)

    @property
    def shell_socket(self) -> Path:
        return self.run_dir / SHELL_SOCKET

    @property
    def console(self) -> Console:
        if self._console is None:
            raise InvalidArgument(f"{self.name} has no console log that vmctl knows")
        return self._console

    def status(self) -> VMStatus:
        return VMStatus.from_qmp(self.qmp.execute("query-status"))

    @property
    def has_exited(self) -> bool:
        try:
            return not bool(bounded(f"{self.name}: isActive", 10.0, self._domain.isActive))
        except DomainNotFound:
            return True  # undefined after it stopped (migrated away, or transient)

    # -- run state --------------------------------------------------------------------------

    def pause(self, *, timeout: float = 30.0) -> None:
        bounded(f"{self.name}: suspend", timeout, self._domain.suspend)

    def resume(self, *, timeout: float = 30.0) -> None:
        bounded(f"{self.name}: resume", timeout, self._domain.resume)

    def reset(self, *, timeout: float = 30.0) -> None:
        bounded(f"{self.name}: reset", timeout, self._domain.reset, 0)

    def kill(self, *, timeout: float = 10.0) -> ExitStatus:
        """End QEMU at once (``destroy``)."""
        if not self.has_exited:
            bounded(f"{self.name}: destroy", timeout, self._domain.destroy)
        return _UNKNOWN_EXIT

    def wait(self, timeout: float) -> ExitStatus:
        """Wait until the domain has stopped; ``WaitTimeout`` if it still runs after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not self.has_exited:
            if time.monotonic() >= deadline:
                raise WaitTimeout(f"{self.name} still runs after {timeout:g}s")
            time.sleep(0.05)
        return _UNKNOWN_EXIT

    def shutdown(self, timeout: float = 30.0, *, step_timeout: float = 5.0) -> ShutdownResult:
        """Stop the guest: ACPI power button for ``step_timeout``, then libvirt's graceful destroy
        (SIGTERM), then destroy (SIGKILL); at most ``timeout`` in all."""
        libvirt = libvirt_module()
        started = time.monotonic()
        deadline = started + timeout
        if self.has_exited:
            return ShutdownResult(method=ShutdownMethod.ALREADY_EXITED, exit=_UNKNOWN_EXIT, seconds=0.0)
        steps = (
            (ShutdownMethod.POWERDOWN, lambda: self._domain.shutdownFlags(libvirt.VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)),
            (ShutdownMethod.TERMINATE, lambda: self._domain.destroyFlags(libvirt.VIR_DOMAIN_DESTROY_GRACEFUL)),
            (ShutdownMethod.KILL, self._domain.destroy),
        )
        for method, step in steps:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                bounded(f"{self.name}: {method.value}", left, step)
                self.wait(min(step_timeout, max(0.0, deadline - time.monotonic())))
            except (WaitTimeout, LibvirtError):
                if not self.has_exited:
                    continue  # the next, harder step
            self._log.info("libvirt.shut_down", method=method.value)
            return ShutdownResult(method=method, exit=_UNKNOWN_EXIT, seconds=time.monotonic() - started)
        raise WaitTimeout(f"{self.name} still runs after {timeout:g}s of shutdown")

    def undefine(self, *, timeout: float = 30.0) -> None:
        """Remove the domain's persistent definition (a running domain becomes transient)."""
        bounded(f"{self.name}: undefine", timeout, self._domain.undefine)

    # -- migration --------------------------------------------------------------------------

    def migrate(
        self,
        target_uri: str,
        request: MigrationRequest | None = None,
        /,
        *,
        persistent: bool = True,
        unsafe: bool = False,
        target_run_dir: str | os.PathLike[str] | None = None,
        target_disks: Mapping[str, str | os.PathLike[str]] | None = None,
        timeout: float = 30.0,
        **options: Unpack[MigrationKeywords],
    ) -> LibvirtMigration[LibvirtVM]:
        """Start a live peer-to-peer migration to the libvirt host ``target_uri`` (as the source's
        libvirtd reaches it, e.g. ``qemu+tcp://10.0.0.2:16509/system``) as ``request`` (or its
        keywords, ``MigrationRequest.of``) asks; ``wait`` on what it returns, then ``.target(uri)``
        is the domain there. libvirt takes the request's ``postcopy``, ``bandwidth`` in bytes/s
        (libvirt's unit is MiB/s, rounded up), ``downtime_limit`` in ms and ``copy_storage``, which
        copies the disks into images that exist on the target (``target_disks``: other paths there,
        by disk id); the rest of a request is refused. ``persistent`` defines it on the target and
        undefines it here; ``unsafe`` migrates disks on a local filesystem that both hosts share;
        ``target_run_dir``: the console log and shell socket go there on the target. See
        :mod:`vmctl.libvirt.migration`."""
        return start_migration(
            self, target_uri, MigrationRequest.of(request, **options), persistent=persistent, unsafe=unsafe,
            target_run_dir=target_run_dir, target_disks=target_disks, timeout=timeout,
        )  # fmt: skip

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the domain (it runs on); idempotent."""
        if self._closed:
            return
        self._closed = True
        self.qmp.close()
        self.events.close()
        with contextlib.suppress(libvirt_module().libvirtError):
            self._conn.close()

    def __enter__(self) -> LibvirtVM:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
