"""The QEMU guest agent's protocol, sans I/O: bytes in, replies out (the shape of ``vmctl.qmp.protocol``).

The agent speaks QMP's JSON without a greeting or a negotiation, one command at a time. Its
stream may hold anything when a client connects: the tail of a reply to a client that went away,
half a command another client wrote. So every connection starts with a resynchronisation:

- the client sends ``0xFF`` (never valid in JSON text: the agent's parser throws away what it
  held) and ``guest-sync-delimited`` with a random token;
- the agent answers ``0xFF`` and ``{"return": token}``; the client discards everything before
  that ``0xFF`` and any reply that is not its token.

After that, each command carries an ``id`` the agent echoes; a reply with another id (or none)
is a stale one and is dropped. A reply over ``max_message_size`` fails only its command.
"""

from __future__ import annotations

import enum
import itertools
import json
import secrets
from collections.abc import Mapping
from typing import Any, Final

import attrs

from vmctl.errors import AgentCommandError, AgentError, InvalidArgument, StateError
from vmctl.qmp.framing import LineFramer, Oversized

DELIMITER: Final = b"\xff"
DEFAULT_MAX_MESSAGE_SIZE: Final = 16 * 1024 * 1024  # exec output comes base64-encoded in one reply
_ids = itertools.count(1)


class AgentState(enum.Enum):
    IDLE = "idle"  # connected, not yet synchronised
    SYNCING = "syncing"  # guest-sync-delimited sent; waiting for its delimiter and token
    READY = "ready"  # synchronised; no command outstanding
    AWAITING_REPLY = "awaiting-reply"  # a command is outstanding


@attrs.frozen(kw_only=True)
class Synced:
    """The agent answered this connection's ``guest-sync-delimited``."""


@attrs.frozen(kw_only=True)
class AgentReply:
    """The reply to the outstanding command: ``value`` on success, else ``error`` (an ``AgentError``)."""

    command: str
    value: Any = None
    error: AgentError | None = None


class NeedData(enum.Enum):
    NEED_DATA = "need-data"


NEED_DATA: Final = NeedData.NEED_DATA
AgentEvent = Synced | AgentReply | NeedData


class AgentProtocol:
    """One connection to a guest agent. Not thread-safe: its face serialises calls."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> None:
        if max_message_size < 1024:
            raise InvalidArgument(f"max_message_size={max_message_size} is too small (minimum 1024)")
        self.state = AgentState.IDLE
        self.stale_replies = 0  # replies dropped: not this connection's token or command
        self._framer = LineFramer(max_message_size)
        self._max_message_size = max_message_size
        self._token = 0
        self._command = ""
        self._command_id = ""
        self._events: list[Synced | AgentReply] = []

    # -- sending ---------------------------------------------------------------------------

    def start_sync(self) -> bytes:
        """The bytes that resynchronise the stream; the agent's answer ends in a ``Synced``."""
        self._require(AgentState.IDLE)
        self._token = secrets.randbelow(2**31 - 1) + 1  # the agent's token is a JSON int
        self.state = AgentState.SYNCING
        command = {"execute": "guest-sync-delimited", "arguments": {"id": self._token}}
        return DELIMITER + _encode(command)

    def send_command(self, name: str, arguments: Mapping[str, Any] | None = None) -> bytes:
        """The bytes of one command; its ``AgentReply`` follows (``guest-shutdown`` and
        ``guest-suspend-*`` have one only when they fail)."""
        self._require(AgentState.READY)
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"an agent command needs a name, not {name!r}")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise InvalidArgument(f"{name}: arguments must be a mapping, not {type(arguments).__name__}")
        command_id = f"vmctl-agent-{next(_ids)}"
        message: dict[str, Any] = {"execute": name, "id": command_id}
        if arguments:
            message["arguments"] = dict(arguments)
        data = _encode(message, name)
        self._command, self._command_id = name, command_id
        self.state = AgentState.AWAITING_REPLY
        return data

    def _require(self, state: AgentState) -> None:
        if self.state is not state:
            raise StateError(f"guest agent connection is {self.state.value}, not {state.value}")

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the agent's socket."""
        for line in self._framer.feed(data):
            self._take(line)

    def next_event(self) -> AgentEvent:
        """``Synced``, an ``AgentReply``, or ``NEED_DATA`` when there is nothing to report yet."""
        return self._events.pop(0) if self._events else NEED_DATA

    def _take(self, line: bytes | Oversized) -> None:
        if self.state is AgentState.SYNCING:
            # The answer is the line after the agent's 0xFF; what comes before it on the line
            # (the rest of an old reply, a parse error for our own 0xFF) is not a message.
            text = line if isinstance(line, bytes) else b""
            at = text.rfind(DELIMITER)
            if at >= 0 and _decode(text[at + 1 :]) == {"return": self._token}:
                self.state = AgentState.READY
                self._events.append(Synced())
            else:
                self.stale_replies += 1  # an old reply, or the answer to an older sync
            return
        if self.state is not AgentState.AWAITING_REPLY:
            self.stale_replies += 1
            return
        if isinstance(line, Oversized):
            if self._command_id.encode() in line.head or self._command_id.encode() in line.tail:
                error = AgentError(
                    f"guest agent: the reply to {self._command} is {line.size} bytes, over the "
                    f"{self._max_message_size}-byte limit (the command ran)"
                )
                self._reply(AgentReply(command=self._command, error=error))
            else:
                self.stale_replies += 1
            return
        message = _decode(line)
        if not isinstance(message, dict) or message.get("id") != self._command_id:
            self.stale_replies += 1
            return
        if "error" in message:
            failure = message["error"] if isinstance(message["error"], dict) else {}
            error = AgentCommandError(
                self._command, str(failure.get("class", "GenericError")), str(failure.get("desc", failure))
            )
            self._reply(AgentReply(command=self._command, error=error))
        else:
            self._reply(AgentReply(command=self._command, value=message.get("return")))

    def _reply(self, reply: AgentReply) -> None:
        self.state = AgentState.READY
        self._events.append(reply)


def _encode(message: Mapping[str, Any], name: str = "guest-sync-delimited") -> bytes:
    try:
        return json.dumps(message, separators=(",", ":"), allow_nan=False).encode() + b"\n"
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{name}: arguments are not JSON: {exc}") from None


def _decode(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (UnicodeDecodeError, ValueError):
        return None
