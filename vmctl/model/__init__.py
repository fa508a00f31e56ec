"""The values vmctl works with: frozen attrs classes that import nothing above them.

A spec (``VMSpec`` with its ``DiskSpec``/``NicSpec`` values) says what a VM is made of; the
``Inventory`` says what it has now; ``names`` builds (and parses) every id vmctl derives. Each
value renders its own QEMU arguments, the same for the command line and for hotplug.
"""

from vmctl.model.chardev import Chardev, ChardevKind
from vmctl.model.disk import Aio, CacheMode, DiskBus, DiskFormat, DiskSpec, ErrorPolicy, Overlay, Throttle
from vmctl.model.inventory import Inventory
from vmctl.model.memory import MemorySpec, VirtioMemSpec
from vmctl.model.migration import (
    ConvergencePolicy,
    Escalation,
    MigrationKeywords,
    MigrationOptions,
    MigrationProgress,
    MigrationRequest,
    MigrationResult,
    Skipped,
    Step,
)
from vmctl.model.nic import NicSpec
from vmctl.model.vm import Accelerator, VMSpec

__all__ = [
    "Accelerator",
    "Aio",
    "CacheMode",
    "Chardev",
    "ChardevKind",
    "ConvergencePolicy",
    "DiskBus",
    "DiskFormat",
    "DiskSpec",
    "ErrorPolicy",
    "Escalation",
    "Inventory",
    "MemorySpec",
    "MigrationKeywords",
    "MigrationOptions",
    "MigrationProgress",
    "MigrationRequest",
    "MigrationResult",
    "NicSpec",
    "Overlay",
    "Skipped",
    "Step",
    "Throttle",
    "VMSpec",
    "VirtioMemSpec",
]
