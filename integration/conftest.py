from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmctl.qmp import Monitor, connect

QEMU = shutil.which("qemu-system-x86_64")
_started: list[subprocess.Popen[bytes]] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.integration)


def _require_qemu() -> str:
    if QEMU is None:
        pytest.fail("qemu-system-x86_64 is not installed: run .ci/run or `make test`, which install it")
    return QEMU


class QemuProcess:
    """A bare QEMU (``-machine none``) whose QMP monitor is one end of a socketpair."""

    def __init__(self, tmp_path: Path, *extra: str) -> None:
        ours, theirs = socket.socketpair()
        self.log_path = tmp_path / "qemu.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    _require_qemu(),
                    "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
                    "-chardev", f"socket,id=mon0,fd={theirs.fileno()}",
                    "-mon", "chardev=mon0,mode=control",
                    *extra,
                ],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        theirs.close()
        _started.append(self.process)
        self.socket = ours

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)
            self.process.kill()
        self.process.wait(10)
        self.socket.close()


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[QemuProcess]:
    process = QemuProcess(tmp_path)
    try:
        yield process
    finally:
        process.stop()


@pytest.fixture
def qmp(qemu: QemuProcess) -> Iterator[Monitor]:
    with connect(qemu.socket, name="qemu", timeout=10) as monitor:
        yield monitor


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    alive = [p.pid for p in _started if p.poll() is None]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    if alive:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        print(f"\nERROR: QEMU processes left running after the tests: {alive}")
