"""Test helpers for vmctl and its users: a scriptable fake QEMU, the tiny test guest and its shell,
and a real Debian guest."""

from vmctl.testing.debian import DebianGuest
from vmctl.testing.fake_qemu import FakeCall, FakeCommandError, FakeQEMU
from vmctl.testing.guest import READY_MARKER, GuestBuildError, TestGuest
from vmctl.testing.libvirtd import LibvirtdError, PrivateLibvirtd
from vmctl.testing.shell import GuestCommandFailed, GuestShell, ShellResult

__all__ = [
    "READY_MARKER",
    "DebianGuest",
    "FakeCall",
    "FakeCommandError",
    "FakeQEMU",
    "GuestBuildError",
    "GuestCommandFailed",
    "GuestShell",
    "LibvirtdError",
    "PrivateLibvirtd",
    "ShellResult",
    "TestGuest",
]
