"""The fault matrix on the fake: every step of every device operation, failed each way QEMU fails it.

``integration/test_faults.py`` runs this on a real guest; here it runs at the ops layer, on
FakeQEMU with a model of QEMU's state (``tests/fake_state.py``), in milliseconds a case. For each
operation, each fault (``ERROR``: QEMU did nothing; ``TIMEOUT``: it did it, the reply came too
late; ``DROP``: it did it, then the connection broke) and each k from 1 to the number of commands
a clean run sends, the k-th command fails. Then:

- a hotplug that failed leaves QEMU, the taps, the files and this process's fds as they were
  (``remaining`` empty), except after a drop, when nothing could be undone: then what is left
  is exactly what ``HotplugError.remaining`` names;
- an operation that survived its fault (a timed-out step that had done its work) leaves all of
  it as a clean run does;
- an unplug that failed is finished by a retry (on a new connection after a drop).

Each (operation, fault, k) is its own test; ``test_a_clean_run_sends_the_commands_its_matrix_fails``
keeps the matrices in step with what the operations send.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import pytest
import structlog

from tests.fake_state import PRIMARY, FakeTaps, QemuModel, State, diff, files, open_files
from vmctl.errors import QMPError, VmctlError
from vmctl.model import Chardev, DiskBus, DiskSpec, NicSpec, Throttle
from vmctl.model.names import fdset_tag
from vmctl.ops import chains as chain_ops
from vmctl.ops import chardevs as chardev_ops
from vmctl.ops import cpus as cpu_ops
from vmctl.ops import disks as disk_ops
from vmctl.ops import memory as memory_ops
from vmctl.ops import nics as nic_ops
from vmctl.qmp import Monitor, connect
from vmctl.testing import FakeQEMU
from vmctl.testing.faults import Fault, inject, record

LOG = structlog.get_logger("test")
FAULTS = (Fault.ERROR, Fault.TIMEOUT, Fault.DROP)
#: The operations' own timeout (waits for the guest): the model's guest answers in milliseconds.
OP_TIMEOUT = 2.0


def _stub_image(
    path: Path,
    size: int,
    *,
    fmt: str = "qcow2",
    backing: str | None = None,
    backing_fmt: str = "",
    encryption: object = None,
) -> None:
    """``chains.create_image`` without qemu-img: a file whose "header" the model reads."""
    path.write_text(f"stub {fmt} size={size} backing={backing} backing_fmt={backing_fmt}\n")


class World:
    """A VM on the fake: the model, its monitor, stand-in taps and a directory for its files."""

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.dir = root.resolve()
        self.taps = FakeTaps()
        self.fake = FakeQEMU().serve()
        self.model = QemuModel(self.fake)
        self.monitor: Monitor = connect(self.fake.address, name="fake", timeout=5)
        self._patches = pytest.MonkeyPatch()
        self._patches.setattr(nic_ops, "open_tap", self.taps.open_tap)  # no real taps beside the real suite
        self._patches.setattr(chain_ops, "create_image", _stub_image)
        self._patches.setattr(disk_ops, "NODE_RELEASE_TIMEOUT", 0.3)  # a node that stays in use fails fast

    def __enter__(self) -> World:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._patches.undo()
        self.monitor.close()
        self.model.close()
        self.fake.close()
        self.taps.close()

    def reconnect(self) -> None:
        """A new connection if the last one was dropped (QEMU keeps its state across them)."""
        if not self.monitor.is_connected:
            self.monitor.close()
            self.monitor = connect(self.fake.address, name="fake", timeout=5)

    def settle(self) -> None:
        self.model.settle()

    def state(self) -> State:
        state = self.model.state()
        state["taps"] = self.taps.alive()
        state["files"] = files(self.dir)
        state["open_files"] = open_files(self.dir)
        return state

    def image(self, name: str) -> Path:
        path = self.dir / name
        if not path.exists():
            path.write_bytes(b"\0" * 4096)
        return path


Step = Callable[[World], object]


def _nothing(world: World) -> None:
    pass


@attrs.frozen(kw_only=True)
class Op:
    """A device operation as its matrices run it."""

    name: str
    plug: Step
    plug_commands: tuple[str, ...]
    #: What each step that ``HotplugError.remaining`` may name leaves in QEMU: (category, name).
    steps: Mapping[str, tuple[str, str]]
    #: The file a step makes in the VM's directory, which stays while what it made does.
    step_files: Mapping[str, str] = attrs.field(factory=dict)
    unplug: Step | None = None
    unplug_commands: tuple[str, ...] = ()
    prepare: Step = _nothing  # run before the operation, without faults
    #: What a plug and its unplug leave on purpose (a controller stays for the next device).
    residue: Mapping[str, tuple[str, ...]] = attrs.field(factory=dict)


# -- the operations ------------------------------------------------------------------------

DISKS: dict[DiskBus, tuple[str, str, dict[str, Any]]] = {
    "virtio-blk": ("fd1", "a.qcow2", {"throttle": Throttle(iops=100)}),
    "scsi": ("fs1", "b.qcow2", {"bus": "scsi", "cache": "none"}),
}
UNPLUG_DISK = (
    "qom-list", "device_del",
    "query-named-block-nodes", "blockdev-del", "blockdev-del",  # the protocol node is in use at first
    "query-named-block-nodes", "blockdev-del",
    "query-named-block-nodes", "query-fdsets", "remove-fd",
)  # fmt: skip


def _disk_op(bus: DiskBus) -> Op:
    disk_id, image, options = DISKS[bus]

    def spec(world: World) -> DiskSpec:
        return DiskSpec(id=disk_id, path=world.dir / image, **options)

    steps = {
        "add-fd": ("fdsets", fdset_tag(disk_id)),
        f"blockdev-add {disk_id}-file": ("nodes", f"{disk_id}-file"),
        f"blockdev-add {disk_id}-fmt": ("nodes", f"{disk_id}-fmt"),
        "device_add": ("devices", disk_id),
    }
    if bus == "scsi":
        steps["virtio-scsi-pci controller"] = ("devices", "vmctl-scsi")
        plug_commands: tuple[str, ...] = (
            "add-fd",
            "blockdev-add",
            "blockdev-add",
            "qom-list",
            "device_add",
            "device_add",
        )
    else:
        plug_commands = ("add-fd", "blockdev-add", "blockdev-add", "device_add", "block_set_io_throttle")
    return Op(
        name="virtio" if bus == "virtio-blk" else bus,
        prepare=lambda world: world.image(image),
        plug=lambda world: disk_ops.hotplug_disk(world.monitor, LOG, spec(world), timeout=OP_TIMEOUT),
        plug_commands=plug_commands,
        steps=steps,
        unplug=lambda world: disk_ops.unplug_disk(world.monitor, LOG, disk_id=disk_id, timeout=OP_TIMEOUT),
        unplug_commands=UNPLUG_DISK,
        residue={"devices": ("vmctl-scsi",)} if bus == "scsi" else {},
    )


DISK_OPS = [_disk_op("virtio-blk"), _disk_op("scsi")]

NIC = Op(
    name="nic",
    plug=lambda world: nic_ops.hotplug_nic(
        world.monitor,
        LOG,
        NicSpec(id="fn1", tap="vmctl-fn1", mac="52:54:00:fa:17:01", queues=2),
        timeout=OP_TIMEOUT,
    ),
    plug_commands=("getfd", "getfd", "netdev_add", "device_add"),
    steps={
        # A getfd's fd stays in QEMU: in the monitor's named fds, or in the netdev that took it.
        "getfd fn1-tap0": ("qemu_fds", "fn1-tap0"),
        "getfd fn1-tap1": ("qemu_fds", "fn1-tap1"),
        "netdev_add": ("netdevs", "fn1-net"),
        "device_add": ("devices", "fn1"),
    },
    unplug=lambda world: nic_ops.unplug_nic(world.monitor, LOG, nic_id="fn1", timeout=OP_TIMEOUT),
    unplug_commands=("qom-list", "device_del", "netdev_del"),
)


def _chardev(world: World) -> Chardev:
    return Chardev(id="fc1", kind="socket", path=str(world.dir / "c.sock"), port_name="org.vmctl.faults")


CHARDEV = Op(
    name="chardev",
    plug=lambda world: chardev_ops.hotplug_chardev(
        world.monitor,
        LOG,
        chardev_id="fc1",
        kind="socket",
        path=world.dir / "c.sock",
        port_name="org.vmctl.faults",
        timeout=OP_TIMEOUT,
    ),
    plug_commands=("chardev-add", "qom-list", "device_add", "device_add"),
    steps={
        "chardev-add": ("chardevs", "fc1"),
        "virtio-serial-pci controller": ("devices", "vmctl-vserial"),
        "virtserialport": ("devices", "fc1-port"),
    },
    unplug=lambda world: chardev_ops.unplug_chardev(world.monitor, LOG, chardev=_chardev(world), timeout=OP_TIMEOUT),
    unplug_commands=("qom-list", "device_del", "query-chardev", "chardev-remove"),
    step_files={"chardev-add": "c.sock"},  # the socket QEMU listens on
    residue={"devices": ("vmctl-vserial",)},
)

MEMORY = Op(
    name="dimm",
    plug=lambda world: memory_ops.hotplug_memory(world.monitor, LOG, memory_id="fm1", size_mib=128, timeout=OP_TIMEOUT),
    plug_commands=("object-add", "device_add", "query-memory-devices"),
    steps={"object-add": ("objects", "fm1-ram"), "device_add": ("devices", "fm1")},
    unplug=lambda world: memory_ops.unplug_memory(world.monitor, LOG, memory_id="fm1", timeout=OP_TIMEOUT),
    unplug_commands=("qom-list", "device_del", "qom-list", "object-del"),
)


def _unplug_cpus(world: World) -> None:
    """Unplug the CPUs still plugged (the call takes a count: a retry asks for those left)."""
    left = len(world.model.cpus_plugged())
    if left:
        cpu_ops.unplug_cpus(world.monitor, LOG, left, timeout=OP_TIMEOUT)


CPUS = Op(
    name="cpus",
    plug=lambda world: cpu_ops.hotplug_cpus(world.monitor, LOG, 2, timeout=OP_TIMEOUT),
    plug_commands=("query-hotpluggable-cpus", "device_add", "device_add"),
    steps={cpu: ("devices", cpu) for cpu in ("vmctl-cpu-0-1-0-0-0", "vmctl-cpu-0-2-0-0-0")},
    unplug=_unplug_cpus,
    unplug_commands=("query-hotpluggable-cpus", "qom-list", "device_del", "qom-list", "device_del"),
)


def _snapshot_op(bus: DiskBus) -> Op:
    disk_id = "sd1" if bus == "virtio-blk" else "ss1"

    def disk(world: World) -> DiskSpec:
        return DiskSpec(id=disk_id, path=world.dir / "base.qcow2", bus=bus)

    def prepare(world: World) -> None:
        (world.dir / "overlays").mkdir()
        world.image("base.qcow2")
        disk_ops.hotplug_disk(world.monitor, LOG, disk(world), timeout=OP_TIMEOUT)

    def snapshot(world: World) -> None:
        overlays = {disk_id: world.dir / "overlays" / "s1.qcow2"}
        chain_ops.snapshot_disks(world.monitor, LOG, [disk(world)], overlays, bitmap="since-s1")

    return Op(
        name="virtio" if bus == "virtio-blk" else bus,
        prepare=prepare,
        plug=snapshot,
        plug_commands=("query-named-block-nodes", "add-fd", "blockdev-add", "blockdev-add", "transaction"),
        steps={
            "add-fd layer 1": ("fdsets", fdset_tag(disk_id, 1)),
            f"blockdev-add {disk_id}-o1-file": ("nodes", f"{disk_id}-o1-file"),
            f"blockdev-add {disk_id}-o1-fmt": ("nodes", f"{disk_id}-o1-fmt"),
        },
    )


SNAPSHOT_OPS = [_snapshot_op("virtio-blk"), _snapshot_op("scsi")]
LIMITS = Throttle(iops=50, bps=1 << 20)


def _throttle_op(bus: DiskBus) -> Op:
    disk_id = "ft1" if bus == "virtio-blk" else "ft2"

    def prepare(world: World) -> None:
        disk = DiskSpec(id=disk_id, path=world.image("t.qcow2"), bus=bus)
        disk_ops.hotplug_disk(world.monitor, LOG, disk, timeout=OP_TIMEOUT)

    def setter(throttle: Throttle) -> Step:
        return lambda world: disk_ops.set_throttle(world.monitor, disk_id=disk_id, throttle=throttle, bus=bus)

    return Op(
        name="virtio" if bus == "virtio-blk" else bus,
        prepare=prepare,
        plug=setter(LIMITS),
        plug_commands=("block_set_io_throttle",),
        steps={},
        unplug=setter(Throttle()),
        unplug_commands=("block_set_io_throttle",),
    )


THROTTLE_OPS = [_throttle_op("virtio-blk"), _throttle_op("scsi")]
ALL_OPS = {
    **{f"disk-{op.name}": op for op in DISK_OPS},
    "nic": NIC,
    "chardev": CHARDEV,
    "dimm": MEMORY,
    "cpus": CPUS,
    **{f"snapshot-{op.name}": op for op in SNAPSHOT_OPS},
    **{f"throttle-{op.name}": op for op in THROTTLE_OPS},
}


# -- the states a clean run reaches --------------------------------------------------------


class References:
    """The state after a clean plug, and after a clean plug and unplug, of each operation (once)."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self._factory = factory
        self._states: dict[tuple[int, str], State] = {}

    def _run(self, op: Op, *, unplug: bool) -> State:
        key = (id(op), "unplugged" if unplug else "plugged")
        if key not in self._states:
            with World(self._factory.mktemp(f"ref-{op.name}")) as world:
                op.prepare(world)
                op.plug(world)
                world.settle()
                if unplug:
                    assert op.unplug is not None
                    op.unplug(world)
                    world.settle()
                self._states[key] = world.state()
        return self._states[key]

    def plugged(self, op: Op) -> State:
        return self._run(op, unplug=False)

    def unplugged(self, op: Op) -> State:
        return self._run(op, unplug=True)


@pytest.fixture(scope="module")
def refs(tmp_path_factory: pytest.TempPathFactory) -> References:
    return References(tmp_path_factory)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    with World(tmp_path / "vm") as vm:
        yield vm


# -- the cells -----------------------------------------------------------------------------


def cells(ops: list[Op], unplug: bool = False) -> list[Any]:
    """One pytest param per (op, fault, k), for k over the commands a clean run sends."""
    params = []
    for op in ops:
        commands = op.unplug_commands if unplug else op.plug_commands
        for fault in FAULTS:
            for at in range(1, len(commands) + 1):
                cell_id = f"{op.name}-{fault.value}-{at}" if len(ops) > 1 else f"{fault.value}-{at}"
                params.append(pytest.param(op, fault, at, id=cell_id))
    return params


#: What a dropped connection may leave, each nameable: QEMU's parts, and the files of the VM's directory.
LEFTOVERS = (*PRIMARY, "files")


def named(world: World, op: Op, remaining: tuple[str, ...]) -> dict[str, tuple[Any, ...]]:
    """What ``remaining`` says is left, by category of the state: a step's name (what it made,
    and the file that goes with that), or ``file <path>`` (a file kept)."""
    left: dict[str, list[str]] = {}
    for step in remaining:
        if step.startswith("file "):
            left.setdefault("files", []).append(str(Path(step.removeprefix("file ")).relative_to(world.dir)))
            continue
        assert step in op.steps, f"{step!r} is not a step of {op.name} ({remaining})"
        category, item = op.steps[step]
        left.setdefault(category, []).append(item)
        if step in op.step_files:
            left.setdefault("files", []).append(op.step_files[step])
    return {category: tuple(sorted(items)) for category, items in left.items()}


def check_plug_cell(world: World, refs: References, op: Op, fault: Fault, at: int) -> None:
    plugged = refs.plugged(op)
    op.prepare(world)
    before = world.state()
    with inject(world.monitor, fault, at=at) as injection:
        try:
            op.plug(world)
            failed: VmctlError | None = None
        except VmctlError as exc:
            failed = exc
    world.settle()
    after = world.state()
    where = f"{fault.value} at {at} ({injection.failed}): {failed!r}"
    assert injection.failed == op.plug_commands[at - 1], where
    if failed is None:  # it survived the fault: it did its work
        assert after == plugged, where
    elif fault is Fault.DROP:  # nothing could be undone: the error names what is left
        assert diff(before, after, LEFTOVERS) == named(world, op, getattr(failed, "remaining", ())), where
    else:
        assert getattr(failed, "remaining", ()) == (), where
        assert after == before, where


def check_unplug_cell(world: World, refs: References, op: Op, fault: Fault, at: int) -> None:
    assert op.unplug is not None
    unplugged = refs.unplugged(op)
    op.prepare(world)
    op.plug(world)
    world.settle()
    with inject(world.monitor, fault, at=at) as injection:
        try:
            op.unplug(world)
            failed: VmctlError | None = None
        except VmctlError as exc:
            failed = exc
    world.settle()
    where = f"{fault.value} at {at} ({injection.failed}): {failed!r}"
    assert injection.failed == op.unplug_commands[at - 1], where
    if failed is not None:
        world.reconnect()
        op.unplug(world)  # the retry finishes the job
        world.settle()
    assert world.state() == unplugged, where


# -- the matrices --------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ALL_OPS))
def test_a_clean_run_sends_the_commands_its_matrix_fails_and_an_unplug_undoes_the_plug(
    world: World, refs: References, name: str
) -> None:
    op = ALL_OPS[name]
    op.prepare(world)
    before = world.state()
    with record(world.monitor) as plugging:
        op.plug(world)
    world.settle()
    assert tuple(plugging.names) == op.plug_commands
    assert world.state() == refs.plugged(op) != before
    if op.unplug is not None:
        with record(world.monitor) as unplugging:
            op.unplug(world)
        world.settle()
        assert tuple(unplugging.names) == op.unplug_commands
        assert diff(before, world.state(), tuple(before)) == op.residue


#: The device operations whose plug and unplug the matrix fails, step by step.
DEVICE_OPS = [*DISK_OPS, NIC, CHARDEV, MEMORY, CPUS]


@pytest.mark.parametrize(("op", "fault", "at"), cells(DEVICE_OPS))
def test_a_hotplug_leaves_nothing_but_what_its_error_names_under_fault(
    world: World, refs: References, op: Op, fault: Fault, at: int
) -> None:
    check_plug_cell(world, refs, op, fault, at)


@pytest.mark.parametrize(("op", "fault", "at"), cells(DEVICE_OPS, unplug=True))
def test_an_unplug_under_fault_is_finished_by_a_retry(
    world: World, refs: References, op: Op, fault: Fault, at: int
) -> None:
    check_unplug_cell(world, refs, op, fault, at)


@pytest.mark.parametrize(
    ("op", "fault", "at"),
    cells(SNAPSHOT_OPS),
)
def test_snapshot_leaves_nothing_but_what_its_error_names_or_switches_the_disk_under_fault(
    world: World, refs: References, op: Op, fault: Fault, at: int
) -> None:
    check_plug_cell(world, refs, op, fault, at)


@pytest.mark.parametrize("setting", ["set", "clear"])
@pytest.mark.parametrize(("op", "fault", "at"), cells(THROTTLE_OPS))
def test_disk_throttle_under_fault_is_unchanged_if_qemu_never_got_it_else_applied_and_a_retry_applies_it(
    world: World, refs: References, op: Op, fault: Fault, at: int, setting: str
) -> None:
    # No undo: the limits are one idempotent command; QEMU has the old ones or the new ones.
    assert op.unplug is not None
    change, target = (op.plug, refs.plugged(op)) if setting == "set" else (op.unplug, refs.unplugged(op))
    op.prepare(world)
    if setting == "clear":
        op.plug(world)
    before = world.state()
    with inject(world.monitor, fault, at=at) as injection:
        try:
            change(world)
            failed: QMPError | None = None
        except QMPError as exc:
            failed = exc
    where = f"{fault.value} at {at} ({injection.failed}): {failed!r}"
    assert injection.failed == "block_set_io_throttle", where
    assert world.state() == (before if failed is not None and fault is Fault.ERROR else target), where
    world.reconnect()
    change(world)
    assert world.state() == target, where


def test_the_model_refuses_what_qemu_refuses(world: World) -> None:
    """The refusals the rollbacks' order rests on (a check of the model, not of vmctl)."""
    CHARDEV.plug(world)
    MEMORY.plug(world)
    world.settle()
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("chardev-remove", {"id": "fc1"}, "Chardev 'fc1' is busy"),
        ("object-del", {"id": "fm1-ram"}, "object 'fm1-ram' is in use"),
        ("blockdev-del", {"node-name": "vda-fmt"}, "Node vda-fmt is in use"),
        ("blockdev-del", {"node-name": "vda-file"}, "Block device vda-file is in use"),
        ("device_add", {"driver": "scsi-hd", "id": "x", "drive": "vda-fmt", "bus": "vmctl-scsi.0"}, "not found"),
        ("device_add", {"driver": "virtio-blk-pci", "id": "x", "drive": "vda-fmt"}, "it's in use"),
        ("block_set_io_throttle", {"id": "vda", "iops": 5}, "does not have a block device backend"),
    ]
    for command, arguments, message in refused:
        with pytest.raises(QMPError, match=message):
            world.monitor.execute(command, arguments)
    with world.monitor.events("DEVICE_DELETED") as deleted:
        world.monitor.execute("device_del", {"id": "vda"})
        with pytest.raises(QMPError, match="already in the process of unplug"):
            world.monitor.execute("device_del", {"id": "vda"})
        assert "vda" in world.model.state()["devices"]  # the guest has not let go yet
        assert [deleted.get(1).data for _ in range(2)] == [
            {"path": "/machine/peripheral/vda/virtio-backend"},
            {"device": "vda", "path": "/machine/peripheral/vda"},
        ]
    world.monitor.execute("blockdev-del", {"node-name": "vda-fmt"})  # free once the device is gone


def test_the_model_guest_refuses_to_eject_a_dimm_it_is_still_onlining(world: World) -> None:
    monitor = world.monitor
    monitor.execute("object-add", {"qom-type": "memory-backend-ram", "id": "m-ram", "size": 128 << 20})
    with monitor.events("ACPI_DEVICE_OST", "DEVICE_DELETED") as events:
        monitor.execute("device_add", {"driver": "pc-dimm", "id": "m", "memdev": "m-ram"})
        monitor.execute("device_del", {"id": "m"})  # before the guest reported the insertion
        world.settle()
        sources = [events.get(1).data["info"]["source"] for _ in range(2)]
    assert sorted(sources) == [1, 3] and "m" in world.state()["devices"]
    with monitor.events("DEVICE_DELETED") as deleted:
        monitor.execute("device_del", {"id": "m"})  # onlined now: the guest lets it go
        assert deleted.get(1).data["device"] == "m"
