"""What the VM's method groups (devices, block operations, migration) share: the monitor, the
inventory and its lock, the state file. :class:`vmctl.vm.VM` provides all of it."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import attrs

from vmctl.errors import DeviceExists, UnknownDevice
from vmctl.model import DiskSpec, Inventory, VMSpec
from vmctl.ops.devices import device_present
from vmctl.process import QemuProcess
from vmctl.qmp import Monitor


class VMParts:
    name: str
    spec: VMSpec
    run_dir: Path
    qmp: Monitor
    process: QemuProcess
    _inventory: Inventory
    _ops_lock: threading.RLock
    _log: Any
    _expected_exit: bool
    _exited: threading.Event

    @property
    def inventory(self) -> Inventory:
        return self._inventory

    def _save_state(self) -> None:
        raise NotImplementedError

    def _require_disk(self, disk_id: str) -> DiskSpec:
        for disk in self._inventory.disks:
            if disk.id == disk_id:
                return disk
        raise UnknownDevice(f"{self.name} has no disk {disk_id!r}")

    def _refuse_duplicate(self, device_id: str) -> None:
        if device_id in self._inventory.device_ids() or device_present(self.qmp, device_id):
            raise DeviceExists(f"{self.name} already has a device {device_id!r}")

    def _replace_disk(self, disk: DiskSpec) -> None:
        with self._ops_lock:
            self._inventory = attrs.evolve(
                self._inventory, disks=tuple(disk if d.id == disk.id else d for d in self._inventory.disks)
            )
            self._save_state()
