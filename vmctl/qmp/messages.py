"""The values the protocol core hands out: what QEMU said, already typed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from vmctl.errors import CommandError, command_error


@attrs.frozen(slots=True, kw_only=True)
class QEMUVersion:
    major: int
    minor: int
    micro: int
    package: str = ""

    @classmethod
    def from_qmp(cls, version: Mapping[str, Any]) -> QEMUVersion:
        qemu = version.get("qemu", {})
        return cls(
            major=int(qemu.get("major", 0)),
            minor=int(qemu.get("minor", 0)),
            micro=int(qemu.get("micro", 0)),
            package=str(version.get("package", "")).strip(),
        )

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"


@attrs.frozen(slots=True, kw_only=True)
class Greeting:
    version: QEMUVersion
    capabilities: tuple[str, ...]

    @classmethod
    def from_qmp(cls, greeting: Mapping[str, Any]) -> Greeting:
        return cls(
            version=QEMUVersion.from_qmp(greeting.get("version", {})),
            capabilities=tuple(str(c) for c in greeting.get("capabilities", ())),
        )


@attrs.frozen(slots=True, kw_only=True)
class Negotiated:
    """Capability negotiation finished; commands may be sent."""

    capabilities: tuple[str, ...]


@attrs.frozen(slots=True, kw_only=True)
class Reply:
    id: str
    value: Any


@attrs.frozen(slots=True, kw_only=True)
class ErrorReply:
    id: str | None
    error: Mapping[str, Any]

    def failure(self, command: str) -> CommandError:
        """QEMU's error as vmctl's exception for it: the one mapping every monitor raises."""
        return command_error(command, self.error)


@attrs.frozen(slots=True, kw_only=True)
class Event:
    """An asynchronous QMP event. ``timestamp`` is QEMU's wall-clock time in seconds."""

    name: str
    data: Mapping[str, Any]
    timestamp: float

    @classmethod
    def from_qmp(cls, message: Mapping[str, Any]) -> Event:
        stamp = message.get("timestamp") or {}
        seconds = stamp.get("seconds", 0) if isinstance(stamp, dict) else 0
        micros = stamp.get("microseconds", 0) if isinstance(stamp, dict) else 0
        data = message.get("data")
        return cls(
            name=str(message["event"]),
            data=data if isinstance(data, dict) else {},
            timestamp=float(seconds) + float(micros) / 1e6,
        )


@attrs.frozen(slots=True, kw_only=True)
class OversizedMessage:
    """A message over the size limit; ``id`` names the command it answered, if it was a reply."""

    id: str | None
    is_event: bool
    size: int


@attrs.frozen(slots=True, kw_only=True)
class UndecodableMessage:
    """A well-framed message the codec could not decode; ``id`` names the command it answered, if found."""

    id: str | None
    why: str
    size: int


Message = Greeting | Negotiated | Reply | ErrorReply | Event | OversizedMessage | UndecodableMessage
