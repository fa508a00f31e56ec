from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vmctl.errors import CommandTimeout
from vmctl.qmp import connect
from vmctl.qmp.redact import REDACTED, redact_arguments, redact_hmp
from vmctl.testing import FakeQEMU

SECRET = "hunter2-very-secret"


def test_commands_are_logged_with_id_duration_and_outcome(fake: FakeQEMU) -> None:
    fake.on("slow", lambda call: 1, delay=0.5)
    with capture_logs() as logs, connect(fake.address, timeout=5, name="vm1") as mon:
        mon.execute("query-status")
        with pytest.raises(CommandTimeout):
            mon.execute("slow", timeout=0.05)
    commands = [entry for entry in logs if entry["event"] == "qmp.command"]
    ok = next(e for e in commands if e["cmd"] == "query-status")
    assert ok["log_level"] == "debug" and ok["outcome"] == "ok" and ok["id"].startswith("vmctl-")
    assert ok["monitor"] == "vm1" and ok["ms"] >= 0
    timeout = next(e for e in commands if e["cmd"] == "slow")
    assert timeout["log_level"] == "warning" and timeout["outcome"] == "timeout"
    assert any(e["event"] == "qmp.connected" and e["log_level"] == "info" for e in logs)


def test_quiet_commands_and_events_stay_out_of_logs(fake: FakeQEMU) -> None:
    fake.on("ringbuf-read", returns="console text")
    with capture_logs() as logs, connect(fake.address, timeout=5) as mon:
        assert mon.execute("ringbuf-read", {"device": "serial0", "size": 100}) == "console text"
        with mon.events("STOP") as stop:  # subscribed before the event is sent
            fake.emit_event("RTC_CHANGE", {"offset": 1})
            fake.emit_event("STOP")
            stop.get(2)
    assert not any(e.get("cmd") == "ringbuf-read" for e in logs)
    assert [e["name"] for e in logs if e["event"] == "qmp.event"] == ["STOP"]


def test_secrets_never_reach_logs_or_the_transcript(fake: FakeQEMU, tmp_path: Path) -> None:
    fake.on("object-add", returns={})
    fake.on("set_password", error=("GenericError", "Could not set password"))
    fake.on("human-monitor-command", returns="")
    transcript = tmp_path / "qmp.jsonl"
    with capture_logs() as logs, connect(fake.address, timeout=5, transcript=transcript) as mon:
        mon.execute("object-add", {"qom-type": "secret", "id": "sec0", "data": SECRET, "format": "raw"})
        with pytest.raises(Exception, match="Could not set password"):
            mon.execute("set_password", {"protocol": "vnc", "password": SECRET})
        mon.execute("query-status")
        mon.human(f"set_password vnc {SECRET}")
    assert SECRET not in repr(logs)
    assert any(e.get("cmd") == "object-add" for e in logs)
    text = transcript.read_text()
    assert SECRET not in text
    records = [json.loads(line) for line in text.splitlines()]
    sent = [r for r in records if r["dir"] == "send"]
    assert [r["execute"] for r in sent] == ["object-add", "set_password", "query-status", "human-monitor-command"]
    assert sent[0]["arguments"]["data"] == REDACTED
    assert any(r.get("return") == {"status": "running", "singlestep": False, "running": True} for r in records)


def test_redaction_rules() -> None:
    args = {
        "driver": "luks",
        "key-secret": "sec0",
        "file": {"password": "x", "keyboard": "us"},
        "list": [{"passphrase": "y"}],
    }
    cleaned = redact_arguments("blockdev-add", args)
    assert cleaned == {
        "driver": "luks",
        "key-secret": REDACTED,
        "file": {"password": REDACTED, "keyboard": "us"},
        "list": [{"passphrase": REDACTED}],
    }
    assert args["file"] == {"password": "x", "keyboard": "us"}  # the input is untouched
    assert redact_hmp("object_add secret,id=s0,data=abc") == f"object_add secret,id=s0,data={REDACTED}"
    assert redact_hmp("set_password vnc abc") == f"set_password vnc {REDACTED}"
    assert redact_hmp("info status") == "info status"


def test_an_oversized_event_is_dropped_counted_and_logged_and_the_monitor_carries_on(fake: FakeQEMU) -> None:
    with capture_logs() as logs, connect(fake.address, timeout=5, max_message_size=4096) as mon:
        with mon.events("STOP") as stop:  # before the events are sent: wait_event waits for a later one
            fake.emit_event("BIG", {"x": "y" * 10_000})
            fake.emit_event("STOP")
            assert stop.get(5).name == "STOP"
        assert mon.oversized_events == 1
        assert mon.execute("query-status") is not None
    [dropped] = [e for e in logs if e["event"] == "qmp.oversized_message_dropped"]
    assert dropped["is_event"] is True and dropped["log_level"] == "warning"


LOGGING_SCRIPT = """
import sys
from vmctl.qmp import connect
from vmctl.testing import FakeQEMU

{setup}
with FakeQEMU() as fake, connect(fake.address, name="vm1", timeout=5) as monitor:
    monitor.execute("query-status")
"""


def run_script(setup: str) -> subprocess.CompletedProcess[str]:
    script = LOGGING_SCRIPT.format(setup=textwrap.dedent(setup))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)


def test_an_application_that_configures_no_logging_sees_nothing_of_vmctls_commands() -> None:
    done = run_script("")
    assert (done.stdout, done.stderr) == ("", "")


def test_stdlib_logging_configured_for_debug_gets_each_command_with_its_context() -> None:
    done = run_script("import logging; logging.basicConfig(level=logging.DEBUG, stream=sys.stdout)")
    [line] = [line for line in done.stdout.splitlines() if "qmp.command" in line]
    assert line.startswith("DEBUG:vmctl.qmp.protocol:qmp.command ")
    assert "cmd='query-status'" in line and "monitor='vm1'" in line and "id='vmctl-" in line


def test_structlog_configured_for_json_gets_each_command_as_a_json_object() -> None:
    done = run_script(
        """
        import structlog
        structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()])
        """
    )
    events = [json.loads(line) for line in done.stdout.splitlines()]
    [command] = [e for e in events if e["event"] == "qmp.command"]
    assert command["cmd"] == "query-status" and command["monitor"] == "vm1" and command["level"] == "debug"
