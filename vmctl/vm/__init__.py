"""The VM a control plane holds, composed of parts that own their state.

``machine`` (the ``VM``: launch, attach, close), ``store`` (the inventory and the state file),
``lifecycle`` (alive, exited or crashed; resets; stopping), ``devices``, ``blocks``,
``migration`` (and ``storage_copy``: work that spans two VMs), ``process``, ``console``,
``statefile``; ``startup`` starts QEMU under ``isolation`` (a uid from ``uidpool``, a private /dev
from ``devjail``).
"""

from vmctl.model.status import (
    ExitStatus,
    ResetEvent,
    RunState,
    ShutdownEvent,
    ShutdownMethod,
    ShutdownResult,
    VMStatus,
)
from vmctl.vm.isolation import Isolation
from vmctl.vm.lifecycle import Life
from vmctl.vm.machine import VM
from vmctl.vm.startup import default_accelerator
from vmctl.vm.uidpool import UidPool

__all__ = [
    "VM",
    "ExitStatus",
    "Isolation",
    "Life",
    "ResetEvent",
    "RunState",
    "ShutdownEvent",
    "ShutdownMethod",
    "ShutdownResult",
    "UidPool",
    "VMStatus",
    "default_accelerator",
]
