"""libvirt's errors in vmctl's error tree: each is a ``LibvirtError`` and, where vmctl has the same
failure on its own QEMU, that error too (code that catches ``UnknownDevice`` or ``MigrationError``
works on both)."""

from __future__ import annotations

from typing import Any

from vmctl.errors import (
    ConnectionLost,
    HotplugError,
    InvalidArgument,
    MigrationError,
    UnknownDevice,
    VmctlError,
    WaitTimeout,
)


class LibvirtError(VmctlError):
    """libvirt refused or failed; ``code`` is libvirt's ``VIR_ERR_*`` number, ``reason`` its message."""

    def __init__(self, message: str, *, code: int = 0, reason: str = "") -> None:
        VmctlError.__init__(self, f"{message}: {reason}" if reason else message)
        self.code = code
        self.reason = reason


class DomainNotFound(LibvirtError, InvalidArgument):
    """No domain of that name on that libvirt host."""


class DomainNotRunning(LibvirtError, ConnectionLost):
    """The domain is not running, so its QEMU cannot be asked anything."""


class LibvirtConnectionLost(LibvirtError, ConnectionLost):
    """The connection to libvirtd is gone."""


class LibvirtTimeout(LibvirtError, WaitTimeout):
    """libvirt gave up waiting (for its job lock, the guest, or QEMU)."""


class LibvirtDeviceNotFound(LibvirtError, UnknownDevice):
    """libvirt knows no device of that alias in the domain."""


class LibvirtHotplugError(LibvirtError, HotplugError):
    """An attach or detach through libvirt did not complete."""

    def __init__(self, message: str, *, code: int = 0, reason: str = "", remaining: tuple[str, ...] = ()) -> None:
        super().__init__(message + (f"; still present: {', '.join(remaining)}" if remaining else ""), code=code,
                         reason=reason)  # fmt: skip
        self.remaining = remaining


class LibvirtMigrationError(LibvirtError, MigrationError):
    """A migration through libvirt failed or was cancelled; the source domain runs on."""

    def __init__(self, message: str, *, code: int = 0, reason: str = "", status: str = "failed") -> None:
        super().__init__(message, code=code, reason=reason)
        self.status = status
        self.error_desc = reason


def libvirt_error(exc: Any, what: str) -> LibvirtError:
    """The vmctl error for ``exc`` (a ``libvirt.libvirtError``) raised while doing ``what``."""
    import libvirt

    code = int(exc.get_error_code() or 0)
    reason = str(exc.get_error_message() or exc)
    kinds: dict[int, type[LibvirtError]] = {
        libvirt.VIR_ERR_NO_DOMAIN: DomainNotFound,
        libvirt.VIR_ERR_OPERATION_TIMEOUT: LibvirtTimeout,
        libvirt.VIR_ERR_AGENT_UNRESPONSIVE: LibvirtTimeout,
        libvirt.VIR_ERR_DEVICE_MISSING: LibvirtDeviceNotFound,
        libvirt.VIR_ERR_NO_CONNECT: LibvirtConnectionLost,
        libvirt.VIR_ERR_RPC: LibvirtConnectionLost,
    }
    kind = kinds.get(code, LibvirtError)
    if code == libvirt.VIR_ERR_OPERATION_INVALID and "not running" in reason:
        kind = DomainNotRunning
    elif code == libvirt.VIR_ERR_SYSTEM_ERROR and ("connection" in reason or "broken pipe" in reason.lower()):
        kind = LibvirtConnectionLost
    return kind(what, code=code, reason=reason)
