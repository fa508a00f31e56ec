"""The QMP transport against a real QEMU (``-machine none``)."""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import socket
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from integration.conftest import QEMU, QemuProcess
from integration.versions import GREETING
from vmctl.errors import CommandNotFound, CommandTimeout, ConnectionLost, DeviceNotFound, GenericError
from vmctl.qmp import Monitor, connect


@pytest.mark.versioned(GREETING)
def test_negotiation_and_basic_queries(qmp: Monitor) -> None:
    assert qmp.version.major >= 7
    assert "oob" in qmp.greeting.capabilities
    assert qmp.capabilities == ("oob",)
    status = qmp.execute("query-status")
    assert status["running"] is True
    assert qmp.supports("device_add") and not qmp.supports("no-such-thing")
    assert qmp.schema.has_argument("blockdev-add", "node-name")
    assert qmp.schema.has_argument("blockdev-add", "filename")  # a member of the "file" union branch
    assert qmp.schema.has_command("migrate")


def test_errors_are_mapped(qmp: Monitor) -> None:
    with pytest.raises(CommandNotFound):
        qmp.execute("no-such-command")
    with pytest.raises(DeviceNotFound, match="missing0"):
        qmp.execute("device_del", {"id": "missing0"})
    with pytest.raises(GenericError):
        qmp.execute("closefd", {"fdname": "never-passed"})


def test_add_fd_shows_up_in_query_fdsets(qmp: Monitor) -> None:
    with tempfile.NamedTemporaryFile() as image:
        added = qmp.execute("add-fd", {"opaque": "vmctl-test"}, fds=[image])
    fdsets = qmp.execute("query-fdsets")
    [fdset] = [s for s in fdsets if s["fdset-id"] == added["fdset-id"]]
    assert fdset["fds"] == [{"fd": added["fd"], "opaque": "vmctl-test"}]
    qmp.execute("remove-fd", {"fdset-id": added["fdset-id"]})
    assert all(s["fdset-id"] != added["fdset-id"] for s in qmp.execute("query-fdsets"))


def test_getfd_and_closefd(qmp: Monitor) -> None:
    read_end, write_end = os.pipe()
    try:
        qmp.execute("getfd", {"fdname": "pipe0"}, fds=[write_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    qmp.execute("closefd", {"fdname": "pipe0"})
    with pytest.raises(GenericError, match="pipe0"):
        qmp.execute("closefd", {"fdname": "pipe0"})


def test_stop_and_cont_emit_events(qmp: Monitor) -> None:
    with qmp.events("STOP", "RESUME") as events:
        qmp.execute("stop")
        assert qmp.execute("query-status")["status"] == "paused"
        qmp.execute("cont")
        assert [events.get(5).name, events.get(5).name] == ["STOP", "RESUME"]
    assert [e.name for e in qmp.recent_events("STOP", "RESUME")][-2:] == ["STOP", "RESUME"]


def test_sigstop_times_out_then_sigcont_recovers(qemu: QemuProcess, qmp: Monitor) -> None:
    qemu.signal(signal.SIGSTOP)
    try:
        with pytest.raises(CommandTimeout, match="outcome is unknown"):
            qmp.execute("query-status", timeout=0.5)
    finally:
        qemu.signal(signal.SIGCONT)
    assert qmp.execute("query-status", timeout=10)["running"] is True
    assert qmp.execute("query-name", timeout=10) == {}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not {what} within {timeout:g}s"
        time.sleep(0.005)


def unread_by_qemu(sock: socket.socket) -> int:
    """Bytes this end sent that QEMU has not read yet (the unix socket's send queue)."""
    queued = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, queued)
    return queued[0]


def test_sigkill_while_a_command_is_pending_fails_it_and_later_ones_with_connection_lost_not_a_timeout(
    qemu: QemuProcess, qmp: Monitor
) -> None:
    qemu.signal(signal.SIGSTOP)  # keep the command pending: QEMU cannot read it
    wait_until(lambda: Path(f"/proc/{qemu.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T", "stopped")
    outcome: list[BaseException] = []

    def pending_command() -> None:
        try:
            qmp.execute("query-status", timeout=30)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=pending_command, daemon=True)
    thread.start()
    wait_until(lambda: unread_by_qemu(qemu.socket) > 0, "sent")  # the command waits in QEMU's socket
    assert not outcome
    qemu.signal(signal.SIGKILL)
    # The loss itself ends the wait, long before the command's own 30 s would: the reader
    # notices the connection closing (how soon is bench/'s to measure, not a test's to time).
    thread.join(10)
    assert not thread.is_alive(), "the pending command waited on after QEMU died"
    [error] = outcome
    assert isinstance(error, ConnectionLost) and "outcome is unknown" in str(error)  # it had been sent
    # A later command fails at once: it is neither sent nor waited for (that would end in a CommandTimeout).
    with pytest.raises(ConnectionLost):
        qmp.execute("query-status", timeout=30)


def test_secret_never_appears_in_logs_or_transcript(qemu: QemuProcess, tmp_path: Path) -> None:
    secret = "correct-horse-battery-staple"
    transcript = tmp_path / "qmp.jsonl"
    with capture_logs() as logs, connect(qemu.socket, name="qemu", transcript=transcript, timeout=10) as qmp:
        qmp.execute("object-add", {"qom-type": "secret", "id": "sec0", "data": secret, "format": "raw"})
        with pytest.raises(GenericError):
            qmp.execute("set_password", {"protocol": "vnc", "password": secret})
        qmp.human(f"object_add secret,id=sec1,data={secret}")
        assert qmp.execute("qom-list", {"path": "/objects"})
    assert logs, "expected the commands to be logged"
    assert secret not in repr(logs)
    text = transcript.read_text()
    assert secret not in text
    sent = [json.loads(line) for line in text.splitlines() if '"send"' in line]
    assert [r["execute"] for r in sent] == ["object-add", "set_password", "human-monitor-command", "qom-list"]


def test_eight_threads_each_get_their_own_replies(qmp: Monitor) -> None:
    mismatches: list[str] = []
    failures: list[BaseException] = []
    replies = [0] * 8

    def worker(thread: int) -> None:
        try:
            for i in range(1000):
                value = thread * 100_000 + i
                # HMP "print" echoes the number back: each reply is specific to its command.
                output = qmp.human(f"print {value}", timeout=30)
                replies[thread] += 1
                if int(output.strip(), 16) != value:
                    mismatches.append(f"thread {thread} sent {value} got {output!r}")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,), daemon=True) for n in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert [t.is_alive() for t in threads] == [False] * 8, f"hung workers; replies so far {replies}"
    assert not failures
    assert not mismatches
    assert replies == [1000] * 8


def test_connect_waits_for_qemu_to_create_its_socket(tmp_path: Path) -> None:
    assert QEMU is not None
    path = tmp_path / "qmp.sock"
    process = subprocess.Popen(
        [QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", f"unix:{path},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with connect(str(path), timeout=20) as qmp:  # races QEMU's start-up on purpose
            assert qmp.execute("query-status")["running"]
            qmp.execute("quit")
            with pytest.raises(ConnectionLost):
                qmp.wait_event("NEVER", timeout=5)
    finally:
        process.kill()
        process.wait(10)


def test_concurrent_fd_passing_gives_qemu_the_right_files(qemu: QemuProcess, qmp: Monitor, tmp_path: Path) -> None:
    failures: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            for i in range(10):
                path = tmp_path / f"image-{thread}-{i}"
                with open(path, "wb") as image:
                    qmp.execute("add-fd", {"opaque": str(path)}, fds=[image])
                    qmp.execute("query-status")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures
    fds = [fd for fdset in qmp.execute("query-fdsets") for fd in fdset["fds"]]
    assert len(fds) == 40
    for fd in fds:
        # What QEMU holds really is the file the opaque names.
        assert os.readlink(f"/proc/{qemu.pid}/fd/{fd['fd']}") == fd["opaque"]
