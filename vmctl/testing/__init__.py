"""Test helpers for vmctl and its users: a scriptable fake QEMU monitor."""

from vmctl.testing.fake_qemu import FakeCall, FakeCommandError, FakeQEMU

__all__ = ["FakeCall", "FakeCommandError", "FakeQEMU"]
