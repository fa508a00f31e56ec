"""Checks shared by the values of the model: ids, PCI addresses, paths, whole numbers."""

from __future__ import annotations

import os
import re
from typing import Any

import attrs

from vmctl.errors import InvalidArgument, SpecError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DEVICE_ID = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_PCI_ADDR = re.compile(r"0x[0-9a-f]{1,2}\.[0-7]")
#: The kernel's limit for a unix socket path (sun_path), terminator included.
UNIX_PATH_MAX = 108


def check_id(kind: str, value: str, *, max_length: int = 31) -> None:
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value) or len(value) > max_length:
        raise SpecError(
            f"{kind} id {value!r} must start with a letter and use only letters, digits, _ . - (max {max_length})"
        )


def check_pci_addr(device_id: str, value: str | None) -> None:
    if value is not None and not _PCI_ADDR.fullmatch(value):
        raise SpecError(f"{device_id}: PCI address {value!r} is not of the form 0x5.0")


def check_unix_path(what: str, path: str | os.PathLike[str]) -> str:
    """``path`` as text if it fits a unix socket address; ``InvalidArgument`` if not."""
    text = os.fspath(path)
    if len(os.fsencode(text)) >= UNIX_PATH_MAX:
        limit = UNIX_PATH_MAX - 1
        raise InvalidArgument(f"{what}: unix socket path is too long for the kernel (max {limit} bytes): {text}")
    return text


def positive(kind: str) -> Any:
    """An attrs validator: None or a whole number >= 1."""

    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise SpecError(f"{kind} must be a positive whole number, not {value!r}")

    return check


def path_text(value: str | os.PathLike[str]) -> str:
    return os.fspath(value)


def optional_path_text(value: str | os.PathLike[str] | None) -> str | None:
    return None if value is None else os.fspath(value)


def escape_option(value: str) -> str:
    """QEMU option values escape a comma by doubling it."""
    return value.replace(",", ",,")
