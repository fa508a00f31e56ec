from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vmctl import DiskSpec, Inventory, VMSpec
from vmctl.errors import StaleState
from vmctl.model.status import ExitStatus
from vmctl.vm.process import QemuProcess, start_time
from vmctl.vm.statefile import STATE_FILE, VMRecord, read_record, write_record


def make_record() -> VMRecord:
    spec = VMSpec(name="vm1", kernel="/k", disks=[DiskSpec(id="d0", path="/d0")])
    return VMRecord(pid=123, start_time=456, qmp_socket="/run/q.sock", spec=spec, inventory=Inventory(disks=spec.disks))


def test_state_round_trips_and_replaces_atomically(tmp_path: Path) -> None:
    state = make_record()
    write_record(tmp_path, state)
    assert read_record(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == [STATE_FILE]  # no temporary left behind
    changed = VMRecord(
        pid=state.pid, start_time=state.start_time, qmp_socket=state.qmp_socket, spec=state.spec, inventory=Inventory()
    )
    write_record(tmp_path, changed)
    assert read_record(tmp_path).inventory == Inventory()


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"format": 99}), json.dumps({"format": 1})])
def test_bad_state_files_are_stale(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / STATE_FILE).write_text(content)
    with pytest.raises(StaleState):
        read_record(tmp_path)


def test_process_start_wait_and_exit_status(tmp_path: Path) -> None:
    process = QemuProcess.start(
        [sys.executable, "-c", "import sys; print('hi'); sys.exit(3)"], log_path=tmp_path / "log"
    )
    try:
        assert process.wait(10) == ExitStatus(code=3, signal=None)
        assert (tmp_path / "log").read_text() == "hi\n"
        assert not process.send_signal(signal.SIGTERM)  # gone: nothing is signalled
    finally:
        process.close()


def test_adopt_checks_the_start_time() -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        started = start_time(sleeper.pid)
        with pytest.raises(StaleState, match="another process"):
            QemuProcess.adopt(sleeper.pid, started + 1)
        adopted = QemuProcess.adopt(sleeper.pid, started)
        assert not adopted.is_child
        assert adopted.wait(0.05) is None
        assert adopted.send_signal(signal.SIGKILL)
        sleeper.wait(10)
        assert adopted.wait(5) == ExitStatus(code=None, signal=None)
        adopted.close()
    finally:
        sleeper.kill()
        sleeper.wait()
    with pytest.raises(StaleState):
        QemuProcess.adopt(sleeper.pid, started)


def test_start_time_of_a_missing_process() -> None:
    with pytest.raises(StaleState):
        start_time(2**22 + 12345)
    assert start_time(os.getpid()) > 0


def test_the_lifecycle_only_moves_forward() -> None:
    from vmctl.vm.lifecycle import TRANSITIONS, Life

    assert TRANSITIONS[Life.DETACHED] == frozenset()
    for ended in (Life.EXITED, Life.CRASHED):
        assert TRANSITIONS[ended] == {Life.DETACHED}  # an ended VM can only be let go
    assert Life.RUNNING not in {s for targets in TRANSITIONS.values() for s in targets}
    assert TRANSITIONS[Life.STOPPING] == {Life.EXITED, Life.DETACHED}  # an asked-for exit is no crash
