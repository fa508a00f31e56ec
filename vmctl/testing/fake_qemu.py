"""A scriptable fake QEMU monitor: a real socket server speaking QMP, for fast unit tests.

It greets, requires capability negotiation, answers built-in commands the way QEMU does
(status, stop/cont with events, add-fd/getfd with real SCM_RIGHTS fds, query-commands…), and
lets a test script handlers, delays, events and faults (close mid-reply, garbage, oversized
replies, silence, a frozen process). The socket side (accepting, reading lines and their fds,
freezing) is :class:`~vmctl.testing.fake_server.FakeServer`'s; this module is what QMP says.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal

import attrs

from vmctl.testing.fake_server import FakeServer

Fault = Literal["close_mid_reply", "close", "garbage", "no_reply", "oversized", "deeply_nested"]

#: How deep the "deeply_nested" fault nests its reply: valid JSON, deeper than a parser recurses.
DEEPLY_NESTED_DEPTH = 200_000


@attrs.frozen(kw_only=True)
class FakeCall:
    """One command the fake received."""

    command: str
    arguments: Mapping[str, Any]
    id: Any
    fds: tuple[int, ...] = ()
    oob: bool = False


class FakeCommandError(Exception):
    """Raise from a handler to answer with a QMP error."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(desc)
        self.error_class = error_class
        self.desc = desc


Handler = Callable[[FakeCall], Any]


@attrs.define(kw_only=True)
class _Script:
    handler: Handler | None = None
    delay: float = 0.0
    fault: Fault | None = None
    oversized_bytes: int = 0
    events_before_reply: tuple[tuple[str, Mapping[str, Any]], ...] = ()


class FakeQEMU:
    """Serve QMP on a unix socket (``address``) or hand out a connected socket (``client_socket``)."""

    def __init__(
        self,
        *,
        capabilities: tuple[str, ...] = ("oob",),
        version: tuple[int, int, int] = (7, 2, 0),
        greeting: bytes | None = None,
    ) -> None:
        self.capabilities = capabilities
        self.version = version
        self._greeting = greeting
        self.calls: list[FakeCall] = []
        self.running = True
        self.fdsets: dict[int, list[tuple[int, int]]] = {}  # fdset-id -> [(fd number, the fd we hold)]
        self.fd_opaques: dict[int, str] = {}  # fd number -> opaque
        self.named_fds: dict[str, int] = {}
        self.negotiated_capabilities: list[str] | None = None
        self._scripts: dict[str, _Script] = {}
        self._lock = threading.Lock()
        self._timers: list[threading.Timer] = []
        self._next_fdset = 0
        self._server = FakeServer(on_connect=self._greet, on_line=self._handle_line)
        self.address = self._server.address

    # -- lifecycle --------------------------------------------------------------------------

    def serve(self) -> FakeQEMU:
        """Listen on ``address`` and serve one client at a time."""
        self._server.serve()
        return self

    def client_socket(self) -> socket.socket:
        """A connected socket whose other end this fake serves (like a socketpair-launched QEMU)."""
        return self._server.client_socket()

    def __enter__(self) -> FakeQEMU:
        return self if self._server.listening else self.serve()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._server.close()  # first: a delayed answer whose timer fires from now on says nothing
        for timer in self._timers:
            timer.cancel()
        for fdset in self.fdsets.values():
            for _, dup in fdset:
                os.close(dup)
        self.fdsets.clear()
        for fd in self.named_fds.values():
            os.close(fd)
        self.named_fds.clear()

    def disconnect(self) -> None:
        """Drop the current client connection, like QEMU exiting."""
        self._server.disconnect()

    def freeze(self) -> None:
        """Stop reading and answering, like a SIGSTOPped QEMU."""
        self._server.freeze()

    def thaw(self) -> None:
        self._server.thaw()

    # -- scripting --------------------------------------------------------------------------

    def on(
        self,
        command: str,
        handler: Handler | None = None,
        *,
        returns: Any = None,
        error: tuple[str, str] | None = None,
        delay: float = 0.0,
        fault: Fault | None = None,
        oversized_bytes: int = 0,
        events_before_reply: tuple[tuple[str, Mapping[str, Any]], ...] = (),
    ) -> None:
        """Script ``command``: a handler, a fixed return value or error, a delay, a fault."""
        if handler is None and error is not None:
            error_class, desc = error

            def handler(call: FakeCall) -> Any:
                raise FakeCommandError(error_class, desc)

        elif handler is None and fault is None and returns is not None:
            value = returns

            def handler(call: FakeCall) -> Any:
                return value

        with self._lock:
            previous = self._scripts.get(command)
            self._scripts[command] = _Script(
                handler=handler or (previous.handler if previous else None),
                delay=delay,
                fault=fault,
                oversized_bytes=oversized_bytes,
                events_before_reply=events_before_reply,
            )

    def emit_event(self, name: str, data: Mapping[str, Any] | None = None) -> None:
        now = time.time()
        message: dict[str, Any] = {
            "event": name,
            "timestamp": {"seconds": int(now), "microseconds": int((now % 1) * 1e6)},
        }
        if data is not None:
            message["data"] = dict(data)
        self._write(message)

    def send_raw(self, data: bytes) -> None:
        self._server.send(data)

    def calls_of(self, command: str) -> list[FakeCall]:
        return [c for c in self.calls if c.command == command]

    # -- answering --------------------------------------------------------------------------

    def _greet(self) -> None:
        """A client arrived: it must negotiate capabilities again, after QEMU's greeting."""
        self.negotiated_capabilities = None
        if self._greeting is not None:
            self.send_raw(self._greeting)
            return
        major, minor, micro = self.version
        self._write(
            {
                "QMP": {
                    "version": {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "fake"},
                    "capabilities": list(self.capabilities),
                }
            }
        )

    def _handle_line(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self._write({"error": {"class": "GenericError", "desc": "JSON parse error"}})
            return
        oob = "exec-oob" in message
        command = message.get("exec-oob" if oob else "execute")
        call = FakeCall(
            command=str(command),
            arguments=message.get("arguments") or {},
            id=message.get("id"),
            fds=tuple(self._server.received_fds),
            oob=oob,
        )
        self.calls.append(call)
        with self._lock:
            script = self._scripts.get(call.command)
        if script is None or script.delay <= 0:
            self._answer(call, script)
        else:
            timer = threading.Timer(script.delay, self._answer, (call, script))
            timer.daemon = True
            self._timers.append(timer)
            timer.start()

    def _answer(self, call: FakeCall, script: _Script | None) -> None:
        if self._server.closed:
            return
        self._server.wait_thawed()
        reply: dict[str, Any] = {"id": call.id} if call.id is not None else {}
        if script is not None:
            for name, data in script.events_before_reply:
                self.emit_event(name, data)
            if script.fault is not None:
                self._fault(call, script, reply)
                return
        try:
            reply["return"] = self._run(call, script)
        except FakeCommandError as exc:
            reply["error"] = {"class": exc.error_class, "desc": exc.desc}
        self._write(reply)
        if call.command == "quit" and "return" in reply:
            self.disconnect()

    def _fault(self, call: FakeCall, script: _Script, reply: dict[str, Any]) -> None:
        if script.fault == "close_mid_reply":
            reply["return"] = {"status": "running"}
            encoded = json.dumps(reply).encode()
            self.send_raw(encoded[: len(encoded) // 2])
            self.disconnect()
        elif script.fault == "close":
            self.disconnect()
        elif script.fault == "garbage":
            self.send_raw(b"this is not json {]\r\n")
        elif script.fault == "oversized":
            reply = {"return": {"blob": "x" * script.oversized_bytes}, **reply}
            self._write(reply)
        elif script.fault == "deeply_nested":
            nested = b"[" * DEEPLY_NESTED_DEPTH + b"]" * DEEPLY_NESTED_DEPTH
            self.send_raw(b'{"return": ' + nested + b", " + json.dumps(reply)[1:].encode() + b"\r\n")
        # "no_reply": say nothing at all

    def _run(self, call: FakeCall, script: _Script | None) -> Any:
        if self.negotiated_capabilities is None and call.command != "qmp_capabilities":
            raise FakeCommandError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'")
        if script is not None and script.handler is not None:
            return script.handler(call)
        builtin = getattr(self, "_cmd_" + call.command.replace("-", "_"), None)
        if builtin is None:
            raise FakeCommandError("CommandNotFound", f"The command {call.command} has not been found")
        return builtin(call)

    def _write(self, message: Mapping[str, Any]) -> None:
        with contextlib.suppress(OSError):
            self.send_raw(json.dumps(message).encode() + b"\r\n")

    # -- built-in commands ------------------------------------------------------------------

    def _cmd_qmp_capabilities(self, call: FakeCall) -> Any:
        if self.negotiated_capabilities is not None:
            raise FakeCommandError("CommandNotFound", "Capabilities negotiation is already complete, command ignored")
        enable = list(call.arguments.get("enable", []))
        for capability in enable:
            if capability not in self.capabilities:
                raise FakeCommandError("GenericError", f"Capability '{capability}' not available")
        self.negotiated_capabilities = enable
        return {}

    def _cmd_query_status(self, call: FakeCall) -> Any:
        return {"status": "running" if self.running else "paused", "singlestep": False, "running": self.running}

    def _cmd_query_version(self, call: FakeCall) -> Any:
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": "fake"}

    def _cmd_query_commands(self, call: FakeCall) -> Any:
        names = {n[5:].replace("_", "-") for n in dir(self) if n.startswith("_cmd_")}
        names.discard("qmp-capabilities")
        names.add("qmp_capabilities")
        with self._lock:
            names.update(self._scripts)
        return [{"name": n} for n in sorted(names)]

    def _cmd_stop(self, call: FakeCall) -> Any:
        self.running = False
        self.emit_event("STOP")
        return {}

    def _cmd_cont(self, call: FakeCall) -> Any:
        self.running = True
        self.emit_event("RESUME")
        return {}

    def _cmd_quit(self, call: FakeCall) -> Any:
        return {}

    def _cmd_human_monitor_command(self, call: FakeCall) -> Any:
        return f"fake: {call.arguments.get('command-line', '')}\r\n"

    def _take_msgfd(self) -> int:
        if not self._server.received_fds:
            raise FakeCommandError("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        return self._server.received_fds.pop(0)

    def _cmd_add_fd(self, call: FakeCall) -> Any:
        fd = self._take_msgfd()
        fdset_id = call.arguments.get("fdset-id")
        if fdset_id is None:
            fdset_id = self._next_fdset
            self._next_fdset += 1
        fdset = self.fdsets.setdefault(int(fdset_id), [])
        number = 100 + sum(len(s) for s in self.fdsets.values())
        fdset.append((number, fd))
        if "opaque" in call.arguments:
            self.fd_opaques[number] = str(call.arguments["opaque"])
        return {"fdset-id": fdset_id, "fd": number}

    def _cmd_remove_fd(self, call: FakeCall) -> Any:
        fdset_id = int(call.arguments["fdset-id"])
        if fdset_id not in self.fdsets:
            raise FakeCommandError("GenericError", f"File descriptor named 'fdset-id:{fdset_id}' not found")
        for _, dup in self.fdsets.pop(fdset_id):
            os.close(dup)
        return {}

    def _cmd_query_fdsets(self, call: FakeCall) -> Any:
        return [
            {
                "fdset-id": fdset_id,
                "fds": [
                    {"fd": number, **({"opaque": self.fd_opaques[number]} if number in self.fd_opaques else {})}
                    for number, _ in fds
                ],
            }
            for fdset_id, fds in sorted(self.fdsets.items())
        ]

    def _cmd_getfd(self, call: FakeCall) -> Any:
        fd = self._take_msgfd()
        name = str(call.arguments["fdname"])
        if name in self.named_fds:
            os.close(self.named_fds[name])
        self.named_fds[name] = fd
        return {}

    def _cmd_closefd(self, call: FakeCall) -> Any:
        name = str(call.arguments["fdname"])
        if name not in self.named_fds:
            raise FakeCommandError("GenericError", f"File descriptor named '{name}' not found")
        os.close(self.named_fds.pop(name))
        return {}

    def _cmd_query_qmp_schema(self, call: FakeCall) -> Any:
        return [
            {"name": "device_add", "meta-type": "command", "arg-type": "0", "ret-type": "1"},
            {
                "name": "0",
                "meta-type": "object",
                "members": [{"name": "driver", "type": "str"}, {"name": "bus", "type": "str"}],
            },
            {"name": "1", "meta-type": "object", "members": []},
            {"name": "STOP", "meta-type": "event", "arg-type": "1"},
        ]
