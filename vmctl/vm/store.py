"""A VM's inventory and the state file that records it: the one place both change.

Every device or block operation runs under ``lock`` (one at a time keeps the inventory true)
and ends with ``update``, which writes the state file before it returns, so a control plane that
restarts (``VM.attach``) finds what the VM really has.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmctl.errors import (
    DeviceExists,
    HotplugError,
    InvalidArgument,
    NoHotplugSlot,
    OperationTimeout,
    StateError,
    UnknownDevice,
)
from vmctl.model import DiskSpec, Inventory, VMSpec
from vmctl.model.names import QMP_SOCKET, secret_object_id
from vmctl.model.pcie import Controller
from vmctl.ops.deadline import Deadline
from vmctl.ops.devices import device_present
from vmctl.qmp import Monitor
from vmctl.vm import journal
from vmctl.vm.journal import Intent
from vmctl.vm.secrets import load_master_key, secret_object
from vmctl.vm.statefile import VMRecord, write_record


class StateStore:
    def __init__(
        self,
        *,
        run_dir: Path,
        spec: VMSpec,
        inventory: Inventory,
        pid: int,
        start_time: int,
        qmp: Monitor,
        pending: tuple[Intent, ...] = (),
        vcpus_created: int = 0,
    ) -> None:
        self.run_dir = run_dir
        self.spec = spec
        self._inventory = inventory
        self._pid = pid
        self._start_time = start_time
        self._qmp = qmp
        self._pending = {intent.device_id: intent for intent in pending}
        self._leftovers: dict[str, tuple[str, ...]] = {}
        self.lock = threading.RLock()
        self._qmp_socket = str(run_dir / QMP_SOCKET)
        self.vcpus_created = vcpus_created or spec.cpus + len(inventory.hotplugged_cpus)

    @property
    def inventory(self) -> Inventory:
        return self._inventory

    @property
    def pending(self) -> tuple[Intent, ...]:
        """The device operations under way, or stopped half-way (one per device)."""
        return tuple(self._pending.values())

    @property
    def leftovers(self) -> tuple[str, ...]:
        return tuple(item for items in self._leftovers.values() for item in items)

    def update(self, change: Callable[[Inventory], Inventory], *, ends: str | None = None) -> Inventory:
        """Apply ``change`` to the inventory and write the state file; returns the new inventory.
        The operation under way on device ``ends`` (if any) ends with it, in the same write."""
        with self.lock:
            self._inventory = change(self._inventory)
            if ends is not None:
                self._pending.pop(ends, None)
                self._leftovers.pop(ends, None)
            self.save()
            return self._inventory

    @contextlib.contextmanager
    def held(self, limit: Deadline) -> Iterator[None]:
        """``lock``, waited for no longer than ``limit``: an operation's timeout counts its wait
        for the VM's other operation too."""
        step = f"{self.spec.name}: waiting for its other device or block operation"
        if not self.lock.acquire(timeout=limit.left(step)):
            raise OperationTimeout(step=step, timeout=limit.timeout)
        try:
            yield
        finally:
            self.lock.release()

    @contextlib.contextmanager
    def intent(self, intent: Intent) -> Iterator[Callable[[Callable[[Inventory], Inventory]], Inventory]]:
        """Record ``intent`` before the operation's first step; the operation ends it with the
        ``update`` this yields. If it fails instead, QEMU is asked what is left of it: nothing
        (the intent goes), or leftovers (the intent stays, for ``clean_leftovers``, a retry of
        the same operation, or the next attach)."""
        device = intent.device_id
        with self.lock:
            earlier = self._pending.get(device)
            # A retried unplug finishes what the first left; anything else cleans up first.
            if earlier is not None and (earlier.operation != intent.operation or "unplug" not in intent.operation):
                raise StateError(
                    f"{self.spec.name}: {earlier.operation} of {device} stopped half-way; vm.clean_leftovers() "
                    f"first (left: {', '.join(self._leftovers.get(device, ())) or 'unknown'})"
                )
            self._pending[device] = intent
            self.save()
            try:
                yield functools.partial(self.update, ends=device)
            except BaseException:
                if self._pending.get(device) is intent:
                    self._settle(device)
                raise

    def begin(self, intent: Intent) -> None:
        """Record an operation that outlives the call that starts it (a migration); ``end``
        closes it. One that stopped half-way must be cleaned up first."""
        with self.lock:
            earlier = self._pending.get(intent.device_id)
            if earlier is not None:
                raise StateError(
                    f"{self.spec.name}: {earlier.operation} stopped half-way; vm.clean_leftovers() first "
                    f"(left: {', '.join(self._leftovers.get(intent.device_id, ())) or 'unknown'})"
                )
            self._pending[intent.device_id] = intent
            self.save()

    def end(self, key: str) -> None:
        """The operation recorded under ``key`` has ended, one way or the other."""
        with self.lock:
            if self._pending.pop(key, None) is not None:
                self._leftovers.pop(key, None)
                self.save()

    def settle(self) -> None:
        """Settle every recorded intent from what QEMU has (at attach)."""
        with self.lock:
            for device in list(self._pending):
                self._settle(device)

    def _settle(self, device: str) -> None:
        intent = self._pending[device]
        settled = journal.settle_quietly(self._qmp, intent, self._inventory)
        if settled is None:  # QEMU cannot be asked now: the next attach settles it
            self._leftovers[device] = (f"unknown: {intent.operation} of {device}",)
            return
        self._inventory = settled.inventory
        if settled.leftovers:
            self._leftovers[device] = settled.leftovers
        else:
            self._pending.pop(device)
            self._leftovers.pop(device, None)
        self.save()

    def clean_leftovers(self, log: Any, *, timeout: float, quit_source: Callable[[], Any]) -> None:
        """Finish what operations stopped half-way left: a hotplug is undone, an unplug completed."""
        with self.lock:
            self.settle()
            for device, intent in list(self._pending.items()):
                if journal.clean(self._qmp, log, intent, timeout=timeout, quit_source=quit_source):  # ended with QEMU
                    self.end(device)
                else:
                    self._settle(device)
            if self._pending:
                raise HotplugError(f"{self.spec.name}: leftovers remain", remaining=self.leftovers)

    def save(self) -> None:
        write_record(
            self.run_dir,
            VMRecord(
                pid=self._pid,
                start_time=self._start_time,
                qmp_socket=self._qmp_socket,
                spec=self.spec,
                inventory=self._inventory,
                pending=tuple(self._pending.values()),
                vcpus_created=self.vcpus_created,
            ),
        )

    def require_disk(self, disk_id: str) -> DiskSpec:
        disk = self._inventory.disk(disk_id)
        if disk is None:
            raise UnknownDevice(f"{self.spec.name} has no disk {disk_id!r}")
        return disk

    def free_port(self, device_id: str, wanted: int | None = None) -> int | None:
        """The PCIe root port for a new device on q35: ``wanted`` if given and free, else the
        lowest free one (``NoHotplugSlot`` if none). ``None`` on a plain PCI machine, where QEMU
        picks the slot."""
        if not self.spec.pcie:
            if wanted is not None:
                raise InvalidArgument(f"{device_id}: root ports are for q35 machines, not {self.spec.machine}")
            return None
        if wanted is None:
            return self._inventory.free_port(vm=self.spec.name, device=device_id)
        if wanted >= self._inventory.root_ports or wanted in self._inventory.used_ports():
            raise NoHotplugSlot(
                f"{self.spec.name}: root port {wanted} for {device_id} is "
                + ("in use" if wanted < self._inventory.root_ports else f"not one of its {self._inventory.root_ports}")
            )
        return wanted

    def controller(self, make: Callable[[int | None], Controller]) -> Controller:
        """The VM's controller of this kind, or a new one (on a free port) to add."""
        existing = self._inventory.controller(make(None).id)
        return existing if existing is not None else make(self.free_port(make(None).id))

    def secret_object(self, disk: DiskSpec) -> dict[str, Any] | None:
        """The ``object-add`` of a disk's passphrase, encrypted with this VM's master key."""
        if disk.encryption is None:
            return None
        key = load_master_key(self.run_dir)
        if key is None:
            raise InvalidArgument(f"disk {disk.id}: this VM has no master key for secrets (launched by an older vmctl)")
        return secret_object(secret_object_id(disk.id), disk.encryption, key)

    def refuse_duplicate(self, device_id: str) -> None:
        if device_id in self._inventory.device_ids() or device_present(self._qmp, device_id):
            raise DeviceExists(f"{self.spec.name} already has a device {device_id!r}")
