"""The intent of a device operation, written to the state file before its first step.

A control plane can die at any moment of an operation. With the intent on disk, the next
``VM.attach`` asks QEMU what it has of that device and settles the operation: it completed (the
inventory gets it), it never started or was undone (nothing to do), or it stopped half-way: then
``vm.leftovers`` names what is left and ``vm.clean_leftovers()`` finishes the cleanup.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from vmctl.errors import CommandError, QMPError
from vmctl.model import DiskSpec, Inventory, NicSpec
from vmctl.model.names import disk_node_names, fdset_tag, is_disk_fdset, netdev_id, secret_object_id, tap_fd_name
from vmctl.ops import backup as backup_ops
from vmctl.ops import disks as disk_ops
from vmctl.ops import migration as migration_ops
from vmctl.ops import nics as nic_ops
from vmctl.ops.blockjobs import end_orphan_job
from vmctl.ops.chains import device_node
from vmctl.ops.devices import device_present, object_exists, pin_pci_address
from vmctl.ops.queries import ask
from vmctl.qmp import Monitor

Operation = Literal[
    "hotplug_disk", "unplug_disk", "hotplug_nic", "unplug_nic", "snapshot_disk", "migrate", "incoming", "backup"
]

#: The key of a migration's intent (one at a time per VM), where a device's id keys the others.
MIGRATION = "(migration)"
#: The key of a backup's intent (one at a time per VM).
BACKUP = "(backup)"
#: Where a migration stands in ``query-migrate``: still moving before postcopy (it can be cancelled).
_PRECOPY = frozenset({"setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling"})


@attrs.frozen(kw_only=True)
class Intent:
    """An operation under way on one device (the value it plugs, or the one it unplugs; for a
    snapshot, the disk as it is once switched to its new overlay, and the files it creates), or a
    migration on either side (``peer``: the other side's run dir, or the URI migrated to)."""

    operation: Operation
    disk: DiskSpec | None = None
    nic: NicSpec | None = None
    files: tuple[str, ...] = ()
    peer: str | None = None
    resume: bool = True  # incoming: whether the target runs the guest once it has it
    checkpoint: str | None = None  # backup: the checkpoint it makes
    disk_ids: tuple[str, ...] = ()  # backup: the disks it copies

    @property
    def device_id(self) -> str:
        if self.operation in ("migrate", "incoming"):
            return MIGRATION
        if self.operation == "backup":
            return BACKUP
        device = self.disk or self.nic
        assert device is not None
        return device.id

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Intent:
        disk, nic = data.get("disk"), data.get("nic")
        return cls(
            operation=data["operation"],
            disk=DiskSpec(**disk) if disk else None,
            nic=NicSpec(**nic) if nic else None,
            files=tuple(data.get("files", ())),
            peer=data.get("peer"),
            resume=bool(data.get("resume", True)),
            checkpoint=data.get("checkpoint"),
            disk_ids=tuple(data.get("disk_ids", ())),
        )


@attrs.frozen(kw_only=True)
class Settled:
    """What QEMU showed of an intent: the inventory to keep, and what is left over (if anything)."""

    inventory: Inventory
    leftovers: tuple[str, ...] = ()


def parts(qmp: Monitor, intent: Intent) -> dict[str, bool]:
    """Which parts of the intent's device QEMU has, by name."""
    device_id = intent.device_id
    if intent.operation == "snapshot_disk":
        return _new_layer(qmp, intent)
    found = {f"device {device_id}": device_present(qmp, device_id)}
    if intent.disk is not None:
        nodes = set(disk_ops.disk_nodes(qmp, device_id))
        found[f"node {intent.disk.active_node}"] = intent.disk.active_node in nodes
        for node in sorted(nodes - {intent.disk.active_node}):
            found[f"node {node}"] = True
        tags = {
            o
            for s in ask(qmp, "query-fdsets")
            for fd in s.get("fds", ())
            if is_disk_fdset(o := fd.get("opaque"), device_id)
        }
        base = fdset_tag(device_id, intent.disk.base_layer)
        found[f"fdset {base}"] = base in tags
        for tag in sorted(tags - {base}):  # a snapshot's layers
            found[f"fdset {tag}"] = True
        if intent.disk.encryption is not None:  # its passphrase's secret object
            secret_id = secret_object_id(device_id)
            found[f"object {secret_id}"] = object_exists(qmp, secret_id)
    else:
        netdev = re.escape(netdev_id(device_id))
        listed = re.search(rf"^[ \\]*{netdev}: ", qmp.human("info network"), re.MULTILINE)
        found[f"netdev {netdev_id(device_id)}"] = listed is not None
    return found


def _new_layer(qmp: Monitor, intent: Intent) -> dict[str, bool]:
    """What QEMU and the host have of a snapshot's new layer (the device's switch aside)."""
    assert intent.disk is not None
    disk = intent.disk
    layer = disk.layers[-1]
    nodes = set(disk_ops.disk_nodes(qmp, disk.id))
    found = {f"node {node}": node in nodes for node in disk_node_names(disk.id, layer)}
    opaques = {fd.get("opaque") for s in ask(qmp, "query-fdsets") for fd in s.get("fds", ())}
    found[f"fdset {fdset_tag(disk.id, layer)}"] = fdset_tag(disk.id, layer) in opaques
    found.update({f"file {path}": os.path.exists(path) for path in intent.files})
    return found


def settle(qmp: Monitor, intent: Intent, inventory: Inventory) -> Settled:
    """The inventory as QEMU shows the operation ended, and what is left if it stopped half-way.
    A hotplug whose device is whole is completed (its I/O limits set, the last step); a
    snapshot is completed when the disk's device is on its new overlay (it switched atomically)."""
    if intent.operation in ("migrate", "incoming"):
        return _settle_migration(qmp, intent, inventory)
    if intent.operation == "backup":
        return _settle_backup(qmp, intent, inventory)
    if intent.operation == "snapshot_disk":
        assert intent.disk is not None
        if device_node(qmp, intent.device_id) == intent.disk.active_node:
            return Settled(inventory=inventory.with_disk(intent.disk))
    found = parts(qmp, intent)
    # An unplug that was begun is finished, never guessed undone: its device_del may be on its
    # way through the guest, so a device that is whole now may be gone in a moment.
    if all(found.values()) and intent.operation in ("hotplug_disk", "hotplug_nic"):
        if intent.operation == "hotplug_disk":
            assert intent.disk is not None
            disk = pin_pci_address(qmp, intent.disk)
            if disk.throttle is not None:  # the hotplug's last step, which may not have run
                disk_ops.set_throttle(qmp, disk_id=disk.id, throttle=disk.throttle, bus=disk.bus)
            return Settled(inventory=inventory.with_disk(disk))
        assert intent.nic is not None
        return Settled(inventory=inventory.with_nic(pin_pci_address(qmp, intent.nic)))
    if not any(found.values()):  # nothing of it is there
        if intent.operation == "hotplug_nic":
            forget_tap_fds(qmp, intent)
        if intent.operation == "unplug_disk":
            return Settled(inventory=inventory.without_disk(intent.device_id))
        if intent.operation == "unplug_nic":
            return Settled(inventory=inventory.without_nic(intent.device_id))
        return Settled(inventory=inventory)  # a hotplug undone, or never begun
    return Settled(inventory=inventory, leftovers=tuple(name for name, there in found.items() if there))


def _settle_migration(qmp: Monitor, intent: Intent, inventory: Inventory) -> Settled:
    """A migration whose control plane died, on one side. Source: one still before postcopy is
    cancelled (the guest stays here); an ended one leaves nothing; a completed one leaves this
    stale QEMU to quit; one in postcopy must finish. Target: one that has the whole guest is
    resumed (as the migration's last step would have); one under way is the source's to end.
    The source is to be settled first: until it is, its QEMU may still be running the dead
    control plane's last command, and a target that has seen no migration yet may get one."""
    if intent.operation == "migrate":
        status = migration_ops.outgoing_status(qmp)
        if status in _PRECOPY:
            status = migration_ops.cancel_orphan(qmp)
        if status == "completed":
            return Settled(
                inventory=inventory, leftovers=(f"migrated: the guest runs on {intent.peer}; quit this QEMU",)
            )
        if status in migration_ops.POSTCOPY:
            return Settled(inventory=inventory, leftovers=(f"migration in {status} to {intent.peer}",))
        return Settled(inventory=inventory)  # none, failed or cancelled: the guest is here
    status = str(ask(qmp, "query-migrate").get("status", "none"))
    if status == "completed":
        if intent.resume and not ask(qmp, "query-status").get("running"):
            qmp.execute("cont")
        return Settled(inventory=inventory)
    # No source ever came (QEMU 10.0 says "setup" as soon as it listens, 7.2 says nothing): it
    # still waits, empty, for another attempt; the source, settled first, is not coming.
    if status in ("none", "setup"):
        return Settled(inventory=inventory)
    return Settled(inventory=inventory, leftovers=(f"incoming migration {status} from {intent.peer}",))


def _settle_backup(qmp: Monitor, intent: Intent, inventory: Inventory) -> Settled:
    """A backup whose control plane died: nobody is left to collect it, so it is cancelled (one
    that completed meanwhile is dropped the same way); its jobs, target nodes, fdsets, bitmap
    copy, its own checkpoint and its files go. The earlier checkpoints hold every change, so the
    next backup since one of them misses nothing."""
    assert intent.checkpoint is not None
    disks = [d for d in inventory.disks if d.id in intent.disk_ids]
    for disk in disks:
        end_orphan_job(qmp, backup_ops.job_id(disk))
    backup_ops.finish(qmp, disks, intent.checkpoint, succeeded=False)
    for path in intent.files:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    return Settled(inventory=inventory)


def clean(qmp: Monitor, log: Any, intent: Intent, *, timeout: float, quit_source: Callable[[], Any]) -> bool:
    """Remove what an operation stopped half-way left (a hotplug is undone, an unplug finished;
    a snapshot that did not switch loses its new layer's nodes, fdset and the files it made; a
    migrated-away source quits (``quit_source``); a migration in postcopy, or an incoming one,
    is waited out). Returns whether the operation ended with its QEMU (nothing to settle)."""
    if intent.operation in ("migrate", "incoming"):
        status = migration_ops.wait_for_end(qmp, timeout=timeout, outgoing=intent.operation == "migrate")
        if intent.operation == "migrate" and status == "completed":
            log.info("vm.migrated_away", to=intent.peer)
            quit_source()
            return True
        return False
    if intent.operation == "backup":
        return False  # settled whole at attach
    if intent.operation == "snapshot_disk":
        assert intent.disk is not None
        if device_node(qmp, intent.device_id) == intent.disk.active_node:  # it switched after all
            return False
        layer = intent.disk.layers[-1]
        disk_ops.delete_disk_nodes(qmp, intent.device_id, only=set(disk_node_names(intent.device_id, layer)))
        disk_ops.remove_disk_fdsets(qmp, intent.device_id, layers={layer})
        for path in intent.files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        return False
    if intent.disk is not None:
        encrypted = intent.disk.encryption is not None
        disk_ops.unplug_disk(qmp, log, disk_id=intent.device_id, encrypted=encrypted, timeout=timeout)
        return False
    nic_ops.unplug_nic(qmp, log, nic_id=intent.device_id, timeout=timeout)
    forget_tap_fds(qmp, intent)
    return False


def forget_tap_fds(qmp: Monitor, intent: Intent) -> None:
    """Close the tap fds a NIC hotplug passed and never used: no query shows them, but they
    keep the tap alive."""
    assert intent.nic is not None
    for queue in range(intent.nic.queues):
        with contextlib.suppress(CommandError):
            qmp.execute("closefd", {"fdname": tap_fd_name(intent.device_id, queue)})


def settle_quietly(qmp: Monitor, intent: Intent, inventory: Inventory) -> Settled | None:
    """``settle``, or ``None`` when QEMU cannot be asked (the monitor is gone)."""
    try:
        return settle(qmp, intent, inventory)
    except QMPError:
        return None
