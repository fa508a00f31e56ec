"""A VM's migrations: the target's spec, ``migrate`` (with storage copy), the hand-over.

Work that spans two VMs lives here: the source's part drives the target's part (its monitor,
its inventory, its NBD exports) and hands the inventory over when the guest has moved."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from vmctl.errors import InvalidArgument, QMPError
from vmctl.model import Inventory, VMSpec
from vmctl.model.migration import DEFAULT_DOWNTIME_LIMIT_MS, MigrationOptions, MigrationRequest
from vmctl.model.names import MIGRATION_SOCKET, NBD_SOCKET, UEFI_VARS_FILE
from vmctl.model.status import ShutdownMethod
from vmctl.model.tls import TLSCreds
from vmctl.ops import convergence as convergence_ops
from vmctl.ops import cpus as cpu_ops
from vmctl.ops import migration as migration_ops
from vmctl.ops.convergence_driver import ConvergenceDriver
from vmctl.ops.live_migration import Migration
from vmctl.ops.nbd import NbdAddress
from vmctl.qmp import Monitor
from vmctl.vm import tls as tls_ops
from vmctl.vm.blocks import Blocks
from vmctl.vm.journal import MIGRATION, Intent
from vmctl.vm.lifecycle import Lifecycle
from vmctl.vm.privileges import userfaultfd_refusal
from vmctl.vm.rendezvous import Rendezvous
from vmctl.vm.storage_copy import StorageCopy
from vmctl.vm.store import StateStore


class Migrations:
    def __init__(
        self, *, name: str, qmp: Monitor, store: StateStore, blocks: Blocks, lifecycle: Lifecycle, log: Any
    ) -> None:
        self.name = name
        self.qmp = qmp
        self.blocks = blocks
        self._store = store
        self._lifecycle = lifecycle
        self._log = log

    @property
    def inventory(self) -> Inventory:
        return self._store.inventory

    @property
    def run_dir(self) -> Path:
        return self._store.run_dir

    def migration_target_spec(
        self, *, name: str | None = None, disk_paths: Mapping[str, str | os.PathLike[str]] | None = None
    ) -> VMSpec:
        """A spec for a migration target with this VM's devices as they are now, hotplugged ones
        included, at the same PCI addresses and memory slots. NIC backends are the target's own
        (user networking unless the caller sets taps). ``disk_paths`` gives the target its own
        (flat, same-size) images for those disks, for ``migrate(copy_storage=True)``."""
        inventory = self._store.inventory
        spec = self._store.spec
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
        if any(d.bus == "scsi" for d in inventory.disks) and not any(d.bus == "scsi" for d in spec.disks):
            raise InvalidArgument(f"{self.name}: migrating SCSI disks hotplugged at run time is not supported yet")
        extra = list(spec.extra_args)
        for memory in inventory.memory:
            extra += memory.arguments()
        for device in inventory.virtio_mem:
            extra += device.arguments()
        for slot in cpu_ops.cpu_slots(self.qmp):
            if slot.hotplugged_by_us:
                props = ",".join(f"{key}={value}" for key, value in slot.props.items())
                extra += ["-device", f"{slot.type},id={slot.device_id},{props}"]
        target = attrs.evolve(
            spec,
            name=name or spec.name,
            disks=disks,
            nics=tuple(attrs.evolve(n, tap=None) for n in inventory.nics),
            hotplug_slots=0,
            # The source's UEFI variables, copied into the target's run dir when it launches.
            uefi_vars=str(self.run_dir / UEFI_VARS_FILE) if spec.firmware == "uefi" else None,
        )
        layout = target.layout()
        launched = {c.id for c in layout.controllers}
        for controller in inventory.controllers:  # added at run time: on the target's command line
            if controller.id not in launched:
                extra += controller.arguments()
        if not spec.pcie:
            return attrs.evolve(target, extra_args=tuple(extra))
        # The source's pool of root ports: as many free ones as make it up with those placed.
        placed = [d.port for d in layout.disks] + [n.port for n in layout.nics] + [c.port for c in layout.controllers]
        free = inventory.root_ports - len({port for port in placed if port is not None})
        return attrs.evolve(target, extra_args=tuple(extra), hotplug_slots=free)

    def migrate(self, target: Migrations | str, request: MigrationRequest) -> Migration:
        """Start migrating to ``target``: a VM from ``launch_incoming`` (it listens on a unix
        socket in its run dir, or on ``request.listen`` = (host, port) over TCP) or a migration URI.

        Capabilities (``events`` always) and parameters are set on both sides and restored on
        the source if the migration fails. On success the target is resumed and this source
        quits (unless told otherwise).

        ``copy_storage`` copies the disks whose image differs on the target (see
        ``migration_target_spec(disk_paths=...)``) first: each is mirrored into the target's NBD
        export until in sync (``storage_timeout``), then RAM follows.

        ``tls`` encrypts the stream: the target gets the server credentials, the source the
        client ones, and each verifies the other against the CA; the target's certificate must
        name the host the source connects to (``listen``'s, or a ``tcp:`` URI's). ``target_tls``
        gives the target (another host) its own credentials directory, signed by the same CA.

        ``policy`` (``finish_within``, seconds) gives the migration a convergence policy: at each
        pass (whether or not anybody is inside ``wait()``) vmctl predicts whether precopy will end
        in time and, when it will not, escalates: the downtime limit up to ``max_downtime_ms``
        (default QEMU's 300), then postcopy if ``allow_postcopy`` (and the target can), else CPU
        throttling if ``allow_throttle`` (where it is safe on this QEMU); ``allow_compression`` has
        XBZRLE on from the start where it is safe (QEMU sizes its cache only then). A migration not
        done by then is cancelled (``MigrationError`` naming the figures; the source runs on). The
        result lists the steps taken (``result.escalations``) and those this QEMU rules out
        (``result.skipped``)."""
        convergence_policy, listen, tls = request.policy, request.listen, request.tls
        postcopy_refusal: str | None = None
        target_tls = request.target_tls or tls
        hostname = None
        if tls is not None:
            hostname = _tls_hostname(target, listen)
            tls.paths("client")
            if isinstance(target, Migrations) and target_tls is not None:
                target_tls.paths("server")
        options = MigrationOptions.of(
            request,
            tls_server=tls_ops.creds_id("migration", "server")
            if tls is not None and isinstance(target, Migrations)
            else None,
            tls_client=tls_ops.creds_id("migration", "client") if tls is not None else None,
            tls_hostname=hostname,
        )
        if isinstance(target, Migrations):
            mismatch = _device_mismatch(self._store.inventory, target.inventory)
            if mismatch:
                raise InvalidArgument(
                    f"{target.name} does not have {self.name}'s devices ({mismatch}); "
                    "launch it from source.migration_target_spec() with inventory=source.inventory"
                )
            if request.postcopy or (convergence_policy is not None and convergence_policy.allow_postcopy):
                # QEMU would refuse the capability, saying less
                postcopy_refusal = userfaultfd_refusal(target._lifecycle.pid, version=target.qmp.version)
                if request.postcopy and postcopy_refusal is not None:
                    raise InvalidArgument(f"postcopy=True: {postcopy_refusal}")
        elif not isinstance(target, str) or not target:
            raise InvalidArgument(f"migrate to a VM launched for incoming or a URI, not {target!r}")
        elif request.copy_storage:
            raise InvalidArgument("copy_storage needs a target VM (launched with launch_incoming)")
        plan = None
        if convergence_policy is not None:
            plan = convergence_ops.plan(
                self.qmp,
                policy=convergence_policy,
                target=target.qmp if isinstance(target, Migrations) else None,
                postcopy_refusal=postcopy_refusal,
                multifd=bool(request.multifd_channels),
                copy_storage=request.copy_storage,
            )
            for skipped in plan.skipped:
                self._log.info("vm.migration_step_skipped", step=skipped.step.value, reason=skipped.reason)
            # Capabilities are fixed when the migration starts: postcopy's on in case it is
            # needed, and auto-converge's on with its throttle held at 1% until the policy lets it go.
            options = attrs.evolve(
                options,
                postcopy=request.postcopy or plan.postcopy,
                throttle_held=plan.throttle,
                xbzrle=plan.compression_cache is not None,
                xbzrle_cache=plan.compression_cache,
                downtime_limit=request.downtime_limit
                or min(DEFAULT_DOWNTIME_LIMIT_MS, convergence_policy.max_downtime_ms),
            )
        # The journal on both sides: a control plane that dies from here on leaves each QEMU
        # with what its next attach needs to settle the migration (see vm.journal).
        self._store.begin(
            Intent(operation="migrate", peer=str(target.run_dir) if isinstance(target, Migrations) else target)
        )
        if isinstance(target, Migrations):
            try:
                target._store.begin(Intent(operation="incoming", peer=str(self.run_dir), resume=request.resume_target))
            except BaseException:
                self._store.end(MIGRATION)
                raise

        rendezvous = (
            Rendezvous.between(self._lifecycle.pid, target._lifecycle.pid, target.run_dir)
            if isinstance(target, Migrations) and listen is None
            else None
        )

        def ended() -> None:
            # A source whose monitor was lost (not always a dead QEMU) may live on mid-migration:
            # its entry stays for its next attach to settle, and so does the target's, unless the
            # guest was handed over and runs there.
            source_lost = not self.qmp.is_connected and self._lifecycle.process_running
            if not source_lost:
                self._store.end(MIGRATION)
            if isinstance(target, Migrations) and (not source_lost or _runs(target.qmp)):
                target._store.end(MIGRATION)

        try:
            storage = (
                self._copy_storage(
                    target, listen, request.storage_timeout, tls=tls, target_tls=target_tls, rendezvous=rendezvous
                )
                if isinstance(target, Migrations) and request.copy_storage
                else None
            )
        except BaseException:
            ended()
            raise
        previous_caps: dict[str, bool] = {}
        previous_params: dict[str, Any] = {}

        def restore() -> None:  # what the source had before this migration set it
            if previous_caps:
                migration_ops.set_capabilities(self.qmp, previous_caps)
            if previous_params:
                migration_ops.set_parameters(self.qmp, previous_params)
            if tls is not None:
                tls_ops.unload(self.qmp, "migration", "client")

        target_events = events = driver = None
        try:
            if tls is not None:
                if isinstance(target, Migrations) and target_tls is not None:
                    tls_ops.load(target.qmp, target_tls, target.run_dir, "migration", "server")
                tls_ops.load(self.qmp, tls, self.run_dir, "migration", "client")
            if isinstance(target, Migrations):
                uri = self._listen_uri(target, listen, rendezvous)
                migration_ops.set_capabilities(target.qmp, options.capabilities(source=False))
                migration_ops.set_parameters(target.qmp, options.parameters(source=False))
                target_events = target.qmp.events("MIGRATION")
                migration_ops.listen_incoming(target.qmp, uri)
                if rendezvous is not None:
                    rendezvous.open_socket(MIGRATION_SOCKET)
            else:
                uri = target
            migration_ops.set_capabilities(self.qmp, options.capabilities(source=True), replaced=previous_caps)
            migration_ops.set_parameters(self.qmp, options.parameters(source=True), replaced=previous_params)
            events = self.qmp.events("MIGRATION")
            if convergence_policy is not None and plan is not None:
                # Acting from the source's own events from the first pass on, whoever waits.
                convergence = convergence_ops.Convergence(
                    convergence_policy, plan, started=time.monotonic(), downtime_limit_ms=options.downtime_limit or 0
                )
                driver = ConvergenceDriver(self.qmp, convergence, self._log)
                driver.start()
            migration_ops.start(self.qmp, uri)
        except BaseException:
            if driver is not None:
                driver.stop()
            for subscription in (events, target_events):
                if subscription is not None:
                    subscription.close()
            with contextlib.suppress(QMPError):  # the original error is the one to raise
                restore()
            if storage is not None:
                storage.abort()
            ended()
            raise
        self._log.info(
            "vm.migration_started",
            uri=uri,
            postcopy=options.postcopy,
            copy_storage=request.copy_storage,
            finish_within=convergence_policy.finish_within if convergence_policy is not None else None,
            max_downtime_ms=convergence_policy.max_downtime_ms if convergence_policy is not None else None,
        )
        on_target_ready = None
        if isinstance(target, Migrations):  # its own images and NIC backends, the source's everything else
            handed_over = attrs.evolve(self._store.inventory, disks=target.inventory.disks, nics=target.inventory.nics)

            def on_target_ready() -> None:
                target.adopt_inventory(handed_over)

        return Migration(
            source=self.qmp,
            target=target.qmp if isinstance(target, Migrations) else None,
            log=self._log,
            uri=uri,
            options=options,
            source_events=events,
            target_events=target_events,
            restore=restore,
            resume_target=request.resume_target,
            stop_source=request.stop_source,
            on_target_ready=on_target_ready,
            finish_source=self.finish_migrated_source,
            on_completed=storage.finish if storage is not None else None,
            on_aborted=storage.abort if storage is not None else None,
            on_ended=functools.partial(_ended_with, ended, rendezvous),
            convergence=driver,
        )

    def _listen_uri(self, target: Migrations, listen: tuple[str, int] | None, rendezvous: Rendezvous | None) -> str:
        """Where the target listens: TCP where asked; on this host a unix socket, in the
        rendezvous when the two QEMUs run as different uids (multifd's channels connect there
        too), else in the target's run dir."""
        if listen is not None:
            return f"tcp:{listen[0]}:{listen[1]}"
        if rendezvous is not None:
            return f"unix:{rendezvous.socket(MIGRATION_SOCKET)}"
        return f"unix:{target.run_dir / MIGRATION_SOCKET}"

    def _copy_storage(
        self,
        target: Migrations,
        listen: tuple[str, int] | None,
        timeout: float,
        *,
        tls: TLSCreds | None,
        target_tls: TLSCreds | None,
        rendezvous: Rendezvous | None,
    ) -> StorageCopy:
        """Mirror the disks whose image differs on the target into its NBD exports, until in
        sync; with ``tls``, over NBD with TLS (the target serves, the source is the client)."""
        theirs = {d.id: d for d in target.inventory.disks}
        to_copy = [d for d in self._store.inventory.disks if theirs[d.id].path != d.path or theirs[d.id].overlays]
        if not to_copy:
            raise InvalidArgument("copy_storage: the target uses the same images (launch it with disk_paths)")
        # Over TCP the NBD server listens next to the migration port; else on a socket in the
        # rendezvous (QEMUs of different uids) or in its run dir.
        address: NbdAddress | None = (listen[0], listen[1] + 1) if listen else None
        if rendezvous is not None:
            address = rendezvous.socket(NBD_SOCKET)
        client_tls = None
        if tls is not None:
            client_tls = tls_ops.load(self.qmp, tls, self.run_dir, "nbd", "client")
        return StorageCopy.start(
            self.qmp,
            target.blocks,
            to_copy,
            address=address,
            timeout=timeout,
            log=self._log,
            tls=(client_tls, target_tls) if client_tls is not None and target_tls is not None else None,
        )

    def adopt_inventory(self, inventory: Inventory) -> None:
        """Take over the device inventory of the VM this one was migrated from."""
        self._store.update(lambda _: inventory)

    def finish_migrated_source(self, *, timeout: float = 10.0) -> None:
        """The guest runs elsewhere now: quit this QEMU (an expected exit)."""
        self._lifecycle.escalate((ShutdownMethod.QUIT, ShutdownMethod.KILL), step_timeout=timeout)
        self._log.info("vm.migrated_away")


def _tls_hostname(target: Migrations | str, listen: tuple[str, int] | None) -> str:
    """The host the source connects to, which the target's certificate must name."""
    if isinstance(target, Migrations):
        if listen is None:
            raise InvalidArgument("tls needs a TCP migration: give listen=(host, port)")
        return listen[0]
    kind, _, rest = target.partition(":")
    if kind != "tcp":
        raise InvalidArgument(f"tls needs a tcp: URI, not {target!r}")
    return rest.rpartition(":")[0].strip("[]")


def _runs(qmp: Monitor) -> bool:
    try:
        return bool(qmp.execute("query-status").get("running"))
    except QMPError:
        return False


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


def _ended_with(ended: Callable[[], None], rendezvous: Rendezvous | None) -> None:
    """A migration's end; its rendezvous goes with it (a setup that failed keeps it: the target
    still listens there for the next attempt)."""
    ended()
    if rendezvous is not None:
        rendezvous.close()
