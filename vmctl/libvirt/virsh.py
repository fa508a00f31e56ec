"""QMP through the ``virsh`` command line, for hosts where only libvirt's CLI may be used.

A command is one ``virsh qemu-monitor-command`` run (killed at its timeout); events come from one
``virsh qemu-monitor-event --loop`` that lives as long as the monitor, read on a thread of ours.
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from vmctl.errors import CommandTimeout, ConnectError, ConnectionLost, InvalidArgument
from vmctl.libvirt.errors import DomainNotFound, DomainNotRunning, LibvirtError
from vmctl.libvirt.relay import RelayedMonitor, event_from_relay
from vmctl.qmp.timeouts import TimeoutPolicy

# virsh prints: event STOP at 1700000000.123456 for domain 'vm1': {"reason":"x"}  (or <null>)
_EVENT_LINE = re.compile(r"^event (\S+) at (\d+)\.(\d+) for domain '.*': (.*)$")


class VirshMonitor(RelayedMonitor):
    """The QMP monitor of domain ``name`` at ``uri``, through ``virsh`` only."""

    def __init__(
        self, uri: str, name: str, *, timeouts: TimeoutPolicy | None = None, virsh: str = "virsh", timeout: float = 10.0
    ) -> None:
        if not name or "\n" in name:
            raise InvalidArgument(f"a domain name, not {name!r}")
        super().__init__(name, timeouts=timeouts, max_fds=1)
        self.uri = uri
        self._virsh = virsh
        self._stderr = b""
        try:
            self._listener = subprocess.Popen(
                [virsh, "-q", "-c", uri, "qemu-monitor-event", "--domain", name, "--loop"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except OSError as exc:
            self._workers.shutdown(wait=False)
            raise ConnectError(f"cannot run {virsh}: {exc}") from None
        self._reader = threading.Thread(target=self._read_events, name=f"vmctl-virsh-events-{name}", daemon=True)
        self._reader.start()
        try:
            self._await_listening(timeout)
        except BaseException:
            self._stop_listener()
            self._workers.shutdown(wait=False)
            raise

    def _await_listening(self, timeout: float) -> None:
        # virsh prints nothing once it listens; its main thread then blocks reading the pipe its
        # event loop writes to, which it does only after libvirtd accepted the registration.
        wchan = Path(f"/proc/{self._listener.pid}/wchan")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._listener.poll() is not None:
                self._reader.join(timeout=1.0)
                raise _virsh_error(self._stderr.decode(errors="replace"), f"{self.name}: virsh cannot hear events")
            with contextlib.suppress(OSError):
                if "pipe_read" in wchan.read_text():  # anon_pipe_read on newer kernels
                    return
            time.sleep(0.005)
        raise ConnectError(f"{self.name}: virsh qemu-monitor-event did not start listening within {timeout:g}s")

    def _relay(self, message: str, fds: Sequence[int], timeout: float) -> str:
        argv = [self._virsh, "-q", "-c", self.uri, "qemu-monitor-command", self.name]
        if fds:
            argv += ["--pass-fds", ",".join(str(fd) for fd in fds)]
        try:
            done = subprocess.run(
                [*argv, message],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                pass_fds=tuple(fds),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise CommandTimeout(command=json.loads(message)["execute"], timeout=timeout) from None
        if done.returncode != 0:
            error = _virsh_error(done.stderr.decode(errors="replace"), f"{self.name}: virsh did not pass it on")
            if isinstance(error, ConnectionLost):
                self._lost(error)
            raise error
        return done.stdout.decode()

    def _read_events(self) -> None:
        stdout = self._listener.stdout
        assert stdout is not None
        for raw in stdout:
            line = raw.decode(errors="replace").strip()
            found = _EVENT_LINE.match(line)
            if found is None:
                continue
            name, seconds, micros, details = found.groups()
            try:
                event = event_from_relay(name, int(seconds), int(micros), None if details == "<null>" else details)
                self._deliver(event)
            except (ValueError, TypeError):
                self._log.warning("qmp.undecodable_event", line=line[:200])
        assert self._listener.stderr is not None
        self._stderr = self._listener.stderr.read()
        self._listener.wait()
        if not self._closed:  # _lost ignores it when close() ended the listener
            why = self._stderr.decode(errors="replace")[-300:]
            self._lost(ConnectionLost(f"{self.name}: virsh qemu-monitor-event ended: {why}"))

    def _stop_listener(self) -> None:
        if self._listener.poll() is None:
            self._listener.terminate()
            try:
                self._listener.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._listener.kill()
                self._listener.wait(timeout=5.0)
        self._reader.join(timeout=5.0)
        for pipe in (self._listener.stdout, self._listener.stderr):
            if pipe is not None:
                pipe.close()

    def _close_relay(self) -> None:
        self._stop_listener()


def _virsh_error(stderr: str, what: str) -> LibvirtError:
    reason = stderr.strip().removeprefix("error: ").replace("\nerror: ", "; ")
    if "Domain not found" in reason or "failed to get domain" in reason:
        return DomainNotFound(what, reason=reason)
    if "not running" in reason:
        return DomainNotRunning(what, reason=reason)
    if "Failed to connect" in reason or "failed to connect" in reason:
        return _ConnectFailed(what, reason=reason)
    return LibvirtError(what, reason=reason)


class _ConnectFailed(LibvirtError, ConnectError):
    """virsh could not reach libvirtd."""
