"""The QEMU process: started by us, or adopted by pid after a control-plane restart.

Signals go through a pidfd, so a pid reused by another process is never signalled, and exit is
noticed through the same pidfd (poll), for children and adopted processes alike.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from vmctl.errors import StaleState
from vmctl.model.status import ExitStatus
from vmctl.vm.passing import own_file


def qemu_binary() -> str | None:
    """The QEMU to run: ``$VMCTL_QEMU`` if set (for everything: library, tests, demo, bench), else
    ``qemu-system-x86_64`` from the PATH; None if there is none."""
    return os.environ.get("VMCTL_QEMU") or shutil.which("qemu-system-x86_64")


def stat_fields(stat: str) -> list[str]:
    """The fields of a ``/proc/PID/stat`` line after the command name, from the state (field 3)
    on: the name may contain spaces and parentheses, so the split is after its last ")"."""
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> int:
    """The process's start time in clock ticks since boot: with the pid, it names one process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        raise StaleState(f"process {pid} does not exist") from None
    fields = stat_fields(stat)
    if fields[0] in ("Z", "X"):  # exited, not yet reaped by its (new) parent
        raise StaleState(f"process {pid} has exited")
    return int(fields[19])


class QemuProcess:
    def __init__(self, pid: int, *, popen: subprocess.Popen[bytes] | None, started: int) -> None:
        self.pid = pid
        self.start_time = started
        self._popen = popen
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise StaleState(f"process {pid} does not exist") from None
        self._exit: ExitStatus | None = None

    @classmethod
    def start(cls, argv: Sequence[str], *, log_path: Path, pass_fds: Sequence[int] = ()) -> QemuProcess:
        """Start ``argv`` with its output going to a fresh ``log_path`` (vmctl's own file) and
        ``pass_fds`` inherited."""
        _reap_detached()
        log = own_file(str(log_path), 0o640)
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                pass_fds=tuple(pass_fds),
                # Its own session: the VM outlives a control plane that exits or gets a terminal signal.
                start_new_session=True,
            )
        finally:
            os.close(log)
        return cls(popen.pid, popen=popen, started=start_time(popen.pid))

    @classmethod
    def adopt(cls, pid: int, expected_start_time: int) -> QemuProcess:
        """The running process ``pid``, if it is still the one that was started (not a reused pid)."""
        actual = start_time(pid)
        if actual != expected_start_time:
            raise StaleState(
                f"pid {pid} now belongs to another process (started at {actual}, not {expected_start_time})"
            )
        process = cls(pid, popen=None, started=actual)
        if start_time(pid) != expected_start_time:  # the pidfd may have caught a newer process
            process.close()
            raise StaleState(f"pid {pid} was reused while attaching")
        return process

    @property
    def is_child(self) -> bool:
        return self._popen is not None

    @property
    def exit_status(self) -> ExitStatus | None:
        return self._exit

    def fileno(self) -> int:
        """The pidfd: readable once the process has exited."""
        return self._pidfd

    def poll(self) -> ExitStatus | None:
        if self._exit is not None:
            return self._exit
        # The pidfd says whether the process has exited, without reaping it; only then is the
        # child reaped (Popen.wait, which is safe from several threads, unlike a racing poll()).
        if self._pidfd < 0 or not _readable(self._pidfd, 0):
            return None
        if self._popen is not None:
            self._exit = ExitStatus.from_returncode(self._popen.wait())
        else:
            self._exit = ExitStatus(code=None, signal=None)
        return self._exit

    def wait(self, timeout: float) -> ExitStatus | None:
        """The exit status, or None if the process still runs after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.poll()
            if status is not None:
                return status
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            if self._pidfd < 0:
                return None
            _readable(self._pidfd, remaining)

    def send_signal(self, signum: int) -> bool:
        """Signal the process unless it has exited; never a process that reused its pid."""
        if self.poll() is not None:
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        """Stop tracking the process (it runs on). A child of ours is kept for reaping when it ends."""
        if self._pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._pidfd)
            self._pidfd = -1
        if self._popen is not None:
            if self._exit is None:
                _detached_children.append(self._popen)
            self._popen = None
        _reap_detached()


# Children whose VM was detached (closed) while they ran: reaped here once they end (a detached
# VM's QEMU would otherwise stay a zombie for as long as this process lives).
_detached_children: list[subprocess.Popen[bytes]] = []


def _reap_detached() -> None:
    _detached_children[:] = [p for p in _detached_children if p.poll() is None]


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` polls readable within ``timeout`` seconds (poll: any fd number works)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(0, int(min(timeout, 3600.0) * 1000) + (1 if timeout > 0 else 0))))
