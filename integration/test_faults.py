"""Every step of every device operation, failed the ways a real QEMU fails it, on a real guest.

For each operation the test records the QMP commands it sends, then runs it again once per
command with that command failing: QEMU answering with an error (it did nothing), or its reply
coming too late (it did the thing; the caller cannot know). Afterwards everything QEMU, the
host and the vmctl process hold must be as before, the inventory and the state file too; for an
unplug, a retry must finish the job. One guest per operation family, the faults in a loop.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest

from integration.conftest import VMFactory, make_image, running_side, taps_held
from integration.versions import MEMORY_HOTPLUG, MIGRATION
from vmctl import VM, DiskSpec, Secret, Throttle, create_image
from vmctl.errors import InvalidArgument, VmctlError
from vmctl.testing import GuestShell
from vmctl.testing.faults import Fault, inject, record
from vmctl.vm.statefile import read_record

FAULTS = (Fault.ERROR, Fault.TIMEOUT)
#: With a dropped connection too, for the operations the journal settles at attach.
ALL_FAULTS = (*FAULTS, Fault.DROP)


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
        "taps": sorted(taps_held(vm.pid) | taps_held(os.getpid())),
        "fds": len(os.listdir("/proc/self/fd")),
        "io_limits": sorted(
            (b["qdev"], b["inserted"].get("iops", 0), b["inserted"].get("bps", 0))
            for b in qmp.execute("query-block")
            if b.get("inserted")
        ),
        "active": sorted(
            (b["qdev"], b["inserted"]["node-name"]) for b in qmp.execute("query-block") if b.get("inserted")
        ),
        "sizes": sorted(
            (n["node-name"], n["image"]["virtual-size"])
            for n in qmp.execute("query-named-block-nodes", {"flat": True})
            if n["drv"] != "file"
        ),
        "jobs": _names(qmp.execute("query-jobs"), "id"),
        "exports": _names(qmp.execute("query-block-exports"), "id"),
        "nbd_server": vm.nbd_address,
        "memory_devices": sorted(
            (d["type"], str(d["data"].get("id")), d["data"].get("size"), d["data"].get("requested-size"))
            for d in qmp.execute("query-memory-devices")
        ),
        "bitmaps": sorted(
            (n["node-name"], m.get("name", "(a job's)"))
            for n in qmp.execute("query-named-block-nodes", {"flat": True})
            for m in n.get("dirty-bitmaps", ())
        ),
        "inventory": vm.inventory,
        "state_file": read_record(vm.run_dir).inventory,
    }


class Held:
    """The VM under test; after a dropped connection it is attached again, as a control plane would."""

    def __init__(self, vms: VMFactory, vm: VM) -> None:
        self.vms, self.vm = vms, vm

    def reattach(self) -> None:
        old = self.vm
        old.close()
        self.vm = VM.attach(old.run_dir)
        self.vms.vms[self.vms.vms.index(old)] = self.vm
        self.vm.clean_leftovers()  # what the interrupted operation left, if anything


Op = Callable[[VM], Any]


def run_matrix(
    held: Held,
    plug: Op,
    unplug: Op,
    faults: tuple[Fault, ...] = FAULTS,
    files: Path | None = None,
    fault_unplug: bool = True,
    setup: Op | None = None,
) -> int:
    """Fail each step of ``plug`` and then of ``unplug``; returns how many cases ran. A dropped
    connection is followed by a new attach, which must settle the operation. With ``setup``,
    each plug starts from what it made (not faulted), and the unplug undoes both."""

    def now() -> dict[str, Any]:
        found = world(held.vm)
        if files is not None:
            found["files"] = sorted(p.name for p in files.iterdir())
        return found

    def prepare() -> dict[str, Any] | None:
        if setup is None:
            return None
        setup(held.vm)
        return now()

    prepared = prepare()
    with record(held.vm.qmp) as plugging:
        plug(held.vm)
    plugged = now()
    with record(held.vm.qmp) as unplugging:
        unplug(held.vm)
    base = now()
    cases = 0
    for fault in faults:
        for at in range(1, len(plugging.commands) + 1):
            cases += 1
            assert prepare() == prepared
            with inject(held.vm.qmp, fault, at=at) as injection:
                try:
                    plug(held.vm)
                    failed: VmctlError | None = None
                except VmctlError as exc:
                    failed = exc
            where = f"{fault.value} at {at} ({injection.failed}): {failed}"
            if fault is Fault.DROP:
                held.reattach()
                completed = now() == plugged  # attach found it whole
            elif failed is None:  # the op survived the fault (a timed-out step that did its work)
                assert now() == plugged, where
                completed = True
            else:
                assert getattr(failed, "remaining", ()) == (), where
                assert held.vm.leftovers == (), where
                completed = False
            if not completed and prepared is not None:
                assert now() == prepared, where
            if completed or prepared is not None:
                unplug(held.vm)
            assert now() == base, where
        assert prepare() == prepared
        plug(held.vm)
        for at in range(1, len(unplugging.commands) + 1 if fault_unplug else 1):
            cases += 1
            with inject(held.vm.qmp, fault, at=at) as injection:
                try:
                    unplug(held.vm)
                except VmctlError:
                    if fault is Fault.DROP:
                        held.reattach()  # attach finishes an unplug that had begun
                    # A retry finishes an unplug; unless vmctl found the device gone (the step
                    # that timed out had done the last of the work) and so took it off the inventory.
                    with contextlib.suppress(InvalidArgument):
                        unplug(held.vm)
            if fault is Fault.DROP and not held.vm.qmp.is_connected:
                held.reattach()
            assert now() == base, f"{fault.value} at {at} ({injection.failed})"
            assert prepare() == prepared
            plug(held.vm)
        unplug(held.vm)
    return cases


@pytest.fixture
def held(vms: VMFactory) -> Held:
    spec = vms.spec("faults", memory_mib=256, max_memory_mib=1024, memory_slots=2)
    return Held(vms, vms.launch(spec))


def _disk(kind: str, tmp_path: Path) -> DiskSpec:
    if kind == "virtio":
        return DiskSpec(id="fd1", path=make_image(tmp_path / "a.qcow2", "qcow2"), throttle=Throttle(iops=100))
    if kind == "scsi":
        return DiskSpec(id="fs1", path=make_image(tmp_path / "b.qcow2", "qcow2"), bus="scsi", cache="none")
    # Every one of the matrix's ~100 hotplugs opens it: at QEMU's 2 s of key derivation, that was 3 minutes.
    create_image(tmp_path / "c.qcow2", 16 << 20, encryption=Secret(b"fault-matrix"), key_derivation_ms=20)
    # Its passphrase is one more step (a secret object); after a drop, attach unseals the intent.
    return DiskSpec(id="fe1", path=tmp_path / "c.qcow2", encryption=Secret(b"fault-matrix"))


# One guest per kind of disk: each matrix is a test of its own, so parallel workers share them out.
@pytest.mark.parametrize("kind", ["virtio", "scsi", "encrypted"])
def test_every_step_of_disk_hotplug_and_unplug(held: Held, tmp_path: Path, kind: str) -> None:
    disk = _disk(kind, tmp_path)

    def plug(vm: VM) -> None:
        vm.hotplug_disk(disk)

    def unplug(vm: VM) -> None:
        vm.unplug_disk(disk.id)

    assert run_matrix(held, plug, unplug, faults=ALL_FAULTS) >= 30
    with GuestShell(held.vm) as shell:  # and the guest still takes disks
        plugged = held.vm.hotplug_disk(attrs.evolve(disk, id="after"))
        assert shell.block_device(plugged.id)


def test_every_step_of_nic_hotplug_and_unplug(held: Held) -> None:
    cases = run_matrix(
        held,
        lambda vm: vm.hotplug_nic(id="fn1", tap="vmctl-fn1", mac="52:54:00:fa:17:01", queues=2),
        lambda vm: vm.unplug_nic("fn1"),
        faults=ALL_FAULTS,
    )
    assert cases >= 21


def test_every_step_of_chardev_hotplug_and_unplug(held: Held) -> None:
    socket = held.vm.run_dir / "c.sock"  # QEMU makes it: where its (unprivileged) user may write

    def plug(vm: VM) -> None:
        vm.hotplug_chardev("fc1", kind="socket", path=socket, port_name="org.vmctl.faults")

    assert run_matrix(held, plug, lambda vm: vm.unplug_chardev("fc1")) >= 4
    assert not socket.exists()


@pytest.mark.versioned(MEMORY_HOTPLUG)
def test_every_step_of_memory_hotplug_and_unplug(held: Held) -> None:
    with GuestShell(held.vm):
        plug, unplug = (lambda vm: vm.hotplug_memory(128, id="fm1")), (lambda vm: vm.unplug_memory("fm1"))
        assert run_matrix(held, plug, unplug) >= 4


@pytest.mark.versioned(MEMORY_HOTPLUG)
def test_every_step_of_a_virtio_mem_resize(held: Held) -> None:
    with GuestShell(held.vm):  # the guest is up, its virtio-mem driver with it
        held.vm.add_virtio_mem("vmem1", max_size_mib=256)
        grow, shrink = (lambda vm: vm.resize_virtio_mem("vmem1", 128)), (lambda vm: vm.resize_virtio_mem("vmem1", 0))
        assert run_matrix(held, grow, shrink) >= 4


def test_every_step_of_a_snapshot_and_of_io_limits(held: Held, tmp_path: Path) -> None:
    held.vm.hotplug_disk(make_image(tmp_path / "base.qcow2", "qcow2"), id="sd1")
    held.vm.hotplug_disk(DiskSpec(id="ss1", path=make_image(tmp_path / "scsi.qcow2", "qcow2"), bus="scsi"))
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    # A failed snapshot leaves no node, no fdset, no overlay file, and the disk on its old layer;
    # after a dropped connection, attach finds the disk switched or cleans the new layer up.
    # (The commit that undoes it has its own test.) QEMU names the two buses' devices differently.
    for disk_id in ("sd1", "ss1"):

        def snapshot(vm: VM, disk_id: str = disk_id) -> None:
            vm.snapshot_disks([disk_id], overlays={disk_id: overlays / "s1.qcow2"}, bitmap="since-s1")

        def commit(vm: VM, disk_id: str = disk_id) -> None:
            vm.commit_disk(disk_id)
            (overlays / "s1.qcow2").unlink()  # the commit leaves the file: it is the caller's

        assert run_matrix(held, snapshot, commit, files=overlays, faults=ALL_FAULTS, fault_unplug=False) >= 12
    limits, none = Throttle(iops=50, bps=1 << 20), Throttle()
    assert (
        run_matrix(held, lambda vm: vm.set_disk_throttle("sd1", limits), lambda vm: vm.set_disk_throttle("sd1", none))
        >= 2
    )


def test_every_step_of_a_commit(held: Held, tmp_path: Path) -> None:
    held.vm.hotplug_disk(make_image(tmp_path / "base.qcow2", "qcow2"), id="cd1")
    overlays = tmp_path / "overlays"
    overlays.mkdir()

    def snapshot(vm: VM) -> None:
        vm.snapshot_disks(["cd1"], overlays={"cd1": overlays / "s1.qcow2"})

    def commit(vm: VM) -> None:
        vm.commit_disk("cd1")
        (overlays / "s1.qcow2").unlink()  # the commit leaves the file: it is the caller's

    snapshot(held.vm)
    # A failed commit leaves the disk on its overlay with no job in the way of a retry; one that
    # went through has dropped the overlay's nodes and fdset and the inventory follows.
    assert run_matrix(held, commit, snapshot, files=overlays) >= 12


def _fresh_disk(tmp_path: Path, disk_id: str) -> Op:
    """An unplug that puts back a new standalone base image under the same id."""

    def reset(vm: VM) -> None:
        vm.unplug_disk(disk_id)
        for old in tmp_path.glob(f"{disk_id}-*"):
            old.unlink()
        vm.hotplug_disk(make_image(tmp_path / f"{disk_id}-base.qcow2", "qcow2"), id=disk_id)

    return reset


def test_every_step_of_a_stream(held: Held, tmp_path: Path) -> None:
    reset = _fresh_disk(tmp_path, "sd2")
    held.vm.hotplug_disk(make_image(tmp_path / "sd2-base.qcow2", "qcow2"), id="sd2")

    def snapshot(vm: VM) -> None:
        vm.snapshot_disks(["sd2"], overlays={"sd2": tmp_path / "sd2-top.qcow2"})

    # A failed stream leaves the disk on its chain, a completed one on its top image alone.
    assert run_matrix(held, lambda vm: vm.stream_disk("sd2"), reset, setup=snapshot, fault_unplug=False) >= 8


def test_every_step_of_a_mirror_pivot_and_of_a_cancelled_mirror(held: Held, tmp_path: Path) -> None:
    reset = _fresh_disk(tmp_path, "md1")
    held.vm.hotplug_disk(make_image(tmp_path / "md1-base.qcow2", "qcow2"), id="md1")
    target = tmp_path / "md1-target.qcow2"

    def mirror(vm: VM, pivot: bool) -> None:
        try:
            with vm.mirror_disk("md1", target) as job:  # cancelled if a step fails
                job.wait_ready(60)
                job.complete(60) if pivot else job.cancel(60)
        except VmctlError:
            target.unlink(missing_ok=True)  # the copy is the caller's to keep or drop
            raise
        if not pivot:
            target.unlink()

    def pivot(vm: VM) -> None:
        mirror(vm, pivot=True)

    def cancel(vm: VM) -> None:
        mirror(vm, pivot=False)

    assert run_matrix(held, pivot, reset, fault_unplug=False) >= 10
    assert run_matrix(held, cancel, lambda vm: None, fault_unplug=False) >= 10


def test_every_step_of_bitmaps_nbd_exports_and_a_resize(held: Held, tmp_path: Path) -> None:
    held.vm.hotplug_disk(make_image(tmp_path / "bd1.qcow2", "qcow2"), id="bd1")
    assert run_matrix(held, lambda vm: vm.add_bitmap("bd1", "b1"), lambda vm: vm.remove_bitmap("bd1", "b1")) >= 2
    assert run_matrix(held, lambda vm: vm.export_disk("bd1"), lambda vm: vm.unexport_disk("bd1")) >= 4
    grown = 128 * 2**20
    assert (
        run_matrix(
            held,
            lambda vm: vm.resize_disk("bd1", grown),
            lambda vm: vm.resize_disk("bd1", 64 * 2**20, allow_shrink=True),
        )
        >= 4
    )


def migration_world(vm: VM, target: VM) -> dict[str, Any]:
    """What a migration's setup changes on its source, and of the target what a storage copy adds."""
    params = vm.qmp.execute("query-migrate-parameters")
    return {
        "capabilities": sorted((c["capability"], c["state"]) for c in vm.qmp.execute("query-migrate-capabilities")),
        "parameters": (params["downtime-limit"], params["max-bandwidth"]),
        "migration": vm.qmp.execute("query-migrate").get("status"),
        "run_state": vm.status().run_state,
        "nodes": _names(vm.qmp.execute("query-named-block-nodes", {"flat": True}), "node-name"),
        "jobs": _names(vm.qmp.execute("query-jobs"), "id"),
        "target_exports": _names(target.qmp.execute("query-block-exports"), "id"),
        "target_nbd_server": target.nbd_address,
        "target_run_state": target.status().run_state,
    }


@pytest.mark.versioned(MIGRATION)
@pytest.mark.parametrize("copy_storage", [False, True], ids=["shared-storage", "copy-storage"])
def test_every_step_of_migration_setup_on_source_and_target(vms: VMFactory, tmp_path: Path, copy_storage: bool) -> None:
    """A failed setup leaves the source as it was (running, its capabilities and parameters
    restored, no storage mirror or NBD plumbing left on either side) and the target still
    waiting, so the next attempt goes through; a step whose reply was late but which took is
    followed to the end."""
    vm = vms.launch(vms.spec("mig-src", memory_mib=256))
    vm.hotplug_disk(make_image(tmp_path / "data.qcow2", "qcow2", "16M"), id="data1")

    def incoming(source: VM, n: int) -> VM:
        name = f"mig-{n}"
        paths = {"data1": make_image(tmp_path / f"{name}.qcow2", "qcow2", "16M")} if copy_storage else None
        target = VM.launch_incoming(
            source.migration_target_spec(name=name, disk_paths=paths),
            run_dir=vms.run_dir(name),
            inventory=source.inventory,
        )
        vms.vms.append(target)
        return target

    def migrate(source: VM, target: VM) -> Any:
        return source.migrate(target, downtime_limit=400, auto_converge=True, copy_storage=copy_storage)

    def moved(target: VM) -> bool:
        with GuestShell(target) as shell:
            return shell.run("echo moved && head -c 512 /dev/vda | wc -c").output == "moved\n512\n"

    launched = 0
    target = incoming(vm, launched)
    with record(vm.qmp) as on_source, record(target.qmp) as on_target:
        migration = migrate(vm, target)
    migration.wait(60)
    vm, target = target, incoming(target, launched := launched + 1)
    cases = 0
    for side, commands in (("target", on_target.commands), ("source", on_source.commands)):
        for fault in FAULTS:
            for at in range(1, len(commands) + 1):
                cases += 1
                before = migration_world(vm, target)
                with inject(target.qmp if side == "target" else vm.qmp, fault, at=at) as injection:
                    try:
                        migration = migrate(vm, target)
                        failed: VmctlError | None = None
                    except VmctlError as exc:
                        failed = exc
                where = f"{side}: {fault.value} at {at} ({injection.failed}): {failed}"
                if failed is None:  # it took after all: it runs to the end, the guest moves
                    assert migration.wait(60).status == "completed", where
                    assert moved(target), where
                    vm, target = target, incoming(target, launched := launched + 1)
                else:
                    assert migration_world(vm, target) == before, where
    assert cases >= (24 if copy_storage else 16)
    migrate(vm, target).wait(60)  # and the last target still takes the guest
    assert moved(target)


@pytest.mark.versioned(MIGRATION)
def test_a_connection_dropped_at_each_step_of_a_migration_leaves_the_guest_on_one_side(
    vms: VMFactory, tmp_path: Path
) -> None:
    """The source's monitor connection drops at each command of a migration (setup, start, the
    wait, the hand-over), from a guest that had itself migrated in: its QEMU shows that incoming
    migration as completed, which must not pass for one that left. Both sides are attached again,
    the source first, and the guest runs on exactly one of them with its data."""
    vm = vms.launch(vms.spec("drop-0", memory_mib=256))
    with GuestShell(vm) as shell:
        shell.run("head -c 100000 /dev/urandom > /tmp/data && sha256sum /tmp/data > /tmp/sum", check=True)
    launched = 0

    def incoming(source: VM) -> VM:
        nonlocal launched
        launched += 1
        name = f"drop-{launched}"
        target = VM.launch_incoming(
            source.migration_target_spec(name=name), run_dir=vms.run_dir(name), inventory=source.inventory
        )
        vms.vms.append(target)
        return target

    target = incoming(vm)
    with record(vm.qmp) as on_source:
        vm.migrate(target).wait(60)
    vm, target = target, incoming(target)
    found = {"stayed": 0, "moved": 0}
    for at in range(1, len(on_source.commands) + 1):
        with inject(vm.qmp, Fault.DROP, at=at) as injection, contextlib.suppress(VmctlError):
            vm.migrate(target).wait(60)
        where = f"dropped at {at} ({injection.failed})"
        for side in (vm, target):  # the control plane is gone: nothing of it holds either side
            side.close()
            vms.vms.remove(side)
        pair = [vm.run_dir, target.run_dir]
        vm = running_side(vms, pair, where)
        with GuestShell(vm) as shell:
            assert shell.run("sha256sum -c /tmp/sum").output.strip() == "/tmp/data: OK", where
        found["moved" if vm.run_dir == pair[1] else "stayed"] += 1
        target = incoming(vm)
    assert found["stayed"] > 0 and found["moved"] > 0, found
