"""vmctl: run QEMU virtual machines from Python."""

from vmctl import errors
from vmctl.domain import Domain
from vmctl.errors import VmctlError
from vmctl.model import (
    DiskSpec,
    Escalation,
    Inventory,
    MigrationProgress,
    MigrationRequest,
    MigrationResult,
    NicSpec,
    Throttle,
    VMSpec,
)
from vmctl.model.backup import Backup
from vmctl.model.secret import Secret
from vmctl.model.status import ExitStatus
from vmctl.model.tls import TLSCreds
from vmctl.ops.chains import create_image
from vmctl.ops.restore import restore_disk
from vmctl.vm import (
    VM,
    Isolation,
    ResetEvent,
    RunState,
    ShutdownEvent,
    ShutdownMethod,
    ShutdownResult,
    UidPool,
    VMStatus,
)

__all__ = [
    "VM",
    "Backup",
    "DiskSpec",
    "Domain",
    "Escalation",
    "ExitStatus",
    "Inventory",
    "Isolation",
    "MigrationProgress",
    "MigrationRequest",
    "MigrationResult",
    "NicSpec",
    "ResetEvent",
    "RunState",
    "Secret",
    "ShutdownEvent",
    "ShutdownMethod",
    "ShutdownResult",
    "TLSCreds",
    "Throttle",
    "UidPool",
    "VMSpec",
    "VMStatus",
    "VmctlError",
    "create_image",
    "errors",
    "restore_disk",
]
__version__ = "0.1.0"
