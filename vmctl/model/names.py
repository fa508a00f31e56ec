"""Every name vmctl derives, built and parsed here and nowhere else.

QEMU objects that belong to a device are named from its id, so that a restarted control plane
(or a migration target) finds them again without storing anything: a disk's block nodes and
fdsets, a NIC's netdev, a memory device's backend, an export, a chardev's port. One small
function per derived name, alike in shape on purpose (``duplicates`` pairs them): each is the one
place its name is spelled.
"""

from __future__ import annotations

import re
from typing import Final

# Files in a VM's run directory.
QMP_SOCKET: Final = "qmp.sock"
TOOLS_SOCKET: Final = "tools.sock"  # a second QMP monitor, for operators' tools beside the control plane
SHELL_SOCKET: Final = "shell.sock"
MIGRATION_SOCKET: Final = "migrate.sock"
NBD_SOCKET: Final = "nbd.sock"
AGENT_SOCKET: Final = "agent.sock"  # the guest agent's virtio-serial port, QEMU's end
LOG_FILE: Final = "qemu.log"
PID_FILE: Final = "qemu.pid"
UEFI_VARS_FILE: Final = "uefi-vars.fd"  # the VM's own copy of the UEFI variable store (its NVRAM)

# QEMU ids vmctl gives to what it adds on its own.
CONSOLE_CHARDEV: Final = "vmctl-console"
SHELL_CHARDEV: Final = "vmctl-shell"
MONITOR_CHARDEV: Final = "vmctl-qmp"
TOOLS_CHARDEV: Final = "vmctl-tools"
VGA_DEVICE: Final = "vmctl-vga"
AGENT_CHARDEV: Final = "vmctl-agent"
BALLOON_DEVICE: Final = "vmctl-balloon"
SCSI_CONTROLLER: Final = "vmctl-scsi"
SERIAL_CONTROLLER: Final = "vmctl-vserial"
CPU_ID_PREFIX: Final = "vmctl-cpu"
ROOT_PORT_PREFIX: Final = "vmctl-port"
UEFI_CODE_NODE: Final = "vmctl-uefi-code"
UEFI_VARS_NODE: Final = "vmctl-uefi-vars"
# The tags of the files passed to QEMU at launch (an fdset's opaque tag, for block nodes).
UEFI_VARS_TAG: Final = "vmctl:uefi-vars"
UEFI_CODE_TAG: Final = "vmctl:uefi-code"
KERNEL_TAG: Final = "vmctl:kernel"
INITRD_TAG: Final = "vmctl:initrd"
MASTER_KEY_TAG: Final = "vmctl:master-key"
MASTER_KEY_ID: Final = "vmctl-master-key"  # the secret object every other secret is encrypted with
MASTER_KEY_FILE: Final = "master-key"  # in the run dir: root's only

_FDSET_PREFIX: Final = "vmctl:disk:"


def secret_object_id(disk_id: str) -> str:
    """The QOM id of the secret object that holds a disk's LUKS passphrase (encrypted)."""
    return f"vmctl-secret-{disk_id}"


def disk_node_names(disk_id: str, layer: int = 0) -> tuple[str, str]:
    """The protocol and format node names of one layer of a disk (0: the image it was created with)."""
    if layer == 0:
        return f"{disk_id}-file", f"{disk_id}-fmt"
    return f"{disk_id}-o{layer}-file", f"{disk_id}-o{layer}-fmt"


def is_disk_node(node_name: str, disk_id: str) -> bool:
    """Whether a block node is one of this disk's layers (the inverse of ``disk_node_names``)."""
    return re.fullmatch(re.escape(disk_id) + r"-(o\d+-)?(file|fmt)", node_name) is not None


def disk_of_node(node_name: str) -> str | None:
    """The disk a block node belongs to (``None`` if vmctl did not name it)."""
    found = re.fullmatch(r"(.+?)-(o\d+-)?(file|fmt)", node_name)
    return found.group(1) if found else None


def fdset_tag(disk_id: str, layer: int = 0) -> str:
    """The opaque tag of the fdset that holds a disk layer's image."""
    return f"{_FDSET_PREFIX}{disk_id}" + (f":{layer}" if layer else "")


def is_disk_fdset(opaque: object, disk_id: str) -> bool:
    """Whether an fd's opaque tag belongs to this disk (any of its layers)."""
    tag = fdset_tag(disk_id)
    return opaque == tag or (isinstance(opaque, str) and re.fullmatch(re.escape(tag) + r":\d+", opaque) is not None)


def netdev_id(nic_id: str) -> str:
    return f"{nic_id}-net"


def tap_fd_name(nic_id: str, queue: int) -> str:
    """The name a NIC's tap fd (one per queue) is passed under with ``getfd``."""
    return f"{nic_id}-tap{queue}"


def memory_backend_id(memory_id: str) -> str:
    return f"{memory_id}-ram"


def export_id(disk_id: str) -> str:
    """The NBD export (and its name) of a disk."""
    return f"nbd-{disk_id}"


def nbd_client_node(disk_id: str) -> str:
    """The NBD client node a storage-copy migration mirrors a disk into."""
    return f"{disk_id}-nbd"


def chardev_port_id(chardev_id: str) -> str:
    """The virtio-serial port device of a chardev."""
    return f"{chardev_id}-port"


def root_port_id(index: int) -> str:
    """The PCIe root port number ``index`` of a q35 VM's pool."""
    return f"{ROOT_PORT_PREFIX}{index}"


def pci_addr_from_devfn(devfn: int) -> str:
    return f"0x{devfn >> 3:x}.{devfn & 7}"
