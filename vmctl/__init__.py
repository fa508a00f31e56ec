"""vmctl: run QEMU virtual machines from Python."""

from vmctl import errors
from vmctl.errors import VmctlError
from vmctl.model import DiskSpec, Inventory, NicSpec, Throttle, VMSpec
from vmctl.model.status import ExitStatus
from vmctl.vm import VM, ResetEvent, RunState, ShutdownEvent, ShutdownMethod, ShutdownResult, VMStatus

__all__ = [
    "VM",
    "DiskSpec",
    "ExitStatus",
    "Inventory",
    "NicSpec",
    "ResetEvent",
    "RunState",
    "ShutdownEvent",
    "ShutdownMethod",
    "ShutdownResult",
    "Throttle",
    "VMSpec",
    "VMStatus",
    "VmctlError",
    "errors",
]
__version__ = "0.1.0"
