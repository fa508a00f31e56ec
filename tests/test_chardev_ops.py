from __future__ import annotations

from typing import Any

import pytest
import structlog

from vmctl.errors import HotplugError, InvalidArgument
from vmctl.model.names import SERIAL_CONTROLLER
from vmctl.ops import chardevs
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeQEMU

log = structlog.get_logger("test")


def test_port_failure_removes_the_chardev(monitor: Monitor, fake: FakeQEMU) -> None:
    added: set[str] = set()

    def chardev_add(call: FakeCall) -> Any:
        assert call.arguments["backend"] == {"type": "ringbuf", "data": {"size": 1024}}
        added.add(call.arguments["id"])
        return {}

    def chardev_remove(call: FakeCall) -> Any:
        added.remove(call.arguments["id"])
        return {}

    fake.on("chardev-add", chardev_add)
    fake.on("chardev-remove", chardev_remove)
    fake.on("query-chardev", lambda call: [{"label": label, "filename": "ringbuf"} for label in added])
    fake.on("qom-list", returns=[{"name": SERIAL_CONTROLLER, "type": "child<virtio-serial-pci>"}])
    fake.on("device_add", error=("GenericError", "port name taken"))
    with pytest.raises(HotplugError, match="port name taken"):
        chardevs.hotplug_chardev(monitor, log, chardev_id="c0", kind="ringbuf", size=1024, port_name="p")
    assert added == set()
    port = fake.calls_of("device_add")[0].arguments
    assert port["bus"] == "vmctl-vserial.0" and port["chardev"] == "c0" and port["name"] == "p"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "socket"}, "needs a path"),
        ({"kind": "socket", "path": "/" + "x" * 120}, "too long"),
        ({"kind": "ringbuf", "size": 1000}, "power of two"),
        ({"kind": "pty"}, "kind"),
        ({"kind": "ringbuf", "port_name": "bad name"}, "port name"),
        ({"kind": "ringbuf", "chardev_id": "0c"}, "id"),
    ],
)
def test_bad_chardevs_are_refused(monitor: Monitor, fake: FakeQEMU, kwargs: dict[str, Any], message: str) -> None:
    arguments: dict[str, Any] = {"chardev_id": "c0"}
    arguments.update(kwargs)
    with pytest.raises(InvalidArgument, match=message):
        chardevs.hotplug_chardev(monitor, log, **arguments)
    assert [c.command for c in fake.calls] == ["qmp_capabilities"]
