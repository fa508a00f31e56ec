"""vmctl: run QEMU virtual machines from Python."""

from vmctl import errors
from vmctl.errors import VmctlError
from vmctl.process import ExitStatus
from vmctl.spec import DiskSpec, NicSpec, VMSpec
from vmctl.state import Inventory
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
    "VMSpec",
    "VMStatus",
    "VmctlError",
    "errors",
]
__version__ = "0.1.0"
