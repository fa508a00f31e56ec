"""The fault injector on the fake, and the disk hotplug rolled back at every step under each fault."""

from __future__ import annotations

from pathlib import Path

import pytest
import structlog

from tests.test_disk_ops import BlockState
from vmctl.errors import CommandTimeout, ConnectionLost, GenericError, HotplugError, QMPError
from vmctl.model import DiskSpec
from vmctl.ops import disks as disk_ops
from vmctl.qmp import Monitor
from vmctl.testing import FakeQEMU
from vmctl.testing.faults import Fault, inject, record

log = structlog.get_logger("test")


def test_an_error_is_never_sent_a_timeout_is_sent_and_a_drop_ends_the_connection(
    monitor: Monitor, fake: FakeQEMU
) -> None:
    with inject(monitor, Fault.ERROR, at=2) as injection:
        monitor.execute("query-status")
        with pytest.raises(GenericError, match="injected"):
            monitor.execute("query-name")
    assert injection.failed == "query-name" and [c.command for c in fake.calls[1:]] == ["query-status"]
    with inject(monitor, Fault.TIMEOUT, at=1), pytest.raises(CommandTimeout):
        monitor.execute("query-status")
    assert [c.command for c in fake.calls[1:]] == ["query-status", "query-status"]  # QEMU ran it
    assert monitor.execute("query-status")["status"] == "running"  # and the monitor goes on
    with inject(monitor, Fault.DROP, at=1):
        with pytest.raises(ConnectionLost):
            monitor.execute("stop")
        with pytest.raises(ConnectionLost):
            monitor.execute("cont")
    assert "stop" in [c.command for c in fake.calls] and not monitor.is_connected


def test_record_lists_what_an_operation_sends(monitor: Monitor, fake: FakeQEMU, tmp_path: Path) -> None:
    BlockState(fake)
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"\0" * 4096)
    with record(monitor) as recording:
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert recording.names == ["add-fd", "blockdev-add", "blockdev-add", "device_add"]
    assert "execute" not in vars(monitor)  # the monitor's own method again afterwards


@pytest.mark.parametrize("fault", [Fault.ERROR, Fault.TIMEOUT])
@pytest.mark.parametrize("at", [1, 2, 3, 4])
def test_a_disk_hotplug_failed_at_any_step_leaves_the_fake_as_it_was(
    monitor: Monitor, fake: FakeQEMU, tmp_path: Path, fault: Fault, at: int
) -> None:
    state = BlockState(fake)
    image = tmp_path / "d.qcow2"
    image.write_bytes(b"\0" * 4096)
    with inject(monitor, fault, at=at), pytest.raises((HotplugError, QMPError)) as info:
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert getattr(info.value, "remaining", ()) == ()
    assert state.nodes == set() and state.devices == set() and fake.fdsets == {}
