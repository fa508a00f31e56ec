"""``Domain``: the VM API a control plane codes against, whoever runs QEMU.

``vmctl.VM`` (vmctl runs QEMU) and ``vmctl.libvirt.LibvirtVM`` (libvirt does) both satisfy it, and
mypy checks that they do; a control plane that holds a ``Domain`` switches between them without
changing its code.

A protocol restates each method's signature, so ``duplicates`` pairs it with the two VMs'
methods (``snapshot_disks`` above all): that is the protocol doing its job. Where a method takes
a value's settings by keyword, they are declared once in the model (``DiskOptions``,
``NicOptions``, ``MigrationKeywords``) and the signatures here stay one line.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from vmctl.model import DiskSpec, MigrationProgress, MigrationResult, NicSpec, VMSpec
from vmctl.model.disk import DiskOptions
from vmctl.model.memory import MemorySpec, VirtioMemSpec
from vmctl.model.migration import MigrationKeywords, MigrationRequest
from vmctl.model.nic import NicOptions
from vmctl.model.status import ExitStatus, ShutdownResult, VMStatus
from vmctl.ops.memory import MemoryDevice
from vmctl.qmp.interface import QMPMonitor
from vmctl.vm.console import Console

if TYPE_CHECKING:
    from typing_extensions import Unpack


class BlockJob(Protocol):
    """A mirror under way: ``wait_ready`` then ``complete`` pivots onto the copy, ``cancel`` keeps the source."""

    def wait_ready(self, timeout: float) -> None: ...

    def complete(self, timeout: float = 60.0) -> None: ...

    def cancel(self, timeout: float = 60.0) -> None: ...


class MigrationJob(Protocol):
    """A migration under way: ``wait`` for its result, follow its ``progress``, ``cancel`` it."""

    def wait(
        self,
        timeout: float,
        *,
        on_progress: Callable[[MigrationProgress], Any] | None = None,
        progress_interval: float = 0.5,
    ) -> MigrationResult: ...

    def progress(self) -> MigrationProgress: ...

    def cancel(self, *, timeout: float = 30.0) -> None: ...

    def start_postcopy(self) -> None: ...


class Domain(Protocol):
    """A running VM: its run state, its devices, its console, and QMP to read from it."""

    @property
    def name(self) -> str: ...

    @property
    def spec(self) -> VMSpec: ...

    @property
    def run_dir(self) -> Path: ...

    @property
    def qmp(self) -> QMPMonitor: ...

    @property
    def console(self) -> Console: ...

    @property
    def has_exited(self) -> bool: ...

    def status(self) -> VMStatus: ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def reset(self) -> None: ...

    def shutdown(self, timeout: float = 30.0, *, step_timeout: float = 5.0) -> ShutdownResult: ...

    def kill(self, *, timeout: float = 10.0) -> ExitStatus: ...

    def wait(self, timeout: float) -> ExitStatus: ...

    def disks(self) -> tuple[DiskSpec, ...]: ...

    def hotplug_disk(
        self, disk: DiskSpec | str | os.PathLike[str], *, timeout: float = 30.0, **options: Unpack[DiskOptions]
    ) -> DiskSpec: ...

    def unplug_disk(self, id: str, *, timeout: float = 30.0) -> None: ...

    def nics(self) -> tuple[NicSpec, ...]: ...

    def hotplug_nic(
        self, nic: NicSpec | None = None, *, timeout: float = 30.0, **options: Unpack[NicOptions]
    ) -> NicSpec: ...

    def unplug_nic(self, id: str, *, timeout: float = 30.0) -> None: ...

    def hotplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]: ...

    def unplug_cpus(self, count: int, *, timeout: float = 30.0) -> list[str]: ...

    def memory_devices(self) -> list[MemoryDevice]: ...

    def hotplug_memory(self, size_mib: int, *, id: str, timeout: float = 30.0) -> MemorySpec: ...

    def unplug_memory(self, id: str, *, timeout: float = 30.0) -> None: ...

    def add_virtio_mem(
        self, id: str, *, max_size_mib: int, size_mib: int = 0, timeout: float = 30.0
    ) -> VirtioMemSpec: ...

    def resize_virtio_mem(self, id: str, size_mib: int, *, wait: bool = True, timeout: float = 30.0) -> None: ...

    def balloon(self) -> int: ...

    def set_balloon(self, target_bytes: int, *, wait: bool = True, timeout: float = 30.0) -> int: ...

    def snapshot_disks(
        self,
        ids: list[str],
        *,
        overlays: dict[str, str | os.PathLike[str]],
        bitmap: str | None = None,
        quiesce: bool = False,
    ) -> list[DiskSpec]: ...

    def commit_disk(
        self, id: str, *, top: int | None = None, base: int | None = None, timeout: float = 300
    ) -> None: ...

    def stream_disk(self, id: str, *, base: int | None = None, timeout: float = 300) -> None: ...

    def mirror_disk(
        self,
        id: str,
        target_path: str | os.PathLike[str],
        *,
        sync: Literal["full", "top"] = "full",
        format: Literal["qcow2", "raw"] = "qcow2",
    ) -> BlockJob: ...

    def migrate(
        self, target: str, request: MigrationRequest | None = None, /, **options: Unpack[MigrationKeywords]
    ) -> MigrationJob:
        """``target``: for a ``VM``, the URI its incoming QEMU listens on; for a ``LibvirtVM``, the
        target host's libvirt URI. ``request``, or its keywords (``MigrationRequest.of``); a
        ``LibvirtVM`` refuses what libvirt cannot do."""
        ...

    def close(self) -> None: ...
