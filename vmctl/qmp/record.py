"""What a connection writes down about its commands and events: log lines and the transcript.

Arguments and event data are redacted before they are written anywhere. Commands and events
named quiet (frequent polls) are left out unless they fail. The connection core calls here only
when something is to be written (``active``), so a quiet connection pays nothing per command.
"""

from __future__ import annotations

import os
import time
from typing import Any, Final

from vmctl.qmp.messages import ErrorReply, Event, Reply
from vmctl.qmp.outbox import Command
from vmctl.qmp.redact import redact_arguments, redact_value
from vmctl.qmp.transcript import Transcript

_DEBUG: Final = 10


class Record:
    """The log (the core's logger, bound to the connection's name) and the optional transcript."""

    def __init__(
        self,
        log: Any,
        *,
        quiet_commands: frozenset[str],
        quiet_events: frozenset[str],
        transcript: str | os.PathLike[str] | None,
    ) -> None:
        self._log = log
        self._quiet_commands = quiet_commands
        self._quiet_events = quiet_events
        # A filtering bound logger's level is fixed when it is bound: ask once, not per command.
        self._debug = bool(getattr(log, "is_enabled_for", lambda level: True)(_DEBUG))
        self._transcript = Transcript(transcript) if transcript is not None else None
        #: Whether anything per command or event is written at all.
        self.active = self._debug or self._transcript is not None

    def sent(self, command: Command) -> None:
        if self._transcript is not None and command.name not in self._quiet_commands:
            record: dict[str, Any] = {"execute": command.name, "id": command.id}
            if command.arguments:
                record["arguments"] = redact_arguments(command.name, command.arguments)
            self._transcript.write("send", record)

    def answered(self, command: Command, reply: Reply | ErrorReply) -> None:
        failed = type(reply) is ErrorReply
        quiet = command.name in self._quiet_commands
        if self._transcript is not None and not quiet:
            if isinstance(reply, ErrorReply):
                self._transcript.write("recv", {"id": command.id, "error": dict(reply.error)})
            else:
                self._transcript.write("recv", {"id": command.id, "return": redact_value(reply.value)})
        if failed or not quiet:
            self.outcome(command)

    def outcome(self, command: Command) -> None:
        """The debug line of a command QEMU answered, or that failed without an answer."""
        if not self._debug:
            return
        fields: dict[str, Any] = {
            "cmd": command.name,
            "id": command.id,
            "ms": elapsed_ms(command),
            "outcome": "ok" if command.failure is None else type(command.failure).__name__,
            "arguments": redact_arguments(command.name, command.arguments),
        }
        if command.failure is not None:
            fields["error"] = str(command.failure)
        self._log.debug("qmp.command", **fields)

    def gave_up(self, command: Command) -> None:
        """The caller stopped waiting (timeout, cancellation): always a warning."""
        if command.name not in self._quiet_commands:
            self._log.warning(
                "qmp.command",
                cmd=command.name,
                id=command.id,
                ms=elapsed_ms(command),
                outcome="timeout",
                sent=command.sent,
                arguments=redact_arguments(command.name, command.arguments),
            )

    def event(self, event: Event) -> None:
        if event.name in self._quiet_events:
            return
        if self._debug:
            self._log.debug("qmp.event", name=event.name, data=redact_value(dict(event.data)))
        if self._transcript is not None:
            self._transcript.write(
                "recv", {"event": event.name, "data": redact_value(dict(event.data)), "timestamp": event.timestamp}
            )

    def close(self) -> None:
        if self._transcript is not None:
            self._transcript.close()


def elapsed_ms(command: Command) -> float:
    return round((time.monotonic() - command.started) * 1000, 3)
