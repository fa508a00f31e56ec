from __future__ import annotations

import pytest

from vmctl.errors import WaitTimeout
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeQEMU
from vmctl.vm.console import Console


def test_console_reads_and_waits_for_text(monitor: Monitor, fake: FakeQEMU) -> None:
    chunks = ["boot...\n", "", "VMCTL-GUEST-READY\n", "", "after\n", ""]

    def ringbuf_read(call: FakeCall) -> str:
        assert call.arguments["format"] == "utf8"
        return chunks.pop(0) if chunks else ""

    fake.on("ringbuf-read", ringbuf_read)
    console = Console(monitor, "vmctl-console")
    assert console.read() == "boot...\n"
    window = console.wait_for("READY", timeout=2)
    assert "VMCTL-GUEST-READY" in window
    mark = console.position
    with pytest.raises(WaitTimeout, match="READY"):
        console.wait_for("READY", timeout=0.2, since=mark)
    assert console.history.endswith("after\n")
