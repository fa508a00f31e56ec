"""The run directory's state file: what a restarted control plane needs to attach to a VM."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmctl.errors import StaleState
from vmctl.model import Inventory, VMSpec
from vmctl.model.secret import Secret
from vmctl.vm.journal import Intent
from vmctl.vm.passing import own_file
from vmctl.vm.secrets import SEALED, load_master_key, seal, unseal

STATE_FILE = "vm.json"
FORMAT_VERSION = 1


@attrs.frozen(kw_only=True)
class VMRecord:
    """What the state file records of a VM: which process, which monitor, its spec and inventory."""

    pid: int
    start_time: int
    qmp_socket: str
    spec: VMSpec
    inventory: Inventory
    pending: tuple[Intent, ...] = ()  # device operations under way (see ``journal``)
    vcpus_created: int = 0  # over this QEMU's life, unplugged ones included (see Devices.hotplug_cpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "pid": self.pid,
            "start_time": self.start_time,
            "qmp_socket": self.qmp_socket,
            "spec": self.spec.to_dict(),
            "inventory": self.inventory.to_dict(),
            "pending": [intent.to_dict() for intent in self.pending],
            "vcpus_created": self.vcpus_created,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMRecord:
        if data.get("format") != FORMAT_VERSION:
            raise StaleState(f"unknown state file format {data.get('format')!r}")
        return cls(
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            qmp_socket=str(data["qmp_socket"]),
            spec=VMSpec.from_dict(data["spec"]),
            inventory=Inventory.from_dict(data["inventory"]),
            pending=tuple(Intent.from_dict(i) for i in data.get("pending", ())),
            vcpus_created=int(data.get("vcpus_created", 0)),
        )


def write_record(run_dir: Path, state: VMRecord) -> None:
    """Replace the state file atomically: write a temporary file, fsync, rename, fsync the directory."""
    # Plain strings: pathlib interns every part it parses, and the state file is written on
    # every change (the interning churn once doubled CPython's table: 1 MiB for nothing).
    path = os.path.join(run_dir, STATE_FILE)
    temporary = os.path.join(run_dir, f".{STATE_FILE}.tmp")
    # A file of vmctl's own, made afresh: QEMU's user may write in the run dir (not replace it).
    with os.fdopen(own_file(temporary), "w", encoding="utf-8") as out:
        json.dump(state.to_dict(), out, indent=2, sort_keys=True, default=_Sealer(run_dir))
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
    directory = os.open(run_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class _Sealer:
    """Turns a ``Secret`` into its sealed form (under the VM's master key) for the state file."""

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self._run_dir = Path(run_dir)
        self._key: bytes | None = None

    def __call__(self, value: object) -> object:
        if not isinstance(value, Secret):
            raise TypeError(f"{type(value).__name__} is not JSON serializable")
        if self._key is None:
            self._key = load_master_key(self._run_dir)
            if self._key is None:
                raise StaleState(f"{self._run_dir} has no master key to seal a secret with")
        return seal(value, self._key)


class _Unsealer:
    def __init__(self, run_dir: Path) -> None:
        self._run_dir = run_dir
        self._key: bytes | None = None

    def __call__(self, value: dict[str, Any]) -> object:
        if SEALED not in value:
            return value
        if self._key is None:
            self._key = load_master_key(self._run_dir)
            if self._key is None:
                raise StaleState(f"{self._run_dir} holds a sealed secret but no master key")
        return unseal(value, self._key)


def read_record(run_dir: Path) -> VMRecord:
    path = run_dir / STATE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_hook=_Unsealer(run_dir))
    except FileNotFoundError:
        raise StaleState(f"no VM state in {run_dir} ({STATE_FILE} is missing)") from None
    except ValueError as exc:
        raise StaleState(f"{path} is not valid JSON: {exc}") from None
    try:
        return VMRecord.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise StaleState(f"{path} is not a vmctl state file: {exc}") from None
