"""CPU, memory and balloon procedures on the fake: rollback, bounds and waiting."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from vmctl.errors import BalloonUnavailable, HotplugError, InvalidArgument, WaitTimeout
from vmctl.ops import balloon as balloon_ops
from vmctl.ops import cpus as cpu_ops
from vmctl.ops import memory as memory_ops
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeCommandError, FakeQEMU

log = structlog.get_logger("test")
MIB = 1024 * 1024


class CpuBoard:
    def __init__(self, fake: FakeQEMU, slots: int, fail_at: int | None = None) -> None:
        self.plugged: dict[tuple[int, int], str] = {(0, 0): "/machine/unattached/device[0]"}
        self.slots = slots
        self.fail_at = fail_at
        self.adds = 0
        self.fake = fake
        fake.on("query-hotpluggable-cpus", self.query)
        fake.on("device_add", self.add)
        fake.on("device_del", self.delete)
        fake.on("qom-list", self.peripherals)

    def peripherals(self, call: FakeCall) -> Any:
        paths = [p for p in self.plugged.values() if p.startswith("/machine/peripheral/")]
        return [{"name": p.rsplit("/", 1)[1], "type": "child<qemu64-x86_64-cpu>"} for p in paths]

    def query(self, call: FakeCall) -> Any:
        entries = []
        for socket in reversed(range(self.slots)):  # QEMU lists the highest slot first
            entry: dict[str, Any] = {"type": "qemu64-x86_64-cpu", "vcpus-count": 1,
                                     "props": {"socket-id": socket, "core-id": 0, "thread-id": 0}}  # fmt: skip
            if (socket, 0) in self.plugged:
                entry["qom-path"] = self.plugged[(socket, 0)]
            entries.append(entry)
        return entries

    def add(self, call: FakeCall) -> Any:
        self.adds += 1
        if self.adds == self.fail_at:
            raise FakeCommandError("GenericError", "injected CPU failure")
        self.plugged[(call.arguments["socket-id"], 0)] = f"/machine/peripheral/{call.arguments['id']}"
        return {}

    def delete(self, call: FakeCall) -> Any:
        for key, path in list(self.plugged.items()):
            if path.endswith("/" + call.arguments["id"]):
                del self.plugged[key]
        self.fake.emit_event("DEVICE_DELETED", {"device": call.arguments["id"], "path": "/p"})
        return {}


def test_cpus_fill_the_lowest_free_slots_and_unplug_newest_first(monitor: Monitor, fake: FakeQEMU) -> None:
    board = CpuBoard(fake, slots=4)
    assert cpu_ops.hotplug_cpus(monitor, log, 2) == ["vmctl-cpu-0-1-0-0-0", "vmctl-cpu-0-2-0-0-0"]
    assert sorted(board.plugged) == [(0, 0), (1, 0), (2, 0)]
    with pytest.raises(InvalidArgument, match="only 1 more"):
        cpu_ops.hotplug_cpus(monitor, log, 2)
    assert cpu_ops.unplug_cpus(monitor, log, 1) == ["vmctl-cpu-0-2-0-0-0"]
    with pytest.raises(InvalidArgument, match="only 1 hotplugged"):
        cpu_ops.unplug_cpus(monitor, log, 2)


def test_a_failed_cpu_hotplug_unplugs_the_ones_it_added(monitor: Monitor, fake: FakeQEMU) -> None:
    board = CpuBoard(fake, slots=4, fail_at=2)
    with pytest.raises(HotplugError, match="rolled back") as info:
        cpu_ops.hotplug_cpus(monitor, log, 3)
    assert info.value.remaining == ()
    assert sorted(board.plugged) == [(0, 0)]


@pytest.mark.parametrize("count", [0, -1, True, 1.5])
def test_bad_cpu_counts(monitor: Monitor, fake: FakeQEMU, count: Any) -> None:
    CpuBoard(fake, slots=2)
    with pytest.raises(InvalidArgument):
        cpu_ops.hotplug_cpus(monitor, log, count)


def test_memory_rollback_removes_the_backend(monitor: Monitor, fake: FakeQEMU) -> None:
    objects: set[str] = set()

    def object_add(call: FakeCall) -> Any:
        objects.add(call.arguments["id"])
        assert call.arguments["size"] == 256 * MIB
        return {}

    fake.on("object-add", object_add)

    def object_del(call: FakeCall) -> Any:
        objects.remove(call.arguments["id"])
        return {}

    fake.on("object-del", object_del)
    fake.on("qom-list", lambda call: [{"name": name, "type": "child<memory-backend-ram>"} for name in objects])
    fake.on("device_add", error=("GenericError", "not enough slots"))
    with pytest.raises(HotplugError, match="not enough slots"):
        memory_ops.hotplug_memory(monitor, log, memory_id="dimm1", size_mib=256)
    assert objects == set()
    assert [c.command for c in fake.calls[1:]] == ["object-add", "device_add", "qom-list", "object-del"]


class DimmGuest:
    """A guest that refuses the first ``refusals`` eject requests (ACPI _OST 0x82, busy), then lets go."""

    def __init__(self, fake: FakeQEMU, refusals: int) -> None:
        self.fake = fake
        self.refusals = refusals
        self.requests = 0
        self.present = {"dimm1"}
        fake.on("qom-list", lambda call: [{"name": name, "type": "child<pc-dimm>"} for name in self.present])
        fake.on("device_del", self.device_del)
        fake.on("object-del", lambda call: {})

    def device_del(self, call: FakeCall) -> Any:
        self.requests += 1
        device = call.arguments["id"]
        if self.requests <= self.refusals:
            info = {"device": device, "slot": "0", "slot-type": "DIMM", "source": 3, "status": 0x82}
            self.fake.emit_event("ACPI_DEVICE_OST", {"info": info})
        else:
            self.present.discard(device)
            self.fake.emit_event("DEVICE_DELETED", {"device": device, "path": f"/machine/peripheral/{device}"})
        return {}


def test_a_dimm_eject_the_guest_refused_is_asked_again_until_it_lets_go(monitor: Monitor, fake: FakeQEMU) -> None:
    guest = DimmGuest(fake, refusals=2)
    memory_ops.unplug_memory(monitor, log, memory_id="dimm1", timeout=5)
    assert guest.requests == 3
    assert guest.present == set()


def test_a_dimm_the_guest_keeps_refusing_is_a_hotplug_error_naming_its_refusals(
    monitor: Monitor, fake: FakeQEMU
) -> None:
    guest = DimmGuest(fake, refusals=100)
    with pytest.raises(HotplugError, match=r"refused to release memory dimm1 \(6 times; ACPI _OST status 0x82") as info:
        memory_ops.unplug_memory(monitor, log, memory_id="dimm1", timeout=5)
    assert guest.requests == memory_ops.EJECT_RETRIES + 1
    assert info.value.remaining == ("device dimm1", "object dimm1-ram")


class Balloon:
    def __init__(self, fake: FakeQEMU, *, guest_driver: bool = True, device: bool = True) -> None:
        self.actual = 512 * MIB
        self.fake = fake
        self.guest_driver = guest_driver
        self.device = device
        fake.on("query-balloon", self.query)
        fake.on("balloon", self.set)

    def query(self, call: FakeCall) -> Any:
        if not self.device:
            raise FakeCommandError("DeviceNotActive", "No balloon device has been activated")
        return {"actual": self.actual}

    def set(self, call: FakeCall) -> Any:
        self.query(call)
        target = call.arguments["value"]
        if self.guest_driver:
            for step in (1, 2, 3):  # the guest gets there in steps
                self.actual = self.actual + (target - self.actual) * step // 3
                self.fake.emit_event("BALLOON_CHANGE", {"actual": self.actual})
        return {}


def test_balloon_waits_for_the_guest_to_reach_the_target(monitor: Monitor, fake: FakeQEMU) -> None:
    Balloon(fake)
    assert balloon_ops.set_balloon(monitor, log, 256 * MIB, timeout=5) == 256 * MIB


def test_balloon_without_a_guest_driver_says_so(monitor: Monitor, fake: FakeQEMU) -> None:
    Balloon(fake, guest_driver=False)
    with pytest.raises(WaitTimeout, match="virtio_balloon driver"):
        balloon_ops.set_balloon(monitor, log, 256 * MIB, timeout=0.3)


def test_balloon_without_a_device(monitor: Monitor, fake: FakeQEMU) -> None:
    Balloon(fake, device=False)
    with pytest.raises(BalloonUnavailable):
        balloon_ops.balloon_bytes(monitor)
    with pytest.raises(BalloonUnavailable):
        balloon_ops.set_balloon(monitor, log, 256 * MIB)


@pytest.mark.parametrize("target", [0, 1024, -5, "1G"])
def test_balloon_targets_are_checked(monitor: Monitor, fake: FakeQEMU, target: Any) -> None:
    Balloon(fake)
    with pytest.raises(InvalidArgument):
        balloon_ops.set_balloon(monitor, log, target)
