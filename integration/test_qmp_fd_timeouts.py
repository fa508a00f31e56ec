"""Timed-out fd-passing commands against a real QEMU (``-machine none``), frozen with SIGSTOP.

QEMU keeps the fds of its last read in one slot, so vmctl has one fd-passing command (``add-fd``,
``getfd``) at a time between its send and its reply. These tests check, by what QEMU really holds
(``query-fdsets`` and ``/proc/<qemu>/fd``), that a command whose caller gives up while it waits for
that slot is never sent, that the slot stays taken until QEMU answers (not until the caller gives
up), and that nothing is leaked in our own process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import pytest

from integration.conftest import QemuProcess
from vmctl.errors import CommandTimeout, GenericError
from vmctl.qmp import Monitor

SHORT = 0.3  # the timeout of the commands that must time out
REPLY = 10.0  # the timeout of the commands that must be answered
SETTLE = 5.0  # how long QEMU may take to answer the late replies once it runs again


def _process_state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0]


@contextlib.contextmanager
def _frozen(qemu: QemuProcess) -> Iterator[None]:
    """QEMU stopped with SIGSTOP for the block (and always continued afterwards)."""
    qemu.signal(signal.SIGSTOP)
    try:
        deadline = time.monotonic() + 5
        while _process_state(qemu.pid) != "T":
            if time.monotonic() > deadline:
                pytest.fail(f"QEMU (pid {qemu.pid}) did not stop after SIGSTOP")
            time.sleep(0.005)
        yield
    finally:
        qemu.signal(signal.SIGCONT)


def _settle(qmp: Monitor) -> int:
    """Let QEMU answer the commands that timed out; returns ``late_replies`` afterwards."""
    deadline = time.monotonic() + SETTLE
    while qmp.late_replies and time.monotonic() < deadline:
        # QEMU answers in order: this reply comes after every late one.
        assert qmp.execute("query-status", timeout=REPLY)["running"] is True
    return qmp.late_replies


def _fdsets(qmp: Monitor) -> dict[int, list[dict[str, Any]]]:
    """fdset-id -> the fds QEMU lists in it."""
    return {fdset["fdset-id"]: fdset["fds"] for fdset in qmp.execute("query-fdsets", timeout=REPLY)}


def _qemu_file(qemu: QemuProcess, fd: int) -> str:
    """What QEMU's fd number ``fd`` really is."""
    return os.readlink(f"/proc/{qemu.pid}/fd/{fd}")


def _qemu_files(qemu: QemuProcess) -> Counter[str]:
    """Everything QEMU has open (its /proc fd links, counted)."""
    links: Counter[str] = Counter()
    for fd in os.listdir(f"/proc/{qemu.pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            links[os.readlink(f"/proc/{qemu.pid}/fd/{fd}")] += 1
    return links


class _Scenario(NamedTuple):
    path1: str
    path2: str
    file3: BinaryIO
    path3: str
    late_while_frozen: int
    held_while_frozen: int
    fdsets_before: frozenset[int]


def _two_add_fds_time_out(qemu: QemuProcess, qmp: Monitor, tmp_path: Path) -> _Scenario:
    """While QEMU is frozen: add-fd "one" is sent but unanswered, add-fd "two" times out waiting
    for the fd slot. The caller closes file2 and file1, then opens file3 (which likely reuses
    file2's fd number), and QEMU is continued. file3 is returned open."""
    path1, path2, path3 = (os.path.realpath(tmp_path / name) for name in ("file1", "file2", "file3"))
    fdsets_before = frozenset(_fdsets(qmp))
    file1 = open(path1, "wb")  # noqa: SIM115 - closed mid-scenario, as a caller would
    file2 = open(path2, "wb")  # noqa: SIM115
    try:
        with _frozen(qemu):
            with pytest.raises(CommandTimeout):
                qmp.execute("add-fd", {"opaque": "one"}, fds=[file1], timeout=SHORT)
            with pytest.raises(CommandTimeout):
                qmp.execute("add-fd", {"opaque": "two"}, fds=[file2], timeout=SHORT)
            late_while_frozen, held_while_frozen = qmp.late_replies, qmp.fds_held
            file2.close()
            file1.close()
            file3 = open(path3, "wb")  # noqa: SIM115 - the caller's next, unrelated file
    finally:
        file2.close()
        file1.close()
    return _Scenario(path1, path2, file3, path3, late_while_frozen, held_while_frozen, fdsets_before)


def test_add_fd_timed_out_waiting_for_fd_slot_is_never_sent_and_qemu_holds_file1_for_one(
    qemu: QemuProcess, qmp: Monitor, tmp_path: Path
) -> None:
    scenario = _two_add_fds_time_out(qemu, qmp, tmp_path)
    with scenario.file3:
        # Only #1 went out (its reply will be discarded); #2's duplicate was closed when it was dropped.
        assert scenario.late_while_frozen == 1
        assert scenario.held_while_frozen == 1
        assert _settle(qmp) == 0
        fdsets = _fdsets(qmp)
        new = {fdset_id: fds for fdset_id, fds in fdsets.items() if fdset_id not in scenario.fdsets_before}
        assert [fd["opaque"] for fds in new.values() for fd in fds] == ["one"]
        assert not [fd for fds in fdsets.values() for fd in fds if fd.get("opaque") == "two"]
        [[fd_one]] = new.values()
        assert _qemu_file(qemu, fd_one["fd"]) == scenario.path1
        assert scenario.path2 not in _qemu_files(qemu)
        assert scenario.path3 not in _qemu_files(qemu)
        assert qmp.fds_held == 0


def test_fd_slot_is_freed_by_qemus_late_reply_so_add_fd_three_passes_file3_and_one_keeps_file1(
    qemu: QemuProcess, qmp: Monitor, tmp_path: Path
) -> None:
    scenario = _two_add_fds_time_out(qemu, qmp, tmp_path)
    with scenario.file3 as file3:
        # After its caller gave up, #1 still holds its duplicate (and the slot) until QEMU answers.
        assert scenario.held_while_frozen == 1
        added = qmp.execute("add-fd", {"opaque": "three"}, fds=[file3], timeout=REPLY)
    assert qmp.late_replies == 0
    fdsets = _fdsets(qmp)
    by_opaque = {fd["opaque"]: fd["fd"] for fds in fdsets.values() for fd in fds if "opaque" in fd}
    assert sorted(by_opaque) == ["one", "three"]
    assert fdsets[added["fdset-id"]] == [{"fd": added["fd"], "opaque": "three"}]
    assert _qemu_file(qemu, by_opaque["three"]) == scenario.path3
    assert _qemu_file(qemu, by_opaque["one"]) == scenario.path1
    assert qmp.fds_held == 0


def test_getfd_timed_out_waiting_for_fd_slot_is_never_sent_so_closefd_b_fails_and_closefd_a_succeeds(
    qemu: QemuProcess, qmp: Monitor, tmp_path: Path
) -> None:
    path_b = os.path.realpath(tmp_path / "file-b")
    qemu_files_before = _qemu_files(qemu)
    read_end, write_end = os.pipe()
    pipe_a = os.readlink(f"/proc/self/fd/{write_end}")  # "pipe:[inode]", the same in QEMU's /proc
    try:
        with open(path_b, "wb") as file_b, _frozen(qemu):
            with pytest.raises(CommandTimeout):
                qmp.execute("getfd", {"fdname": "a"}, fds=[write_end], timeout=SHORT)
            with pytest.raises(CommandTimeout):
                qmp.execute("getfd", {"fdname": "b"}, fds=[file_b], timeout=SHORT)
            assert qmp.late_replies == 1
    finally:
        os.close(read_end)
        os.close(write_end)
    with pytest.raises(GenericError, match="'b'"):
        qmp.execute("closefd", {"fdname": "b"}, timeout=REPLY)  # answered after the late getfd "a"
    assert qmp.late_replies == 0
    # QEMU got exactly one new fd, the pipe, and nothing of file B.
    assert _qemu_files(qemu) - qemu_files_before == Counter({pipe_a: 1})
    assert path_b not in _qemu_files(qemu)
    qmp.execute("closefd", {"fdname": "a"}, timeout=REPLY)
    assert pipe_a not in _qemu_files(qemu)
    assert qmp.fds_held == 0


def test_timed_out_add_fd_and_getfd_leave_no_fd_open_in_our_process(
    qemu: QemuProcess, qmp: Monitor, tmp_path: Path
) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    with open(tmp_path / "sent", "wb") as sent, open(tmp_path / "unsent", "wb") as unsent:
        read_end, write_end = os.pipe()
        try:
            with _frozen(qemu):
                with pytest.raises(CommandTimeout):  # sent, unanswered: a late reply
                    qmp.execute("add-fd", {"opaque": "sent"}, fds=[sent], timeout=SHORT)
                with pytest.raises(CommandTimeout):  # waits for the fd slot: dropped unsent
                    qmp.execute("add-fd", {"opaque": "unsent"}, fds=[unsent], timeout=SHORT)
                with pytest.raises(CommandTimeout):  # likewise
                    qmp.execute("getfd", {"fdname": "unsent"}, fds=[write_end], timeout=SHORT)
        finally:
            os.close(read_end)
            os.close(write_end)
        assert _settle(qmp) == 0
    assert qmp.fds_held == 0
    assert len(os.listdir("/proc/self/fd")) == fds_before
