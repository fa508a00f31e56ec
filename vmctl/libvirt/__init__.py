"""vmctl on libvirt: the same VM API on libvirt domains, and QMP through libvirtd or ``virsh``.

Needs libvirt-python (``pip install 'vmctl[libvirt]'``); imported only when used.
"""

from vmctl.libvirt.domain import LibvirtVM
from vmctl.libvirt.errors import (
    DomainNotFound,
    DomainNotRunning,
    LibvirtConnectionLost,
    LibvirtDeviceNotFound,
    LibvirtError,
    LibvirtHotplugError,
    LibvirtMigrationError,
    LibvirtTimeout,
)
from vmctl.libvirt.monitor import LibvirtMonitor
from vmctl.libvirt.virsh import VirshMonitor

__all__ = [
    "DomainNotFound",
    "DomainNotRunning",
    "LibvirtConnectionLost",
    "LibvirtDeviceNotFound",
    "LibvirtError",
    "LibvirtHotplugError",
    "LibvirtMigrationError",
    "LibvirtMonitor",
    "LibvirtTimeout",
    "LibvirtVM",
    "VirshMonitor",
]
