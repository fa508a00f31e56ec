"""What the guest agent reports, as values: its version, a command's result, the guest's NICs."""

from __future__ import annotations

import base64
import enum
from collections.abc import Mapping
from typing import Any

import attrs

#: The virtio-serial port name qemu-ga opens by default.
AGENT_PORT_NAME = "org.qemu.guest_agent.0"


class FreezeStatus(enum.Enum):
    THAWED = "thawed"
    FROZEN = "frozen"


@attrs.frozen(kw_only=True)
class AgentInfo:
    version: str
    #: The commands the agent has enabled (a guest may disable some; a frozen guest blocks most).
    commands: tuple[str, ...]

    @classmethod
    def from_qmp(cls, value: Mapping[str, Any]) -> AgentInfo:
        enabled = (c for c in value.get("supported_commands", ()) if c.get("enabled", True))
        return cls(version=str(value.get("version", "")), commands=tuple(sorted(str(c["name"]) for c in enabled)))


@attrs.frozen(kw_only=True)
class ExecResult:
    """A guest command that ended: its exit code (or the signal that ended it) and its output."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    #: The agent keeps at most 16 MiB of each stream; more is cut off.
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0

    @classmethod
    def from_qmp(cls, value: Mapping[str, Any]) -> ExecResult:
        return cls(
            exit_code=value.get("exitcode"),
            signal=value.get("signal"),
            stdout=base64.b64decode(value.get("out-data", "")),
            stderr=base64.b64decode(value.get("err-data", "")),
            truncated=bool(value.get("out-truncated") or value.get("err-truncated")),
        )


@attrs.frozen(kw_only=True)
class GuestAddress:
    family: str  # "ipv4" or "ipv6"
    address: str
    prefix: int


@attrs.frozen(kw_only=True)
class GuestInterface:
    """A network interface as the guest sees it."""

    name: str
    mac: str | None
    addresses: tuple[GuestAddress, ...]

    @classmethod
    def from_qmp(cls, value: Mapping[str, Any]) -> GuestInterface:
        return cls(
            name=str(value["name"]),
            mac=value.get("hardware-address"),
            addresses=tuple(
                GuestAddress(
                    family=str(a["ip-address-type"]), address=str(a["ip-address"]), prefix=int(a.get("prefix", 0))
                )
                for a in value.get("ip-addresses", ())
            ),
        )
