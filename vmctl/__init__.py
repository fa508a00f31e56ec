"""vmctl: run QEMU virtual machines from Python."""

from vmctl import errors
from vmctl.errors import VmctlError

__all__ = ["VmctlError", "errors"]
__version__ = "0.1.0"
