"""Every step of every device operation, failed the ways a real QEMU fails it, on a real guest.

For each operation the test records the QMP commands it sends, then runs it again once per
command with that command failing: QEMU answering with an error (it did nothing), or its reply
coming too late (it did the thing; the caller cannot know). Afterwards everything QEMU, the
host and the vmctl process hold must be as before, the inventory and the state file too; for an
unplug, a retry must finish the job. One guest per operation family, the faults in a loop.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from integration.conftest import VMFactory, make_image
from vmctl import VM, DiskSpec, Throttle
from vmctl.errors import InvalidArgument, VmctlError
from vmctl.testing import GuestShell
from vmctl.testing.faults import Fault, inject, record
from vmctl.vm.statefile import read_record

FAULTS = (Fault.ERROR, Fault.TIMEOUT)


def _names(entries: list[dict[str, Any]], key: str) -> list[str]:
    return sorted(str(e[key]) for e in entries)


def world(vm: VM) -> dict[str, Any]:
    """What QEMU, the host and this process hold that a device operation can change."""
    qmp = vm.qmp
    network = qmp.human("info network")
    return {
        "nodes": _names(qmp.execute("query-named-block-nodes", {"flat": True}), "node-name"),
        "fdsets": sorted(str(fd.get("opaque")) for s in qmp.execute("query-fdsets") for fd in s["fds"]),
        "devices": _names(qmp.execute("qom-list", {"path": "/machine/peripheral"}), "name"),
        "chardevs": _names(qmp.execute("query-chardev"), "label"),
        "objects": _names(qmp.execute("qom-list", {"path": "/objects"}), "name"),
        "netdevs": sorted(re.findall(r"^[ \\]*([\w.-]+): index=", network, re.MULTILINE)),
        "cpus": len(qmp.execute("query-cpus-fast")),
        "taps": sorted(p.parent.name for p in Path("/sys/class/net").glob("*/tun_flags")),
        "fds": len(os.listdir("/proc/self/fd")),
        "inventory": vm.inventory,
        "state_file": read_record(vm.run_dir).inventory,
    }


def run_matrix(vm: VM, plug: Callable[[], Any], unplug: Callable[[], Any], faults: tuple[Fault, ...] = FAULTS) -> int:
    """Fail each step of ``plug`` and then of ``unplug``; returns how many cases ran."""
    with record(vm.qmp) as plugging:
        plug()
    plugged = world(vm)
    with record(vm.qmp) as unplugging:
        unplug()
    base = world(vm)
    cases = 0
    for fault in faults:
        for at in range(1, len(plugging.commands) + 1):
            cases += 1
            with inject(vm.qmp, fault, at=at) as injection:
                try:
                    plug()
                    failed: VmctlError | None = None
                except VmctlError as exc:
                    failed = exc
            where = f"{fault.value} at {at} ({injection.failed})"
            if failed is None:  # the op survived the fault (a timed-out step that did its work)
                assert world(vm) == plugged, where
                unplug()
            else:
                assert getattr(failed, "remaining", ()) == (), f"{where}: {failed}"
                assert vm.leftovers == (), f"{where}: {failed}"
            assert world(vm) == base, f"{where}: {failed}"
        plug()
        for at in range(1, len(unplugging.commands) + 1):
            cases += 1
            with inject(vm.qmp, fault, at=at) as injection:
                try:
                    unplug()
                except VmctlError:
                    # A retry finishes an unplug; unless vmctl found the device gone (the step
                    # that timed out had done the last of the work) and so took it off the inventory.
                    with contextlib.suppress(InvalidArgument):
                        unplug()
            assert world(vm) == base, f"{fault.value} at {at} ({injection.failed})"
            plug()
        unplug()
    return cases


@pytest.fixture
def vm(vms: VMFactory) -> VM:
    spec = vms.spec("faults", memory_mib=256, max_memory_mib=1024, memory_slots=2)
    return vms.launch(spec)


def test_every_step_of_disk_hotplug_and_unplug(vm: VM, tmp_path: Path) -> None:
    virtio = DiskSpec(id="fd1", path=make_image(tmp_path / "a.qcow2", "qcow2"), throttle=Throttle(iops=100))
    scsi = DiskSpec(id="fs1", path=make_image(tmp_path / "b.qcow2", "qcow2"), bus="scsi", cache="none")
    with GuestShell(vm) as shell:
        for disk in (virtio, scsi):
            cases = run_matrix(vm, functools.partial(vm.hotplug_disk, disk), functools.partial(vm.unplug_disk, disk.id))
            assert cases >= 20
        plugged = vm.hotplug_disk(attrs.evolve(virtio, id="after"))  # and the guest still takes disks
        assert shell.block_device(plugged.id)


def test_every_step_of_nic_hotplug_and_unplug(vm: VM) -> None:
    assert run_matrix(vm, lambda: vm.hotplug_nic(id="fn1", queues=2), lambda: vm.unplug_nic("fn1")) >= 14


def test_every_step_of_chardev_hotplug_and_unplug(vm: VM, tmp_path: Path) -> None:
    socket = tmp_path / "c.sock"

    def plug() -> None:
        vm.hotplug_chardev("fc1", kind="socket", path=socket, port_name="org.vmctl.faults")

    assert run_matrix(vm, plug, lambda: vm.unplug_chardev("fc1")) >= 4
    assert not socket.exists()


def test_every_step_of_memory_hotplug_and_unplug(vm: VM) -> None:
    with GuestShell(vm):
        assert run_matrix(vm, lambda: vm.hotplug_memory(128, id="fm1"), lambda: vm.unplug_memory("fm1")) >= 4
