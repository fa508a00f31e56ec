"""A model of the QEMU state the device operations change, served through FakeQEMU's handlers.

It keeps what ``vmctl.ops`` creates and removes (block nodes and their graph, devices and their
buses, chardevs, netdevs and the tap fds they hold, memory backends, DIMM slots, CPU slots, I/O
limits, dirty bitmaps) and answers the commands the procedures send the way QEMU 7.2 does, for
a ``pc`` machine (hotpluggable ``pci.0``, ACPI hotplug):

- QEMU refuses what it refuses: ``blockdev-del`` of a node a device or another node uses,
  ``object-del`` of a memory backend a DIMM uses, ``chardev-remove`` of a chardev a port uses,
  a ``device_add`` whose drive, netdev, chardev or memdev is missing or taken, or whose bus is
  not there; a second ``device_del`` of a PCI device being unplugged.
- A PCI device, a DIMM or a CPU goes when the guest ejects it, a moment after ``device_del``
  answered (``DEVICE_DELETED``, first for a virtio device's backend, then for the id); a SCSI
  disk or a virtio-serial port goes at once, its event before the reply. A controller takes the
  devices on its bus with it.
- The guest answers a DIMM's insertion with ``ACPI_DEVICE_OST``, a moment after ``device_add``,
  and refuses to eject a DIMM it is still onlining.
- ``netdev_add`` takes the fds it names out of the monitor's named fds (``closefd`` then finds
  nothing); ``netdev_del`` closes them.
- ``query-block`` names a device's backend as QEMU does: the id of the device that holds it if
  it has one (a ``scsi-hd``), else its QOM path (a virtio-blk's ``.../virtio-backend``).
- A socket chardev listens on its path (a real socket file); removing it unlinks it.

Fdsets are FakeQEMU's own (real fds, ``fake.fdsets``); the model only reads them. Like QEMU
from 9.1 on, an fdset outlives the monitor connection that added it; QEMU 7.2 also closes the
fds of an fdset no node uses when the last monitor disconnects, so after a dropped ``add-fd`` a
7.2 may hold less than the model (never more).
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import functools
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs

from vmctl.testing import FakeCall, FakeCommandError, FakeQEMU

MIB = 1024 * 1024
IMAGE_SIZE = 64 * MIB
#: How long the guest takes to eject a device, or to report a DIMM's insertion handled.
GUEST_DELAY = 0.01
CPU_TYPE = "qemu64-x86_64-cpu"
ACPI_INSERT, ACPI_EJECT = 1, 3

#: Device drivers and what kind of bus they sit on, or provide.
PCI_DRIVERS = frozenset({"virtio-blk-pci", "virtio-net-pci", "virtio-scsi-pci", "virtio-serial-pci"})
VIRTIO_DRIVERS = PCI_DRIVERS  # each with a virtio-backend child
BUS_PROVIDED = {"virtio-scsi-pci": "scsi", "virtio-serial-pci": "virtio-serial"}
BUS_NEEDED = {"scsi-hd": "scsi", "virtserialport": "virtio-serial"}
DISK_DRIVERS = frozenset({"virtio-blk-pci", "scsi-hd"})
THROTTLE_KEYS = ("bps", "bps_rd", "bps_wr", "iops", "iops_rd", "iops_wr")

#: What a device operation can leave behind, each nameable (``HotplugError.remaining``).
PRIMARY = ("nodes", "fdsets", "devices", "chardevs", "objects", "netdevs", "qemu_fds")

State = dict[str, tuple[Any, ...]]


def _error(desc: str, error_class: str = "GenericError") -> FakeCommandError:
    return FakeCommandError(error_class, desc)


@attrs.define
class Node:
    name: str
    driver: str
    file: str | None = None  # a format node's protocol child
    backing: str | None = None
    filename: str | None = None  # a protocol node's file (a path, or /dev/fdset/N)
    read_only: bool = False
    size: int = IMAGE_SIZE
    bitmaps: list[str] = attrs.Factory(list)


@attrs.define
class Device:
    id: str
    driver: str
    bus: str | None = None  # the bus it sits on (a SCSI disk, a virtio-serial port)
    drive: str | None = None  # the root node of its block backend
    throttle: dict[str, int] = attrs.Factory(dict)
    netdev: str | None = None
    chardev: str | None = None
    memdev: str | None = None
    slot: int | None = None  # a DIMM's slot
    cpu: tuple[int, int, int] | None = None  # a CPU's (socket, core, thread)
    unplugging: bool = False
    onlined: bool = True  # a DIMM: the guest has handled its insertion


@attrs.define
class Netdev:
    id: str
    kind: str
    fds: dict[str, int] = attrs.Factory(dict)  # the named fds it took: name -> the fd it holds


@attrs.define
class Chardev:
    id: str
    filename: str
    path: str | None = None
    listener: socket.socket | None = None


class QemuModel:
    """Install on a FakeQEMU; ``state()`` is everything a test compares."""

    def __init__(
        self,
        fake: FakeQEMU,
        *,
        cpu_sockets: int = 4,
        memory_slots: int = 2,
        ram_mib: int = 256,
        max_memory_mib: int = 1024,
    ) -> None:
        self.fake = fake
        self.cpu_sockets = cpu_sockets
        self.memory_slots = memory_slots
        self.hotplug_memory_bytes = (max_memory_mib - ram_mib) * MIB
        self.nodes: dict[str, Node] = {}  # in creation order, as QEMU lists them
        self.devices: dict[str, Device] = {}
        self.netdevs: dict[str, Netdev] = {}
        self.chardevs: dict[str, Chardev] = {}
        self.objects: dict[str, tuple[str, int]] = {}  # id -> (qom-type, size)
        self.jobs: dict[str, str] = {}  # block job id -> its status
        self.boot_cpu = (0, 0, 0)
        self._lock = threading.RLock()
        self._timers: list[threading.Timer] = []
        self._closed = False
        self._seed()
        handlers: dict[str, Callable[[FakeCall], Any]] = {
            "blockdev-add": self._blockdev_add,
            "blockdev-del": self._blockdev_del,
            "query-named-block-nodes": self._query_named_block_nodes,
            "query-block": self._query_block,
            "block_set_io_throttle": self._block_set_io_throttle,
            "transaction": self._transaction,
            "block-dirty-bitmap-remove": self._bitmap_remove,
            "query-jobs": self._query_jobs,
            "job-dismiss": self._job_dismiss,
            "job-cancel": self._job_cancel,
            "block-job-cancel": self._job_cancel,
            "device_add": self._device_add,
            "device_del": self._device_del,
            "qom-list": self._qom_list,
            "chardev-add": self._chardev_add,
            "chardev-remove": self._chardev_remove,
            "query-chardev": self._query_chardev,
            "netdev_add": self._netdev_add,
            "netdev_del": self._netdev_del,
            "object-add": self._object_add,
            "object-del": self._object_del,
            "query-memory-devices": self._query_memory_devices,
            "query-hotpluggable-cpus": self._query_hotpluggable_cpus,
        }
        for command, handler in handlers.items():
            fake.on(command, self._locked(handler))

    def _seed(self) -> None:
        """The VM as launched, which no operation may touch: a boot disk, a NIC on a user netdev,
        its RAM, its monitor and console."""
        self.nodes["vda-file"] = Node("vda-file", "file", filename="/images/boot.qcow2")
        self.nodes["vda-fmt"] = Node("vda-fmt", "qcow2", file="vda-file")
        self.devices["vda"] = Device("vda", "virtio-blk-pci", drive="vda-fmt")
        self.netdevs["nic0-net"] = Netdev("nic0-net", "user")
        self.devices["nic0"] = Device("nic0", "virtio-net-pci", netdev="nic0-net")
        self.objects["pc.ram"] = ("memory-backend-ram", 256 * MIB)
        self.chardevs["vmctl-qmp"] = Chardev("vmctl-qmp", "disconnected:unix:qmp.sock,server=on")
        self.chardevs["vmctl-console"] = Chardev("vmctl-console", "ringbuf")

    def _locked(self, handler: Callable[[FakeCall], Any]) -> Callable[[FakeCall], Any]:
        def run(call: FakeCall) -> Any:
            with self._lock:
                return handler(call)

        return run

    # -- what a test looks at --------------------------------------------------------------

    def state(self) -> State:
        """Everything QEMU holds that a device operation can change (names, not fd or fdset numbers)."""
        with self._lock:
            fdsets = sorted(
                self.fake.fd_opaques.get(number, "<no opaque>")
                for fds in self.fake.fdsets.values()
                for number, _ in fds
            )
            taken = [name for netdev in self.netdevs.values() for name in netdev.fds]
            return {
                "nodes": tuple(sorted(self.nodes)),
                "fdsets": tuple(fdsets),
                "devices": tuple(sorted(self.devices)),
                "chardevs": tuple(sorted(self.chardevs)),
                "objects": tuple(sorted(self.objects)),
                "netdevs": tuple(sorted(self.netdevs)),
                # The fds passed with getfd that QEMU still holds: named, or taken by a netdev.
                "qemu_fds": tuple(sorted([*self.fake.named_fds, *taken])),
                "named_fds": tuple(sorted(self.fake.named_fds)),
                "graph": tuple(
                    sorted(
                        (n.name, edge, child)
                        for n in self.nodes.values()
                        for edge, child in (("file", n.file), ("backing", n.backing))
                        if child is not None
                    )
                ),
                "active": tuple(sorted((d.id, d.drive) for d in self.devices.values() if d.drive)),
                "throttle": tuple(
                    sorted(
                        (d.id, tuple(sorted((k, v) for k, v in d.throttle.items() if v)))
                        for d in self.devices.values()
                        if any(d.throttle.values())
                    )
                ),
                "bitmaps": tuple(sorted((n.name, b) for n in self.nodes.values() for b in n.bitmaps)),
                "jobs": tuple(sorted(self.jobs)),
                "nic_peers": tuple(sorted((d.id, d.netdev) for d in self.devices.values() if d.netdev)),
                "ports": tuple(sorted((d.id, d.chardev) for d in self.devices.values() if d.chardev)),
                "dimms": tuple(sorted((d.id, d.memdev, d.slot) for d in self.devices.values() if d.memdev)),
                "cpus": (1 + sum(1 for d in self.devices.values() if d.cpu is not None),),
            }

    def cpus_plugged(self) -> list[str]:
        """The hotplugged CPUs (by id)."""
        with self._lock:
            return [d.id for d in self.devices.values() if d.cpu is not None]

    def settle(self, timeout: float = 5.0) -> None:
        """Let the guest finish what it was asked (ejects, DIMM insertions)."""
        while True:
            with self._lock:
                pending = [t for t in self._timers if t.is_alive()]
                self._timers = pending
            if not pending:
                return
            for timer in pending:
                timer.join(timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for timer in self._timers:
                timer.cancel()
            for netdev in self.netdevs.values():
                for fd in netdev.fds.values():
                    os.close(fd)
                netdev.fds.clear()
            for chardev in self.chardevs.values():
                self._close_chardev(chardev)

    def _later(self, action: Callable[[], None]) -> None:
        def run() -> None:
            with self._lock:
                if not self._closed:
                    action()

        timer = threading.Timer(GUEST_DELAY, run)
        timer.daemon = True
        self._timers.append(timer)
        timer.start()

    # -- block -------------------------------------------------------------------------------

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise _error(f"Cannot find device='' nor node-name='{name}'")
        return node

    def _parents(self, name: str) -> list[str]:
        users = [n.name for n in self.nodes.values() if name in (n.file, n.backing)]
        return users + [f"device {d.id}" for d in self.devices.values() if d.drive == name]

    def _fdset_fd(self, filename: str, read_only: bool) -> int:
        """The fd QEMU opens for /dev/fdset/N: one in the set whose access mode matches."""
        try:
            fdset = self.fake.fdsets[int(filename.removeprefix("/dev/fdset/"))]
        except (KeyError, ValueError):
            raise _error(f"Could not open '{filename}': No such file or directory") from None
        wanted = os.O_RDONLY if read_only else os.O_RDWR
        for _, fd in fdset:
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == wanted:
                return fd
        raise _error(f"Could not open '{filename}': Permission denied")

    def _blockdev_add(self, call: FakeCall) -> Any:
        args = call.arguments
        name = str(args["node-name"])
        if name in self.nodes:
            raise _error(f"Duplicate nodes with node-name='{name}'")
        read_only = bool(args.get("read-only", False))
        if args["driver"] == "file":
            filename = str(args["filename"])
            if filename.startswith("/dev/fdset/"):
                self._fdset_fd(filename, read_only)
            elif not os.path.exists(filename):
                raise _error(f"Could not open '{filename}': No such file or directory")
            self.nodes[name] = Node(name, "file", filename=filename, read_only=read_only)
            return {}
        file = str(args["file"])
        if self._parents(self._node(file).name):
            raise _error(f"Conflicts with use by {self._parents(file)[0]} as 'file', which does not allow 'write'")
        backing = args.get("backing", _FROM_HEADER)
        if backing is _FROM_HEADER:
            # Without "backing", QEMU opens the backing file the image header names: one the
            # VM has open for writing already, which its lock refuses.
            if self._header_backing(self.nodes[file]):
                raise _error('Failed to get shared "write" lock: Is another process using the image?')
            backing = None
        elif backing is not None:
            self._node(str(backing))
        self.nodes[name] = Node(name, str(args["driver"]), file=file, backing=backing, read_only=read_only)
        return {}

    def _header_backing(self, protocol: Node) -> bool:
        filename = protocol.filename or ""
        if not filename.startswith("/dev/fdset/"):
            return False
        fd = self._fdset_fd(filename, protocol.read_only)
        with open(f"/proc/self/fd/{fd}", "rb") as image:  # a new open: the fd may be O_DIRECT
            header = image.read(512)
        return b"backing=" in header and b"backing=None" not in header

    def _blockdev_del(self, call: FakeCall) -> Any:
        name = str(call.arguments["node-name"])
        if name not in self.nodes:
            raise _error(f"Failed to find node with node-name='{name}'")
        if any(d.drive == name for d in self.devices.values()):
            raise _error(f"Node {name} is in use")
        if self._parents(name):
            raise _error(f"Block device {name} is in use")
        del self.nodes[name]
        return {}

    def _query_named_block_nodes(self, call: FakeCall) -> Any:
        return [
            {
                "node-name": n.name,
                "drv": n.driver,
                "ro": n.read_only,
                "file": n.filename or "json:{}",
                "image": {"virtual-size": n.size, "format": n.driver},
                "dirty-bitmaps": [{"name": b, "persistent": True, "granularity": 65536} for b in n.bitmaps],
            }
            for n in self.nodes.values()
        ]

    @staticmethod
    def _qdev(device: Device) -> str:
        # The id of the device its block backend is attached to, else that device's QOM path.
        if device.driver == "virtio-blk-pci":
            return f"/machine/peripheral/{device.id}/virtio-backend"
        return device.id

    def _query_block(self, call: FakeCall) -> Any:
        return [
            {
                "device": "",
                "qdev": self._qdev(d),
                "locked": False,
                "removable": False,
                "inserted": {"node-name": d.drive, **{k: d.throttle.get(k, 0) for k in THROTTLE_KEYS}},
            }
            for d in self.devices.values()
            if d.drive is not None
        ]

    def _block_set_io_throttle(self, call: FakeCall) -> Any:
        target = str(call.arguments["id"])
        # As QEMU's find_device_state: a QOM path, or an id under /machine/peripheral. A
        # virtio-blk's backend is its virtio-backend child's; a scsi-hd holds its own.
        path = target if target.startswith("/") else f"/machine/peripheral/{target}"
        backends = {f"/machine/peripheral/{d.id}": d for d in self.devices.values() if d.driver == "scsi-hd"}
        backends.update(
            {
                f"/machine/peripheral/{d.id}/virtio-backend": d
                for d in self.devices.values()
                if d.driver == "virtio-blk-pci"
            }
        )
        proxies = {f"/machine/peripheral/{d.id}" for d in self.devices.values()}
        proxies |= {
            f"/machine/peripheral/{d.id}/virtio-backend" for d in self.devices.values() if d.driver in PCI_DRIVERS
        }
        device = backends.get(path)
        if device is None:
            if path in proxies:
                raise _error("Device does not have a block device backend")
            raise _error(f"Device '{target}' not found", "DeviceNotFound")
        device.throttle = {k: int(call.arguments.get(k, 0)) for k in THROTTLE_KEYS}
        return {}

    def _transaction(self, call: FakeCall) -> Any:
        # All or nothing: the actions run on a copy that replaces the state only if all succeed.
        nodes, devices = copy.deepcopy(self.nodes), copy.deepcopy(self.devices)
        started: list[str] = []
        for action in call.arguments["actions"]:
            data = action["data"]
            if action["type"] == "blockdev-snapshot":
                node, overlay = str(data["node"]), str(data["overlay"])
                if node not in nodes or overlay not in nodes:
                    raise _error(f"Cannot find device='' nor node-name='{node if node not in nodes else overlay}'")
                if nodes[overlay].backing is not None:
                    raise _error("The overlay already has a backing image")
                if any(d.drive == overlay for d in devices.values()):
                    raise _error("The overlay is already in use")
                for device in devices.values():  # the overlay takes the node's place above it
                    if device.drive == node:
                        device.drive = overlay
                for other in nodes.values():
                    if other.backing == node and other.name != overlay:
                        other.backing = overlay
                nodes[overlay].backing = node
            elif action["type"] == "block-dirty-bitmap-add":
                target = nodes.get(str(data["node"]))
                if target is None:
                    raise _error(f"Cannot find device='' nor node-name='{data['node']}'")
                if data["name"] in target.bitmaps:
                    raise _error(f"Bitmap already exists: {data['name']}")
                if data.get("persistent") and target.driver != "qcow2":
                    raise _error(f"Cannot store dirty bitmaps in {target.driver} format node '{target.name}'")
                target.bitmaps.append(str(data["name"]))
            elif action["type"] == "block-dirty-bitmap-merge":
                target = nodes.get(str(data["node"]))
                if target is None or data["target"] not in target.bitmaps:
                    raise _error(f"Dirty bitmap '{data['target']}' not found")
                if any(b not in target.bitmaps for b in data["bitmaps"]):
                    raise _error("Dirty bitmap not found")
            elif action["type"] == "blockdev-backup":
                if data["device"] not in nodes or data["target"] not in nodes:
                    raise _error(f"Cannot find device='' nor node-name='{data['device']}'")
                if data["job-id"] in self.jobs or data["job-id"] in started:
                    raise _error(f"Job ID '{data['job-id']}' already in use")
                started.append(str(data["job-id"]))
            else:
                raise _error(f"transaction action {action['type']} is not modelled")
        self.nodes, self.devices = nodes, devices
        for job_id in started:  # a backup of the model's small disks runs at once, then concludes
            self.jobs[job_id] = "running"
            self.fake.emit_event("JOB_STATUS_CHANGE", {"id": job_id, "status": "running"})
            self._later(functools.partial(self._conclude, job_id))
        return {}

    def _conclude(self, job_id: str) -> None:
        if self.jobs.get(job_id) == "running":
            self.jobs[job_id] = "concluded"
            self.fake.emit_event("JOB_STATUS_CHANGE", {"id": job_id, "status": "concluded"})

    def _query_jobs(self, call: FakeCall) -> Any:
        return [
            {"id": j, "type": "backup", "status": status, "current-progress": 1, "total-progress": 1}
            for j, status in self.jobs.items()
        ]

    def _job_dismiss(self, call: FakeCall) -> Any:
        job_id = str(call.arguments["id"])
        if job_id not in self.jobs:
            raise _error(f"Job not found: {job_id}")
        if self.jobs[job_id] != "concluded":
            raise _error(f"Job '{job_id}' in state '{self.jobs[job_id]}' cannot accept command verb 'dismiss'")
        del self.jobs[job_id]
        self.fake.emit_event("JOB_STATUS_CHANGE", {"id": job_id, "status": "null"})
        return {}

    def _job_cancel(self, call: FakeCall) -> Any:
        job_id = str(call.arguments.get("id") or call.arguments.get("device"))
        if self.jobs.get(job_id) != "running":
            raise _error(f"Job not found or not running: {job_id}")
        self._conclude(job_id)
        return {}

    def _bitmap_remove(self, call: FakeCall) -> Any:
        node = self._node(str(call.arguments["node"]))
        if call.arguments["name"] not in node.bitmaps:
            raise _error(f"Dirty bitmap '{call.arguments['name']}' not found")
        node.bitmaps.remove(str(call.arguments["name"]))
        return {}

    # -- devices -----------------------------------------------------------------------------

    def _buses(self) -> dict[str, str]:
        """Bus name -> kind, of the controllers present."""
        return {f"{d.id}.0": BUS_PROVIDED[d.driver] for d in self.devices.values() if d.driver in BUS_PROVIDED}

    def _device_add(self, call: FakeCall) -> Any:
        args = dict(call.arguments)
        driver, device_id = str(args["driver"]), str(args["id"])
        if device_id in self.devices:
            raise _error(f"Duplicate device ID '{device_id}'")
        device = Device(device_id, driver)
        if driver in BUS_NEEDED:
            buses = self._buses()
            bus = str(args.get("bus") or next((b for b, k in buses.items() if k == BUS_NEEDED[driver]), ""))
            if buses.get(bus) != BUS_NEEDED[driver]:
                raise _error(
                    f"Bus '{bus}' not found" if bus else f"No '{BUS_NEEDED[driver]}' bus found for device '{driver}'"
                )
            device.bus = bus
        elif driver not in PCI_DRIVERS and driver not in ("pc-dimm", CPU_TYPE):
            raise _error(f"'{driver}' is not a valid device model name")
        if driver in DISK_DRIVERS:
            device.drive = str(args["drive"])
            self._claim(driver, "drive", device.drive, self.nodes, lambda d: d.drive)
        elif driver == "virtio-net-pci":
            device.netdev = str(args["netdev"])
            self._claim(driver, "netdev", device.netdev, self.netdevs, lambda d: d.netdev)
        elif driver == "virtserialport":
            device.chardev = str(args["chardev"])
            self._claim(driver, "chardev", device.chardev, self.chardevs, lambda d: d.chardev)
        elif driver == "pc-dimm":
            self._plug_dimm(device, str(args["memdev"]))
        elif driver == CPU_TYPE:
            self._plug_cpu(device, args)
        self.devices[device_id] = device
        return {}

    def _claim(
        self, driver: str, prop: str, value: str, known: Mapping[str, object], used: Callable[[Device], str | None]
    ) -> None:
        if value not in known:
            raise _error(f"Property '{driver}.{prop}' can't find value '{value}'")
        if any(used(d) == value for d in self.devices.values()) or (prop == "drive" and self._parents(value)):
            raise _error(f"Property '{driver}.{prop}' can't take value '{value}', it's in use")

    def _plug_dimm(self, device: Device, memdev: str) -> None:
        if memdev not in self.objects:
            raise _error(f"Device '/objects/{memdev}' not found", "DeviceNotFound")
        if any(d.memdev == memdev for d in self.devices.values()):
            raise _error(f"can't use already busy memdev: {memdev}")
        used = {d.slot for d in self.devices.values() if d.memdev}
        free = [slot for slot in range(self.memory_slots) if slot not in used]
        size = self.objects[memdev][1]
        taken = sum(self.objects[d.memdev][1] for d in self.devices.values() if d.memdev)
        if not free:
            raise _error(f"no free slots are available, total slots: {self.memory_slots}")
        if taken + size > self.hotplug_memory_bytes:
            raise _error("not enough space, currently used for memory devices is too much")
        device.memdev, device.slot, device.onlined = memdev, free[0], False

        def inserted() -> None:  # the guest onlines the memory and says so
            device.onlined = True
            self._ost(device, ACPI_INSERT, 0)

        self._later(inserted)

    def _ost(self, device: Device, source: int, status: int) -> None:
        info = {"device": device.id, "slot": str(device.slot), "slot-type": "DIMM", "source": source, "status": status}
        self.fake.emit_event("ACPI_DEVICE_OST", {"info": info})

    def _plug_cpu(self, device: Device, args: Mapping[str, Any]) -> None:
        key = (int(args.get("socket-id", 0)), int(args.get("core-id", 0)), int(args.get("thread-id", 0)))
        if not 0 <= key[0] < self.cpu_sockets or key[1:] != (0, 0):
            raise _error(f"Invalid CPU [socket: {key[0]}, core: {key[1]}, thread: {key[2]}]")
        if key == self.boot_cpu or any(d.cpu == key for d in self.devices.values()):
            raise _error(f"CPU[{key[0]}] with APIC ID {key[0]} exists")
        device.cpu = key

    def _device_del(self, call: FakeCall) -> Any:
        device_id = str(call.arguments["id"])
        device = self.devices.get(device_id)
        if device is None:
            raise _error(f"Device '{device_id}' not found", "DeviceNotFound")
        if device.bus is not None:  # a SCSI disk or a port: gone at once, its event before the reply
            self._remove(device)
            return {}
        if device.unplugging and device.driver in PCI_DRIVERS:
            raise _error(f"Device {device_id} is already in the process of unplug")
        if device.driver == "pc-dimm" and not device.onlined:
            # A guest still onlining a DIMM refuses to eject it.
            self._later(lambda: self._ost(device, ACPI_EJECT, 1))
            return {}
        device.unplugging = True

        def ejected() -> None:  # the guest lets go (unless the device went with its controller)
            current = self.devices.get(device_id)
            if current is not None and current.unplugging:
                self._remove(current)

        self._later(ejected)
        return {}

    def _remove(self, device: Device) -> None:
        """The device leaves the tree (and whatever sits on its bus first); what it used is free again."""
        if device.driver in BUS_PROVIDED:
            for child in [d for d in self.devices.values() if d.bus == f"{device.id}.0"]:
                self._remove(child)
        del self.devices[device.id]
        path = f"/machine/peripheral/{device.id}"
        if device.driver in VIRTIO_DRIVERS:
            self.fake.emit_event("DEVICE_DELETED", {"path": f"{path}/virtio-backend"})
        self.fake.emit_event("DEVICE_DELETED", {"device": device.id, "path": path})

    def _qom_list(self, call: FakeCall) -> Any:
        path = str(call.arguments["path"])
        if path == "/machine/peripheral":
            children = [(d.id, d.driver) for d in self.devices.values()]
        elif path == "/objects":
            children = [(name, qom_type) for name, (qom_type, _) in self.objects.items()]
        else:
            raise _error(f"Device '{path}' not found", "DeviceNotFound")
        return [{"name": "type", "type": "string"}] + [{"name": n, "type": f"child<{t}>"} for n, t in children]

    def _query_memory_devices(self, call: FakeCall) -> Any:
        base = 0x100000000
        entries = []
        for device in sorted((d for d in self.devices.values() if d.memdev), key=lambda d: d.slot or 0):
            assert device.memdev is not None
            size = self.objects[device.memdev][1]
            entries.append(
                {
                    "type": "dimm",
                    "data": {
                        "id": device.id,
                        "size": size,
                        "addr": base,
                        "slot": device.slot,
                        "node": 0,
                        "memdev": f"/objects/{device.memdev}",
                        "hotplugged": True,
                        "hotpluggable": True,
                    },
                }
            )
            base += size
        return entries

    def _query_hotpluggable_cpus(self, call: FakeCall) -> Any:
        entries = []
        for socket_id in reversed(range(self.cpu_sockets)):  # QEMU lists the highest slot first
            entry: dict[str, Any] = {
                "type": CPU_TYPE,
                "vcpus-count": 1,
                "props": {"socket-id": socket_id, "core-id": 0, "thread-id": 0},
            }
            key = (socket_id, 0, 0)
            plugged = next((d for d in self.devices.values() if d.cpu == key), None)
            if key == self.boot_cpu:
                entry["qom-path"] = "/machine/unattached/device[0]"
            elif plugged is not None:
                entry["qom-path"] = f"/machine/peripheral/{plugged.id}"
            entries.append(entry)
        return entries

    # -- chardevs ----------------------------------------------------------------------------

    def _chardev_add(self, call: FakeCall) -> Any:
        chardev_id = str(call.arguments["id"])
        if chardev_id in self.chardevs:
            raise _error(f"Chardev '{chardev_id}' already exists")
        backend = call.arguments["backend"]
        if backend["type"] == "socket":
            path = str(backend["data"]["addr"]["data"]["path"])
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # as QEMU does before it binds
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(path)
            listener.listen(1)
            self.chardevs[chardev_id] = Chardev(chardev_id, f"unix:{path},server=on", path, listener)
        elif backend["type"] == "ringbuf":
            self.chardevs[chardev_id] = Chardev(chardev_id, "ringbuf")
        else:
            raise _error(f"chardev backend {backend['type']} is not modelled")
        return {}

    def _chardev_remove(self, call: FakeCall) -> Any:
        chardev_id = str(call.arguments["id"])
        chardev = self.chardevs.get(chardev_id)
        if chardev is None:
            raise _error(f"Chardev '{chardev_id}' not found")
        if any(d.chardev == chardev_id for d in self.devices.values()):
            raise _error(f"Chardev '{chardev_id}' is busy")
        self._close_chardev(chardev)
        del self.chardevs[chardev_id]
        return {}

    @staticmethod
    def _close_chardev(chardev: Chardev) -> None:
        if chardev.listener is not None:  # QEMU unlinks a listening unix socket when it closes it
            chardev.listener.close()
            chardev.listener = None
            if chardev.path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(chardev.path)

    def _query_chardev(self, call: FakeCall) -> Any:
        return [
            {
                "label": c.id,
                "filename": c.filename,
                "frontend-open": any(d.chardev == c.id for d in self.devices.values()),
            }
            for c in self.chardevs.values()
        ]

    # -- netdevs -----------------------------------------------------------------------------

    def _netdev_add(self, call: FakeCall) -> Any:
        args = call.arguments
        netdev_id = str(args["id"])
        if netdev_id in self.netdevs:
            raise _error(f"Duplicate ID '{netdev_id}' for netdev")
        if args["type"] != "tap":
            raise _error(f"netdev type {args['type']} is not modelled")
        names = [str(args["fd"])] if "fd" in args else str(args["fds"]).split(":")
        missing = [name for name in names if name not in self.fake.named_fds]
        if missing:
            raise _error(f"File descriptor named '{missing[0]}' has not been found")
        # The tap takes the named fds out of the monitor's list: it owns them now.
        taken = {name: self.fake.named_fds.pop(name) for name in names}
        self.netdevs[netdev_id] = Netdev(netdev_id, "tap", taken)
        return {}

    def _netdev_del(self, call: FakeCall) -> Any:
        netdev_id = str(call.arguments["id"])
        netdev = self.netdevs.pop(netdev_id, None)
        if netdev is None:
            raise _error(f"Device '{netdev_id}' not found", "DeviceNotFound")
        for fd in netdev.fds.values():
            os.close(fd)
        for device in self.devices.values():  # a NIC on it loses its peer
            if device.netdev == netdev_id:
                device.netdev = None
        return {}

    # -- objects -----------------------------------------------------------------------------

    def _object_add(self, call: FakeCall) -> Any:
        object_id = str(call.arguments["id"])
        if object_id in self.objects:
            raise _error(f"attempt to add duplicate property '{object_id}' to object (type 'container')")
        self.objects[object_id] = (str(call.arguments["qom-type"]), int(call.arguments.get("size", 0)))
        return {}

    def _object_del(self, call: FakeCall) -> Any:
        object_id = str(call.arguments["id"])
        if object_id not in self.objects:
            raise _error(f"object '{object_id}' not found")
        if any(d.memdev == object_id for d in self.devices.values()):
            raise _error(f"object '{object_id}' is in use, can not be deleted")
        del self.objects[object_id]
        return {}


_FROM_HEADER: Any = object()


class FakeTaps:
    """Stand-ins for tap devices, as ``nics.open_tap`` hands them out: one fd per queue.

    Each fd is one end of a socketpair whose other end stays here, so a tap "exists" exactly as
    long as a real non-persistent tap would: while any copy of any of its queue fds is open
    (vmctl's, the monitor's named fd, the netdev's)."""

    def __init__(self) -> None:
        self._peers: dict[str, list[socket.socket]] = {}

    def open_tap(self, name: str | None, queues: int) -> tuple[str, list[int]]:
        tap = name or f"tap{len(self._peers)}"
        fds = []
        for _ in range(queues):
            ours, peer = socket.socketpair()
            peer.setblocking(False)
            self._peers.setdefault(tap, []).append(peer)
            fds.append(ours.detach())
        return tap, fds

    def alive(self) -> tuple[str, ...]:
        return tuple(sorted(tap for tap, peers in self._peers.items() if any(_still_open(p) for p in peers)))

    def close(self) -> None:
        for peers in self._peers.values():
            for peer in peers:
                peer.close()
        self._peers.clear()


def _still_open(peer: socket.socket) -> bool:
    try:
        return peer.recv(1, socket.MSG_PEEK) != b""  # b"": every copy of the other end is closed
    except BlockingIOError:
        return True


def open_files(root: Path) -> tuple[str, ...]:
    """The files under ``root`` this process holds open, one entry per fd (the fake's fdsets too)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(f"{root}/"):
                found.append(os.path.relpath(target, root))
    return tuple(sorted(found))


def files(root: Path) -> tuple[str, ...]:
    return tuple(sorted(str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()))


def diff(before: State, after: State, categories: tuple[str, ...] = PRIMARY) -> dict[str, tuple[Any, ...]]:
    """What ``after`` has that ``before`` had not, by category ("-" prefixes: what went missing)."""
    changes: dict[str, tuple[Any, ...]] = {}
    for category in categories:
        old, new = before[category], after[category]
        added = tuple(sorted(set(new) - set(old)))
        removed = tuple(sorted(f"-{item}" for item in set(old) - set(new)))
        if added or removed:
            changes[category] = added + removed
    return changes
