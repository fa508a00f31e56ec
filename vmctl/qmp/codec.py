"""QMP's wire format: bytes in, typed messages out; commands in, bytes out. No I/O, no policy.

The codec knows the greeting and the capability negotiation (its ``phase``); everything about
a connection's life (which command a reply belongs to, timeouts, fds, failures) is the
connection core's (``vmctl.qmp.protocol``), which drives this codec.
"""

from __future__ import annotations

import enum
import itertools
import json
import os
import re
import secrets
from collections import deque
from collections.abc import Mapping
from typing import Any, Final

from vmctl.errors import InvalidArgument, ProtocolError, StateError
from vmctl.qmp.framing import LineFramer, Oversized
from vmctl.qmp.messages import (
    ErrorReply,
    Event,
    Greeting,
    Message,
    Negotiated,
    OversizedMessage,
    Reply,
    UndecodableMessage,
)

DEFAULT_MAX_MESSAGE_SIZE: Final = 10 * 1024 * 1024

# One counter for the whole process: ids never repeat across monitors or reconnects. A random
# tag per process keeps them apart from another process's: QEMU may hand the reply to a command
# of a control plane that died to the next client of the same monitor.
_id_counter = itertools.count(1)
_id_prefix = f"vmctl-{secrets.token_hex(3)}-"
_ID = rb"vmctl-[0-9a-f]{6}-\d+"
_ID_AT_END = re.compile(rb'"id"\s*:\s*"(' + _ID + rb')"\s*}\s*$')
_ID_AT_START = re.compile(rb'^\s*{\s*"id"\s*:\s*"(' + _ID + rb')"')


def _new_prefix() -> None:
    global _id_prefix, _id_counter
    _id_prefix, _id_counter = f"vmctl-{secrets.token_hex(3)}-", itertools.count(1)


os.register_at_fork(after_in_child=_new_prefix)  # a forked child is another control plane
_EVENT_KEY = re.compile(rb'^\s*{\s*"event"\s*:|"event"\s*:\s*"[A-Z0-9_]+"\s*}\s*$')


class NeedData(enum.Enum):
    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA


class Phase(enum.Enum):
    """How far the handshake got; the connection's own state lives in ``vmctl.qmp.connstate``."""

    AWAITING_GREETING = "awaiting-greeting"
    GREETED = "greeted"  # greeting seen; qmp_capabilities not yet sent
    NEGOTIATING = "negotiating"
    READY = "ready"


class QMPCodec:
    """Decode QEMU's messages and encode commands. After a ``ProtocolError`` it must not be fed again."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, oob: bool = True) -> None:
        if max_message_size < 1024:
            raise InvalidArgument(f"max_message_size={max_message_size} is too small (minimum 1024)")
        self.max_message_size = max_message_size
        self.phase = Phase.AWAITING_GREETING
        self.greeting: Greeting | None = None
        self.capabilities: tuple[str, ...] = ()
        self._want_oob = oob
        self._framer = LineFramer(max_message_size)
        self._ready: deque[Message] = deque()
        self._negotiation_id: str | None = None
        self.stale_replies = 0  # replies meant for an earlier client of the monitor, dropped

    # -- sending ---------------------------------------------------------------------------

    def start_negotiation(self) -> bytes:
        """The ``qmp_capabilities`` command, enabling ``oob`` when QEMU offers it."""
        if self.phase is not Phase.GREETED:
            raise StateError(f"cannot negotiate capabilities in phase {self.phase.value}")
        assert self.greeting is not None
        enable = ["oob"] if self._want_oob and "oob" in self.greeting.capabilities else []
        self._negotiation_id = new_id()
        self.phase = Phase.NEGOTIATING
        self.capabilities = tuple(enable)
        message: dict[str, Any] = {"execute": "qmp_capabilities", "id": self._negotiation_id}
        if enable:
            message["arguments"] = {"enable": enable}
        return _encode(message)

    def send_command(
        self, command: str, arguments: Mapping[str, Any] | None = None, *, oob: bool = False
    ) -> tuple[str, bytes]:
        """Return ``(id, bytes)`` for a command; the reply will carry that id."""
        if self.phase is not Phase.READY:
            raise StateError(f"cannot send {command!r}: the handshake is at {self.phase.value}")
        if oob and "oob" not in self.capabilities:
            raise InvalidArgument("out-of-band execution was not negotiated with QEMU")
        command_id = new_id()
        return command_id, encode_command(command, arguments, command_id=command_id, oob=oob)

    # -- receiving -------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Feed bytes from QEMU; empty bytes mean end of stream (``ProtocolError`` if mid-message)."""
        if not data:
            self._receive_eof()
            return
        for item in self._framer.feed(data):
            if isinstance(item, Oversized):
                self._ready.append(_oversized(item))
            else:
                self._receive_line(item)

    def next_event(self) -> Message | NeedData:
        """The next message decoded so far, or ``NEED_DATA``."""
        if self._ready:
            return self._ready.popleft()
        return NEED_DATA

    def take_messages(self) -> list[Message]:
        """Every message decoded so far, oldest first (what ``next_event`` would give one by one)."""
        if not self._ready:
            return []
        messages = list(self._ready)
        self._ready.clear()
        return messages

    def _receive_eof(self) -> None:
        pending = self._framer.buffered
        if pending:
            raise ProtocolError(f"the connection closed in the middle of a message ({pending} bytes received)")

    def _receive_line(self, line: bytes) -> None:
        if not line.strip():
            return
        try:
            message = _decode(line.decode("utf-8", "surrogatepass"))
        except RecursionError:
            # Valid JSON nested deeper than Python's parser goes: the stream is still in step,
            # so only the command it answers (if its id can be found) fails.
            self._ready.append(_undecodable(line, "nested too deeply to decode"))
            return
        except ValueError as exc:
            self._fail(f"QEMU sent a line that is not JSON ({exc}): {line[:120]!r}")
        if not isinstance(message, dict):
            self._fail(f"QEMU sent JSON that is not an object: {line[:120]!r}")
        if "event" in message:
            try:
                self._ready.append(Event.from_qmp(message))
            except (TypeError, ValueError, AttributeError) as exc:
                self._fail(f"malformed event ({exc}): {line[:120]!r}")
            return
        if "return" in message or "error" in message:
            self._receive_reply(message, line)
            return
        if "QMP" in message:
            if self.phase is not Phase.AWAITING_GREETING:
                self._fail("QEMU sent a second greeting")
            greeting = message["QMP"]
            if not isinstance(greeting, dict):
                self._fail(f"malformed greeting: {line[:120]!r}")
            self.greeting = Greeting.from_qmp(greeting)
            self.phase = Phase.GREETED
            self._ready.append(self.greeting)
            return
        self._fail(f"QEMU sent a message that is neither reply, error, event nor greeting: {line[:120]!r}")

    def _receive_reply(self, message: dict[str, Any], line: bytes) -> None:
        raw_id = message.get("id")
        reply_id = raw_id if isinstance(raw_id, str) else None
        if self.phase is Phase.NEGOTIATING and reply_id == self._negotiation_id:
            if "error" in message:
                self._fail(f"QEMU refused capability negotiation: {message['error']}")
            self.phase = Phase.READY
            self._ready.append(Negotiated(capabilities=self.capabilities))
            return
        if self.phase is not Phase.READY:
            # Not ours: a reply to a previous client of this monitor (one that died with a
            # command under way) reaches the next client. Nothing waits for it.
            self.stale_replies += 1
            return
        if reply_id is None and "error" not in message:
            self._fail(f"QEMU sent a reply without an id: {line[:120]!r}")
        self._ready.append(_reply(message, reply_id))

    def _fail(self, why: str) -> Any:
        raise ProtocolError(why)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_.+-]+")
_plain_names: set[str] = set()  # command names seen that need no JSON escaping (a few dozen at most)
_raw_decode = json.JSONDecoder().raw_decode


def _decode(text: str) -> Any:
    """``json.loads`` for one QMP line, without its two whitespace scans in the common case."""
    if text[:1].isspace():
        text = text.lstrip()
    value, end = _raw_decode(text)
    if text[end:].strip():
        raise ValueError(f"extra data after the JSON value at {end}")
    return value


def _is_plain(command: str) -> bool:
    if _PLAIN_NAME.fullmatch(command) is None:
        return False
    if len(_plain_names) < 4096:
        _plain_names.add(command)
    return True


def encode_command(command: Any, arguments: Any = None, *, command_id: str | None = None, oob: bool = False) -> bytes:
    """One command as QMP's JSON line, for the socket or a go-between. Bad input raises
    ``InvalidArgument`` here, before anything is sent.

    The faces' codec numbers every command; a go-between that numbers them itself (libvirtd adds
    its own ``id`` and refuses a command that carries one) passes ``command_id=None``."""
    if not isinstance(command, str) or not command:
        raise InvalidArgument(f"command must be a non-empty string, not {command!r}")
    # Hot path for argument-less queries: no json.dumps needed (the command is a QAPI name).
    if not arguments and not oob and command_id is not None and (command in _plain_names or _is_plain(command)):
        return f'{{"execute":"{command}","id":"{command_id}"}}\n'.encode()
    message: dict[str, Any] = {("exec-oob" if oob else "execute"): command}
    if command_id is not None:
        message["id"] = command_id
    if arguments:
        if not isinstance(arguments, Mapping):
            raise InvalidArgument(f"{command}: arguments must be a mapping, not {type(arguments).__name__}")
        message["arguments"] = arguments if isinstance(arguments, dict) else dict(arguments)
    try:
        return _encode(message)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{command}: arguments are not JSON-serialisable: {exc}") from None


def hmp_arguments(command_line: Any) -> dict[str, str]:
    """The arguments of ``human-monitor-command`` for one HMP command line."""
    if not isinstance(command_line, str) or not command_line.strip():
        raise InvalidArgument("the HMP command line must be a non-empty string")
    return {"command-line": command_line}


def decode_reply(text: str, what: str) -> Reply | ErrorReply:
    """One reply a go-between handed back whole, read as a reply on the socket is; ``what`` (the
    monitor and command) starts the ``ProtocolError`` when it is no QMP reply."""
    try:
        message = _decode(text)
    except (ValueError, RecursionError):
        raise ProtocolError(f"{what}: the reply is not JSON: {text[:200]!r}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{what}: the reply is not a JSON object: {text[:200]!r}")
    if "return" not in message and "error" not in message:
        raise ProtocolError(f"{what}: the reply has neither return nor error")
    raw_id = message.get("id")
    return _reply(message, raw_id if isinstance(raw_id, str) else "")


def _reply(message: dict[str, Any], reply_id: str | None) -> Reply | ErrorReply:
    """A message with ``return`` or ``error``: QEMU's value, or its error object (``{}`` if malformed)."""
    if "error" in message:
        error = message["error"]
        return ErrorReply(id=reply_id, error=error if isinstance(error, dict) else {})
    assert reply_id is not None
    return Reply(id=reply_id, value=message["return"])


def new_id() -> str:
    return f"{_id_prefix}{next(_id_counter)}"


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _oversized(item: Oversized) -> OversizedMessage:
    found = _ID_AT_END.search(item.tail) or _ID_AT_START.search(item.head)
    is_event = found is None and bool(_EVENT_KEY.search(item.head) or _EVENT_KEY.search(item.tail))
    return OversizedMessage(id=found.group(1).decode() if found else None, is_event=is_event, size=item.size)


def _undecodable(line: bytes, why: str) -> UndecodableMessage:
    head, tail = line[:4096], line[-4096:]
    found = _ID_AT_END.search(tail) or _ID_AT_START.search(head)
    return UndecodableMessage(id=found.group(1).decode() if found else None, why=why, size=len(line))
