"""The transport's rules under odd input and stalls, against a real QEMU (``-machine none``).

QEMU is frozen with SIGSTOP where a test needs it to stop reading (always continued after).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest

from integration.conftest import QemuProcess
from vmctl.errors import CommandTimeout, ConnectionLost, EventMatchError, GenericError, InvalidArgument
from vmctl.qmp import Monitor, connect
from vmctl.qmp.messages import Event

# More than the socket buffers hold while QEMU does not read (212 kB by default here), and small
# enough that QEMU parses it in seconds (its JSON lexer takes ~4 s a MiB on this machine's cores).
BIG = 2**20


@contextlib.contextmanager
def frozen(qemu: QemuProcess) -> Iterator[None]:
    qemu.signal(signal.SIGSTOP)
    try:
        yield
    finally:
        qemu.signal(signal.SIGCONT)


def test_a_raising_match_ends_its_subscription_and_the_monitor_carries_on(qmp: Monitor) -> None:
    def broken(event: Event) -> bool:
        raise RuntimeError("user bug")

    with qmp.events("STOP", match=broken) as bad, qmp.events("STOP") as good:
        qmp.execute("stop")
        assert good.get(timeout=5).name == "STOP"
        with pytest.raises(EventMatchError):
            bad.get(timeout=5)
    qmp.execute("cont")
    assert qmp.execute("query-status")["status"] == "running"


def test_a_short_deadline_during_a_stalled_send_does_not_fail_another_callers_command(
    qemu: QemuProcess, qmp: Monitor
) -> None:
    results: dict[str, Any] = {}

    def call(key: str, arguments: dict[str, Any], timeout: float) -> None:
        try:
            results[key] = qmp.execute("qom-list", arguments, timeout=timeout)
        except BaseException as exc:
            results[key] = exc

    with frozen(qemu):
        short = threading.Thread(target=call, args=("short", {"path": "/", "pad": "x" * BIG}, 0.3))
        short.start()
        time.sleep(0.1)
        patient = threading.Thread(target=call, args=("patient", {"path": "/machine"}, 30))
        patient.start()
        short.join(5)
        time.sleep(0.3)
    patient.join(30)
    assert isinstance(results["short"], CommandTimeout)
    assert isinstance(results["patient"], list) and results["patient"]  # QEMU's answer, not ConnectionLost
    assert qmp.is_connected and qmp.execute("query-status")["status"] == "running"
    # The short caller's command was sent whole in the end: QEMU parsed it and refused the argument.
    with pytest.raises(GenericError, match="pad"):
        qmp.execute("qom-list", {"path": "/", "pad": "y"})


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0])
def test_a_bad_timeout_is_refused_before_qemu_sees_anything(qmp: Monitor, timeout: float) -> None:
    with pytest.raises(InvalidArgument):
        qmp.execute("stop", timeout=timeout)
    assert qmp.execute("query-status")["status"] == "running"  # the stop never went out


def test_a_huge_finite_timeout_waits_normally(qmp: Monitor) -> None:
    assert qmp.execute("query-status", timeout=1e20)["status"] == "running"


class _Interrupted(Exception):
    pass


def test_an_interrupted_send_fails_the_connection_cleanly_and_qemu_stays_sane(tmp_path: Path) -> None:
    path = str(tmp_path / "qmp.sock")
    qemu = QemuProcess(tmp_path, "-qmp", f"unix:{path},server=on,wait=off")

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        monitor = connect(path, timeout=10)
        with frozen(qemu):
            signal.setitimer(signal.ITIMER_REAL, 0.3)  # while the big command is half written
            with pytest.raises(_Interrupted):
                monitor.execute("qom-list", {"path": "/", "pad": "x" * BIG}, timeout=30)
        with pytest.raises(ConnectionLost, match="interrupted"):
            monitor.execute("query-status")
        monitor.close()
        # QEMU dropped the half command with that connection; a new one works.
        with connect(path, timeout=10) as again:
            assert again.execute("query-status")["status"] == "running"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        qemu.stop()
