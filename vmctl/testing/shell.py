"""Run shell commands inside the test guest, over its second serial port.

The read loop (``_read_line``) looks like the guest agent client's (``vmctl.agent.client``): both
receive from a socket until a deadline and name a failed or closed socket. That is the shape of
any socket read, not one idea: the agent's socket is non-blocking, waited on with a port check
between waits, and fails with the agent's errors; this one blocks with a timeout, reads lines of
a test shell, and fails with vmctl's. A helper shared by the two would take both policies as
arguments and save no reader anything, so each keeps its own loop.
"""

from __future__ import annotations

import base64
import itertools
import re
import threading
import time

import attrs

from vmctl.domain import Domain
from vmctl.errors import InvalidArgument, VmctlError, WaitTimeout
from vmctl.model.names import SHELL_SOCKET
from vmctl.qmp.transport import open_socket

_END = re.compile(rb"VMCTL-END (\d+) (\d+)\r?$")
_BEGIN = re.compile(rb"VMCTL-BEGIN (\d+)\r?$")


@attrs.frozen(kw_only=True)
class ShellResult:
    output: str
    status: int

    @property
    def ok(self) -> bool:
        return self.status == 0


class GuestCommandFailed(VmctlError):
    def __init__(self, command: str, result: ShellResult) -> None:
        super().__init__(f"guest command {command!r} exited with {result.status}: {result.output.strip()[-500:]}")
        self.result = result


class GuestShell:
    """A command shell in the test guest (the VM needs ``shell_serial=True``)."""

    def __init__(self, vm: Domain, *, timeout: float = 10.0) -> None:
        if not vm.spec.shell_serial:
            raise InvalidArgument(f"{vm.name} has no shell serial port (launch it with shell_serial=True)")
        self._vm = vm
        self._sock = open_socket(str(vm.run_dir / SHELL_SOCKET), timeout=timeout)
        self._sock.setblocking(True)
        self._buffer = b""
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestShell:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def run(self, command: str, *, timeout: float = 30.0, check: bool = False) -> ShellResult:
        """Run ``command`` with ``sh`` in the guest; its output (stdout and stderr) and exit status."""
        with self._lock:
            command_id = next(self._ids)
            self._send(command_id, command)
            result = self._read_result(command_id, timeout, command)
        if check and not result.ok:
            raise GuestCommandFailed(command, result)
        return result

    def poll(self, command: str, *, timeout: float = 10.0, interval: float = 0.1) -> str:
        """Rerun ``command`` in the guest until it succeeds with some output (say, until a
        hotplugged device shows up); returns that output. The loop runs in the guest: one
        round trip. ``WaitTimeout`` if it never does."""
        tries = max(1, int(timeout / interval))
        script = (
            f"for _ in $(seq {tries}); do out=$({{ {command}; }} 2>/dev/null) "
            f'&& [ -n "$out" ] && {{ echo "$out"; exit 0; }}; sleep {interval}; done; exit 1'
        )
        result = self.run(script, timeout=timeout + 10)
        if not result.ok:
            raise WaitTimeout(f"guest command {command!r} did not succeed with output within {timeout:g}s")
        return result.output.strip()

    def block_device(self, serial: str, *, timeout: float = 10.0) -> str:
        """The guest's name (``vda``, ``sdb``…) of the disk with this serial (vmctl sets the disk
        id), once the guest sees it. virtio-blk shows the serial in ``serial``, SCSI in VPD page 0x80."""
        find = f"{{ grep -lx '{serial}' /sys/block/*/serial; grep -la '{serial}' /sys/block/*/device/vpd_pg80; }}"
        return self.poll(f"{find} 2>/dev/null | head -n 1 | cut -d/ -f4", timeout=timeout)

    def send(self, command: str) -> None:
        """Start a command and do not wait (for ``reboot -f`` and other commands that never answer)."""
        with self._lock:
            self._send(next(self._ids), command)

    def _send(self, command_id: int, command: str) -> None:
        encoded = base64.b64encode(command.encode()).decode()
        self._sock.sendall(f"{command_id} {encoded}\n".encode())

    def _read_result(self, command_id: int, timeout: float, command: str) -> ShellResult:
        deadline = time.monotonic() + timeout
        collecting = False
        output: list[bytes] = []
        while True:
            line = self._read_line(deadline, command, timeout)
            begin = _BEGIN.match(line)
            if begin:
                collecting = int(begin.group(1)) == command_id
                output = []
                continue
            end = _END.match(line)
            if end and int(end.group(1)) == command_id:
                text = base64.b64decode(b"".join(output)).decode(errors="replace")
                return ShellResult(output=text, status=int(end.group(2)))
            if collecting:
                output.append(line.strip())

    def _read_line(self, deadline: float, command: str, timeout: float) -> bytes:
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"guest command {command!r} did not finish within {timeout:g}s")
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError as exc:
                raise VmctlError(f"the guest shell connection failed: {exc}") from exc
            if not data:
                raise VmctlError("the guest shell connection closed (did QEMU exit?)")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line
