"""A /dev of its own for each QEMU: only the device nodes a VM needs, its own where they matter.

QEMU on the host's /dev can open whatever the host's modes let its user open. In its own mount
namespace (``jail_exec.py``, between vmctl and ``setpriv``), QEMU's /dev is a small tmpfs with:
null, zero, full, random, urandom (as on the host, 0666), a devpts of its own (ptmx, pts), and
kvm, net/tun, vhost-net and userfaultfd where the host has them, made the VM's own (its uid and
gid, 0600), so that QEMU reaches them without any group of the host's. Disks, taps, firmware and
kernels are passed by fd, so QEMU needs no other node; the host's disks (/dev/sda), memory
(/dev/mem) and other VMs' devices are not there at all.

It needs root (a mount namespace). vmctl not being root is the one case QEMU keeps the host's
/dev, and ``prefix`` logs a warning saying so; ``Isolation(private_dev=False)`` turns it off on
purpose, also with a warning.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Final

from vmctl.logs import get_logger

log = get_logger(__name__)

JAIL_SCRIPT: Final = Path(__file__).with_name("jail_exec.py")
#: Nodes every QEMU gets as the host has them (name, mode).
SHARED_NODES: Final = (("null", 0o666), ("zero", 0o666), ("full", 0o666), ("random", 0o666), ("urandom", 0o666))
#: Nodes a QEMU gets as its own, where the host has them.
OWNED_NODES: Final = ("kvm", "net/tun", "vhost-net", "userfaultfd")


def nodes() -> list[str]:
    """The nodes for a private /dev, as ``jail_exec.py`` takes them (``name:major:minor:mode:owned``)."""
    found = []
    for name, mode in SHARED_NODES:
        found.append(_node(name, mode, owned=False))
    for name in OWNED_NODES:
        try:
            found.append(_node(name, 0o600, owned=True))
        except FileNotFoundError:
            continue
    return found


def prefix(uid: int, gid: int, *, private: bool = True) -> list[str]:
    """What runs a command with umask 007 and (``private``) in a private /dev whose own nodes are
    ``uid``'s and ``gid``'s."""
    if not private:
        return [sys.executable, "-I", "-S", str(JAIL_SCRIPT), "shared", str(uid), str(gid), "--"]
    return [sys.executable, "-I", "-S", str(JAIL_SCRIPT), "private", str(uid), str(gid), *nodes(), "--"]


def _node(name: str, mode: int, *, owned: bool) -> str:
    info = os.stat(f"/dev/{name}")
    if not stat.S_ISCHR(info.st_mode):
        raise FileNotFoundError(name)
    return f"{name}:{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}:{mode:o}:{int(owned)}"
