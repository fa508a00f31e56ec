from __future__ import annotations

import json
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
