from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from vmctl import VMSpec
from vmctl.cli import main
from vmctl.cli.qmpshell import parse_input, run_one
from vmctl.errors import InvalidArgument
from vmctl.model import Inventory
from vmctl.qmp import Monitor
from vmctl.testing import FakeQEMU
from vmctl.vm.statefile import VMRecord, write_record


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    yield
    structlog.reset_defaults()  # main() configures logging, as an application does


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("query-status", ("query-status", {})),
        ('{"execute": "stop"}', ("stop", {})),
        ('{"execute": "device_del", "arguments": {"id": "d1"}}', ("device_del", {"id": "d1"})),
        ("device_del id=d1", ("device_del", {"id": "d1"})),
        ("balloon value=1073741824", ("balloon", {"value": 1073741824})),
        ("x flag=true name='a b'", ("x", {"flag": True, "name": "a b"})),
        ("blockdev-add driver=qcow2 file.driver=file file.filename=/a", (
            "blockdev-add", {"driver": "qcow2", "file": {"driver": "file", "filename": "/a"}})),
        ('x list=[1,2] \'obj={"a":1}\'', ("x", {"list": [1, 2], "obj": {"a": 1}})),
    ],
)  # fmt: skip
def test_shell_input_forms(line: str, expected: tuple[str, dict[str, object]]) -> None:
    assert parse_input(line) == expected


@pytest.mark.parametrize("line", ["", "{bad json", '{"arguments": {}}', "cmd novalue", "cmd a=1 a.b=2", "cmd 'open"])
def test_bad_shell_input(line: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_input(line)


def test_run_one_prints_results_and_errors(monitor: Monitor) -> None:
    out = io.StringIO()
    assert run_one(monitor, "query-status", {}, out) == 0
    assert json.loads(out.getvalue())["status"] == "running"
    out = io.StringIO()
    assert run_one(monitor, "nope", {}, out) == 1
    assert out.getvalue().startswith("error: CommandNotFound")


def test_one_shot_qmp_command(fake: FakeQEMU, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["qmp", fake.address, "query-status"]) == 0
    assert json.loads(capsys.readouterr().out)["running"] is True


def test_status_of_a_gone_vm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = VMSpec(name="gone", kernel="/k")
    write_record(
        tmp_path,
        VMRecord(pid=2**22 + 7, start_time=1, qmp_socket="/nowhere", spec=spec, inventory=Inventory()),
    )
    assert main(["status", str(tmp_path)]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["name"] == "gone" and report["alive"] is False


def test_status_without_state_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", str(tmp_path)]) == 1
    assert "StaleState" in capsys.readouterr().err
