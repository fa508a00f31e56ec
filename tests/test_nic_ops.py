"""NIC hotplug rollback on the fake (opening a real tap needs root, as creating taps does)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import structlog

from vmctl.errors import HotplugError, InvalidArgument
from vmctl.model import NicSpec
from vmctl.ops import nics as nic_ops
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeCommandError, FakeQEMU

log = structlog.get_logger("test")
needs_root = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="taps need root")


class NetState:
    def __init__(self, fake: FakeQEMU, fail: str | None = None) -> None:
        self.netdevs: set[str] = set()
        self.fail = fail
        fake.on("netdev_add", self.netdev_add)
        fake.on("netdev_del", self.netdev_del)
        fake.on("device_add", self.device_add)

    def netdev_add(self, call: FakeCall) -> Any:
        if self.fail == "netdev_add":
            raise FakeCommandError("GenericError", "injected netdev failure")
        self.netdevs.add(call.arguments["id"])
        return {}

    def netdev_del(self, call: FakeCall) -> Any:
        self.netdevs.remove(call.arguments["id"])
        return {}

    def device_add(self, call: FakeCall) -> Any:
        if self.fail == "device_add":
            raise FakeCommandError("GenericError", "injected device failure")
        return {}


@needs_root
def test_nic_hotplug_steps_and_multiqueue(monitor: Monitor, fake: FakeQEMU) -> None:
    state = NetState(fake)
    nic = nic_ops.hotplug_nic(monitor, log, NicSpec(id="net1", queues=2, mac="52:54:00:aa:bb:cc"))
    assert [c.command for c in fake.calls[1:]] == ["getfd", "getfd", "netdev_add", "device_add"]
    assert fake.calls_of("netdev_add")[0].arguments == {"type": "tap", "id": "net1-net", "fds": "net1-tap0:net1-tap1"}
    device = fake.calls_of("device_add")[0].arguments
    assert device["mq"] is True and device["vectors"] == 6 and device["mac"] == "52:54:00:aa:bb:cc"
    assert nic.tap is not None and nic.tap.startswith("tap") and state.netdevs == {"net1-net"}
    assert device == nic.device_properties()  # the same rendering as on the command line
    assert set(fake.named_fds) == {"net1-tap0", "net1-tap1"}


@needs_root
@pytest.mark.parametrize(
    ("fail", "undo"),
    [("netdev_add", ["closefd"]), ("device_add", ["netdev_del", "closefd"])],
)
def test_nic_failures_are_rolled_back(monitor: Monitor, fake: FakeQEMU, fail: str, undo: list[str]) -> None:
    state = NetState(fake, fail=fail)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(HotplugError, match="injected"):
        nic_ops.hotplug_nic(monitor, log, NicSpec(id="net1"))
    commands = [c.command for c in fake.calls[1:]]
    assert commands[commands.index(fail) + 1 :] == undo
    assert state.netdevs == set() and fake.named_fds == {}
    assert len(os.listdir("/proc/self/fd")) == before  # our tap fd is closed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"queues": 0}, "queues"), ({"queues": 2, "model": "e1000"}, "multiqueue"), ({"mac": "nope"}, "MAC")],
)
def test_bad_nic_input_is_refused_by_its_value_before_anything_is_sent(
    monitor: Monitor, fake: FakeQEMU, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        nic_ops.hotplug_nic(monitor, log, NicSpec.of(id="net1", **kwargs))
    assert [c.command for c in fake.calls] == ["qmp_capabilities"]
