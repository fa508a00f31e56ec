"""Disk hotplug rollback on the fake: a failure at each step undoes exactly the steps before it."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import structlog

from vmctl.errors import CommandTimeout, HotplugError, InvalidArgument, OperationTimeout
from vmctl.model import DiskSpec
from vmctl.ops import disks as disk_ops
from vmctl.ops.deadline import Deadline
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeCommandError, FakeQEMU

log = structlog.get_logger("test")


class BlockState:
    """Just enough of QEMU's block and device state for the disk procedures."""

    def __init__(self, fake: FakeQEMU, fail: str | None = None) -> None:
        self.nodes: set[str] = set()
        self.devices: set[str] = set()
        self.fail = fail
        fake.on("blockdev-add", self.blockdev_add)
        fake.on("blockdev-del", self.blockdev_del)
        fake.on("device_add", self.device_add)
        fake.on("device_del", self.device_del)
        fake.on("qom-list", lambda call: [{"name": d, "type": "child<virtio-blk-pci>"} for d in self.devices])
        fake.on("query-named-block-nodes", lambda call: [{"node-name": n} for n in sorted(self.nodes)])
        self.fake = fake

    def blockdev_add(self, call: FakeCall) -> Any:
        kind = "protocol" if call.arguments["driver"] == "file" else "format"
        if self.fail == f"blockdev-add {kind}":
            raise FakeCommandError("GenericError", f"injected {kind} failure")
        self.nodes.add(call.arguments["node-name"])
        return {}

    def blockdev_del(self, call: FakeCall) -> Any:
        self.nodes.remove(call.arguments["node-name"])
        return {}

    def device_add(self, call: FakeCall) -> Any:
        if self.fail == "device_add":
            raise FakeCommandError("GenericError", "injected device failure")
        self.devices.add(call.arguments["id"])
        return {}

    def device_del(self, call: FakeCall) -> Any:
        self.devices.remove(call.arguments["id"])
        self.fake.emit_event("DEVICE_DELETED", {"path": f"/machine/peripheral/{call.arguments['id']}/virtio-backend"})
        self.fake.emit_event("DEVICE_DELETED", {"device": call.arguments["id"], "path": "/p"})
        return {}


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.qcow2"
    path.write_bytes(b"\0" * 4096)
    return path


def test_hotplug_runs_the_steps_in_order(monitor: Monitor, fake: FakeQEMU, image: Path) -> None:
    state = BlockState(fake)
    disk = disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert [c.command for c in fake.calls[1:]] == ["add-fd", "blockdev-add", "blockdev-add", "device_add"]
    file_args, format_args = (c.arguments for c in fake.calls_of("blockdev-add"))
    assert file_args["filename"] == f"/dev/fdset/{next(iter(fake.fdsets))}"
    assert file_args == disk.layer_nodes(0, file_args["filename"])[0]
    assert format_args == {
        "driver": "qcow2",
        "node-name": "d1-fmt",
        "file": "d1-file",
        "read-only": False,
        "cache": {"direct": False, "no-flush": False},
    }
    assert fake.calls_of("device_add")[0].arguments["drive"] == "d1-fmt"
    assert state.nodes == {"d1-file", "d1-fmt"} and state.devices == {"d1"}
    disk_ops.unplug_disk(monitor, log, disk_id="d1", timeout=5)
    assert state.nodes == set() and state.devices == set() and fake.fdsets == {}


@pytest.mark.parametrize(
    ("fail", "undone"),
    [
        ("blockdev-add protocol", ["remove-fd"]),
        ("blockdev-add format", ["blockdev-del", "remove-fd"]),
        ("device_add", ["blockdev-del", "blockdev-del", "remove-fd"]),
    ],
)
def test_a_failure_at_each_step_is_rolled_back(
    monitor: Monitor, fake: FakeQEMU, image: Path, fail: str, undone: list[str]
) -> None:
    state = BlockState(fake, fail=fail)
    with pytest.raises(HotplugError, match="injected") as info:
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert info.value.remaining == ()
    commands = [c.command for c in fake.calls[1:]]
    first_failed = commands.index("device_add" if fail == "device_add" else "blockdev-add") + (
        1 if fail == "blockdev-add format" else 0
    )
    # The undos look up what is there (by name) before they remove it.
    assert [c for c in commands[first_failed + 1 :] if not c.startswith("query-")] == undone
    assert state.nodes == set() and state.devices == set() and fake.fdsets == {}


def test_add_fd_failure_leaves_nothing(monitor: Monitor, fake: FakeQEMU, image: Path) -> None:
    BlockState(fake)
    fake.on("add-fd", error=("GenericError", "no fd"))
    with pytest.raises(HotplugError):
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert [c.command for c in fake.calls[1:]] == ["add-fd"]


def test_a_failing_undo_is_reported_as_remaining(monitor: Monitor, fake: FakeQEMU, image: Path) -> None:
    BlockState(fake, fail="device_add")
    fake.on("remove-fd", error=("GenericError", "busy"))
    with pytest.raises(HotplugError, match="still present: add-fd") as info:
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert info.value.remaining == ("add-fd",)


def test_our_fd_is_closed_whatever_happens(monitor: Monitor, fake: FakeQEMU, image: Path) -> None:
    BlockState(fake, fail="device_add")
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(HotplugError):
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    assert len(os.listdir("/proc/self/fd")) == before


def test_guest_that_never_releases_the_device(monitor: Monitor, fake: FakeQEMU, image: Path) -> None:
    state = BlockState(fake)
    disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image))
    fake.on("device_del", returns={})  # accepted, but the guest never ejects
    with pytest.raises(HotplugError, match="did not release") as info:
        disk_ops.unplug_disk(monitor, log, disk_id="d1", timeout=0.2)
    assert "device d1" in info.value.remaining
    assert state.nodes == {"d1-file", "d1-fmt"}  # nothing torn down under a live device
    fake.on("device_del", state.device_del)
    state.devices.discard("d1")  # the guest finally lets go
    disk_ops.unplug_disk(monitor, log, disk_id="d1", timeout=5)
    assert state.nodes == set() and fake.fdsets == {}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cache": "bogus"}, "cache"),
        ({"aio": "native"}, "O_DIRECT"),
        ({"bus": "ide"}, "bus"),
        ({"format": "vmdk"}, "format"),
        ({"id": "9bad"}, "id"),
    ],
)
def test_bad_input_is_refused_before_qemu_sees_anything(
    monitor: Monitor, fake: FakeQEMU, image: Path, kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"path": image, "id": "d1"}
    arguments.update(kwargs)
    with pytest.raises(InvalidArgument, match=message):
        disk_ops.hotplug_disk(monitor, log, DiskSpec(**arguments))
    assert [c.command for c in fake.calls] == ["qmp_capabilities"]


def test_hotplug_timeout_bounds_all_its_commands_so_a_slow_step_stops_it_before_device_add(
    monitor: Monitor, fake: FakeQEMU, image: Path
) -> None:
    BlockState(fake)
    fake.on("blockdev-add", delay=0.6)  # each under the timeout, both together over it
    with pytest.raises(HotplugError) as failed:
        disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image), timeout=1.0)
    assert isinstance(failed.value.__cause__, CommandTimeout | OperationTimeout)
    assert fake.calls_of("device_add") == []


def test_hotplug_whose_commands_fit_in_the_timeout_together_plugs_the_disk(
    monitor: Monitor, fake: FakeQEMU, image: Path
) -> None:
    state = BlockState(fake)
    fake.on("blockdev-add", delay=0.2)
    disk_ops.hotplug_disk(monitor, log, DiskSpec(id="d1", path=image), timeout=5.0)
    assert state.devices == {"d1"}


def test_a_deadline_that_has_passed_refuses_the_next_command_without_sending_it(
    monitor: Monitor, fake: FakeQEMU
) -> None:
    limit = Deadline.after(0.05)
    time.sleep(0.1)
    sent = len(fake.calls)
    with pytest.raises(OperationTimeout, match="query-status: not sent"):
        limit.bind(monitor).execute("query-status")
    assert len(fake.calls) == sent


def test_a_deadline_gives_a_command_only_the_time_left(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("query-status", returns={"status": "running", "running": True}, delay=2.0)
    with pytest.raises(CommandTimeout) as late:
        Deadline.after(0.3).bind(monitor).execute("query-status", timeout=10.0)
    assert late.value.timeout <= 0.3


def test_a_deadline_checks_its_timeout_before_anything_is_sent() -> None:
    with pytest.raises(InvalidArgument):
        Deadline.after(float("inf"))
