"""A minimal raw QMP client for the benchmarks: a blocking socket, a line out, lines in."""

from __future__ import annotations

import array
import json
import socket
from typing import Any


class RawQMP:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()
        self.call("qmp_capabilities")

    def call(self, command: str, arguments: dict[str, Any] | None = None, fds: list[int] | None = None) -> Any:
        message: dict[str, Any] = {"execute": command, "id": command}
        if arguments:
            message["arguments"] = arguments
        data = json.dumps(message).encode() + b"\n"
        if fds:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
            self.sock.sendmsg([data], rights)
        else:
            self.sock.sendall(data)
        while True:
            reply = json.loads(self.reader.readline())
            if reply.get("id") == command:
                if "error" in reply:
                    raise RuntimeError(f"{command}: {reply['error']}")
                return reply["return"]

    def wait_event(self, name: str, **data: Any) -> None:
        """Read until event ``name`` whose data contains ``data``."""
        while True:
            message = json.loads(self.reader.readline())
            if message.get("event") == name and all(message.get("data", {}).get(k) == v for k, v in data.items()):
                return

    def close(self) -> None:
        self.reader.close()
        self.sock.close()
