"""``vmctl qmp``: an interactive QMP shell, and one-shot commands.

Input is either QMP JSON (``{"execute": "query-status"}``) or ``command key=value ...``, where
each value is read as JSON when it parses (numbers, true/false, objects, lists) and as a string
otherwise; dotted keys nest (``file.driver=file``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from vmctl.errors import CommandError, InvalidArgument, QMPError
from vmctl.qmp import Event, QMPMonitor

HISTORY_FILE = Path(os.environ.get("VMCTL_QMP_HISTORY", Path.home() / ".vmctl_qmp_history"))


def parse_input(line: str) -> tuple[str, dict[str, Any]]:
    """``(command, arguments)`` from a line of shell input."""
    text = line.strip()
    if not text:
        raise InvalidArgument("empty input")
    if text.startswith("{"):
        try:
            message = json.loads(text)
        except ValueError as exc:
            raise InvalidArgument(f"not valid JSON: {exc}") from None
        if not isinstance(message, dict) or not isinstance(message.get("execute"), str):
            raise InvalidArgument('JSON input must look like {"execute": "...", "arguments": {...}}')
        given = message.get("arguments", {})
        if not isinstance(given, dict):
            raise InvalidArgument("arguments must be a JSON object")
        return message["execute"], given
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(f"cannot split the input: {exc}") from None
    command, *pairs = words
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, equals, raw = pair.partition("=")
        if not equals or not key:
            raise InvalidArgument(f"expected key=value, got {pair!r}")
        _set_nested(arguments, key.split("."), _value(raw))
    return command, arguments


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _set_nested(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.setdefault(key, {})
        if not isinstance(child, dict):
            raise InvalidArgument(f"{key} is given both as a value and as an object")
        target = child
    target[path[-1]] = value


def format_result(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True)


def run_one(qmp: QMPMonitor, command: str, arguments: Mapping[str, Any], out: TextIO) -> int:
    try:
        result = qmp.execute(command, arguments or None)
    except CommandError as exc:
        out.write(f"error: {exc.error_class}: {exc.desc}\n")
        return 1
    except QMPError as exc:
        out.write(f"error: {exc}\n")
        return 1
    out.write(format_result(result) + "\n")
    return 0


def interactive(qmp: QMPMonitor, out: TextIO = sys.stdout) -> int:
    """Read commands until EOF, with readline history and completion of command names."""
    import readline

    commands = sorted(str(c["name"]) for c in qmp.execute("query-commands"))
    readline.set_completer(_completer(commands))
    readline.parse_and_bind("tab: complete")
    readline.set_completer_delims(" \t")
    with contextlib.suppress(OSError):
        readline.read_history_file(HISTORY_FILE)

    def show_event(event: Event) -> None:
        out.write(f"\nevent {event.name} {json.dumps(dict(event.data))}\n")
        out.flush()

    qmp.on_event(show_event)
    out.write(f"QEMU {qmp.version}: {len(commands)} commands; tab completes, Ctrl-D quits\n")
    status = 0
    try:
        while True:
            try:
                line = input("(qmp) ")
            except EOFError:
                out.write("\n")
                return status
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if not line.strip():
                continue
            try:
                command, arguments = parse_input(line)
            except InvalidArgument as exc:
                out.write(f"error: {exc}\n")
                continue
            status = run_one(qmp, command, arguments, out)
    finally:
        with contextlib.suppress(OSError):
            readline.write_history_file(HISTORY_FILE)


def _completer(commands: list[str]) -> Callable[[str, int], str | None]:
    def complete(text: str, state: int) -> str | None:
        matches = [c for c in commands if c.startswith(text)]
        return matches[state] if state < len(matches) else None

    return complete
