"""A secret (a LUKS passphrase): a value that never shows itself.

It is never in a repr, a log line or an exception; the state file holds it sealed under the VM's
master key (``vmctl.vm.secrets``), and QEMU gets it encrypted with that key, never in clear.
"""

from __future__ import annotations

import hmac


class Secret:
    __slots__ = ("_value",)

    def __init__(self, value: bytes | str) -> None:
        if isinstance(value, str):
            value = value.encode()
        if not isinstance(value, bytes) or not value:
            raise TypeError("a Secret is a non-empty bytes or str value")
        self._value = value

    def reveal(self) -> bytes:
        """The value itself: for encrypting it, never for printing."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(("vmctl.Secret", len(self._value)))

    def __reduce__(self) -> str:  # never pickled (nor copied into another process that way)
        raise TypeError("a Secret is not picklable")
