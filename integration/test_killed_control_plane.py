"""A control plane SIGKILLed at random moments of its operations; the next attach finds the VM
consistent: each operation completed and is in the inventory, or is undone, or its leftovers are
named (``vm.leftovers``) and ``clean_leftovers()`` removes them.

A child process attaches and runs a loop of operations, saying which one it begins; the test
kills it at a random moment, attaches, checks QEMU against the inventory, cleans up, and goes
again. It counts where the kills landed, so that each operation is shown to be interrupted.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from integration.conftest import REPO, VMFactory, make_image, running_side, taps_held
from integration.versions import MIGRATION
from vmctl import VM
from vmctl.model.names import disk_node_names, fdset_tag, netdev_id
from vmctl.testing import GuestShell

#: Kills aimed at each operation of a loop.
KILLS_PER_OPERATION = int(os.environ.get("VMCTL_KILLS_PER_OPERATION", "50"))

PRELUDE = """
import logging, os, subprocess, sys, time
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
from vmctl import VM
run_dir, work = sys.argv[1], sys.argv[2]
vm = VM.attach(run_dir)
vm.clean_leftovers()
print("attached", flush=True)

def step(operation, call, *details):
    print("op", operation, time.monotonic(), *details, flush=True)
    call()
    print("done", operation, time.monotonic(), flush=True)
"""

DEVICES = """
image = os.path.join(work, "kd1.qcow2")
while True:
    if vm.inventory.disk("kd1") is None:
        step("hotplug_disk", lambda: vm.hotplug_disk(image, id="kd1"))
    step("unplug_disk", lambda: vm.unplug_disk("kd1"))
    if vm.inventory.nic("kn1") is None:
        step("hotplug_nic", lambda: vm.hotplug_nic(id="kn1"))
    step("unplug_nic", lambda: vm.unplug_nic("kn1"))
"""

SNAPSHOTS = """
round_ = 0
while True:
    round_ += 1
    name = f"{os.getpid()}-{round_}"
    if vm.inventory.disk("ks1") is None:
        base = os.path.join(work, f"base-{name}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "32M"], check=True)
        step("hotplug_disk", lambda: vm.hotplug_disk(base, id="ks1"))
    overlay = os.path.join(work, f"top-{name}.qcow2")
    step("snapshot_disks", lambda: vm.snapshot_disks(["ks1"], overlays={"ks1": overlay}), overlay)
    step("unplug_disk", lambda: vm.unplug_disk("ks1"))
"""


class Kills:
    """Where the kills land: each round aims at one operation (in turn), waits for the child to
    begin it and kills it within the time that operation has taken so far (a random moment
    inside it, mostly), so that short operations are hit as often as long ones."""

    def __init__(self, operations: tuple[str, ...], seed: int = 1234) -> None:
        self.operations = operations
        self.rng = random.Random(seed)
        self.took: dict[str, list[float]] = {op: [0.2] for op in operations}
        self.landed: Counter[str] = Counter()

    def aim(self, round_: int) -> str:
        return self.operations[round_ % len(self.operations)]

    def delay(self, operation: str) -> float:
        typical = sorted(self.took[operation])[len(self.took[operation]) // 2]
        return self.rng.uniform(0.0, 1.2 * typical)

    def learn(self, said: str) -> list[str]:
        """Read what the child said; returns the last operation it began (and its details)."""
        begun: dict[str, float] = {}
        last = ["none"]
        lines = said.splitlines()
        if not said.endswith("\n"):  # the kill cut the last line short
            lines = lines[:-1]
        for entry in lines:
            kind, operation, at, *details = [*entry.split(), "", "", ""][:3] + entry.split()[3:]
            if kind == "op":
                begun[operation], last = float(at), [operation, *details]
            elif kind == "done" and operation in begun:
                self.took.setdefault(operation, []).append(float(at) - begun[operation])
                last = ["between", operation]
        self.landed[last[0]] += 1
        return last


def kill_inside(loop: str, run_dir: Path, work: Path, kills: Kills, operation: str) -> str:
    """Start a child control plane running ``loop`` on the VM in ``run_dir``, SIGKILL it a random
    moment after it begins ``operation``; returns all it said."""
    child = subprocess.Popen(
        [sys.executable, "-c", PRELUDE + loop, str(run_dir), str(work)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    heard = []
    try:
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until it begins the operation aimed at
            line = child.stdout.readline()
            heard.append(line)
            if not line or line.startswith(f"op {operation} "):
                break
        time.sleep(kills.delay(operation))
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    said, errors = child.communicate(timeout=10)
    assert heard[:1] == ["attached\n"] and child.returncode == -signal.SIGKILL, f"the child failed: {errors}"
    return "".join(heard) + said


def run_kills(
    vms: VMFactory,
    work: Path,
    loop: str,
    check: Callable[[VM, list[str], set[str]], None],
    operations: tuple[str, ...],
) -> Counter[str]:
    """Kill a child running ``loop``, KILLS_PER_OPERATION times per operation; after each kill
    ``check(vm, last_op, added)`` must hold before and after cleaning up, ``added`` being what
    QEMU holds beyond what it held at launch. Returns how attach found the VM; asserts that most
    kills landed inside the operation they aimed at."""
    vm = vms.launch(vms.spec("victim"))
    at_launch = held_by_qemu(vm)
    run_dir = vm.run_dir
    kills = Kills(operations)
    found: Counter[str] = Counter()
    for round_ in range(KILLS_PER_OPERATION * len(operations)):
        vm.close()
        last = kills.learn(kill_inside(loop, run_dir, work, kills, kills.aim(round_)))
        attached = VM.attach(run_dir)
        vms.vms[vms.vms.index(vm)] = vm = attached
        found["leftovers" if vm.leftovers else "consistent"] += 1
        check(vm, last, held_by_qemu(vm) - at_launch)
        vm.clean_leftovers()
        assert vm.leftovers == ()
        check(vm, last, held_by_qemu(vm) - at_launch)
    # Most kills aimed at an operation landed inside it.
    assert all(kills.landed[op] >= KILLS_PER_OPERATION // 2 for op in operations), kills.landed
    print("kills landed:", dict(kills.landed), "attach found:", dict(found))
    return found


def test_a_sigkill_during_disk_and_nic_hotplug_or_unplug_leaves_the_vm_consistent(
    vms: VMFactory, tmp_path: Path
) -> None:
    make_image(tmp_path / "kd1.qcow2", "qcow2")

    def check(vm: VM, last: list[str], added: set[str]) -> None:
        listed = set(vm.leftovers)
        # All QEMU holds beyond its launch is the loop's disk's or NIC's: nothing a name does not trace.
        assert all("kd1" in part or "kn1" in part for part in added), f"after {last}: QEMU has {added}"
        for device in ("kd1", "kn1"):
            have = {part for part in added if device in part}
            left = {part for part in listed if device in part}
            if left:  # stopped half-way: what QEMU has of it is named (an eject under way may end meanwhile)
                assert have <= left, f"after {last}: QEMU has {have} of {device}, leftovers {left}"
            else:  # listed and whole, or not listed and gone
                expected = {part for part in whole(vm) if device in part}
                assert have == expected, f"after {last}: QEMU has {have} of {device}, {vm.inventory}"
        if not listed:
            nic, held = vm.inventory.nic("kn1"), taps_held(vm.pid)
            assert held == ({nic.tap} if nic else set()), f"after {last}: QEMU holds taps {held}, the inventory {nic}"

    found = run_kills(vms, tmp_path, DEVICES, check, ("hotplug_disk", "unplug_disk", "hotplug_nic", "unplug_nic"))
    assert found["consistent"] > 0 and found["leftovers"] > 0, found  # some were found half-way


def test_a_sigkill_during_a_snapshot_leaves_the_disk_on_one_whole_chain(vms: VMFactory, tmp_path: Path) -> None:
    def check(vm: VM, last: list[str], present: set[str]) -> None:
        disk = vm.inventory.disk("ks1")
        assert all("ks1" in part for part in present), f"after {last}: QEMU has {present}"  # nothing unnamed
        whole = set()
        if disk is not None:  # the device on the chain's top, every layer's nodes and fdset
            whole = {"device ks1"} | {
                part
                for layer in disk.layers
                for part in (f"fdset {fdset_tag('ks1', layer)}", *(f"node {n}" for n in disk_node_names("ks1", layer)))
            }
        left = set(vm.leftovers)
        if left:  # stopped half-way: whatever QEMU has beyond the listed disk is named
            assert present - whole <= left, f"after {last}: QEMU has {present - whole} unnamed, leftovers {left}"
        else:
            assert present == whole, f"after {last}: QEMU has {present}, the inventory {disk}"
            if disk is not None:
                assert active_node(vm, "ks1") == disk.active_node, f"after {last}: {disk}"
        if last[0] == "snapshot_disks" and os.path.exists(last[1]):  # the overlay it made: in use, or named
            in_chain = disk is not None and last[1] in {disk.layer_path(layer) for layer in disk.layers}
            assert in_chain or f"file {last[1]}" in left, f"after {last}: the overlay leaked"

    found = run_kills(vms, tmp_path, SNAPSHOTS, check, ("hotplug_disk", "snapshot_disks", "unplug_disk"))
    assert found["consistent"] > 0, found


MIGRATIONS = """
count = 0
while True:
    count += 1
    name = f"t{os.getpid()}-{count}"
    target = VM.launch_incoming(
        vm.migration_target_spec(name=name), run_dir=os.path.join(work, name), inventory=vm.inventory
    )
    print("target", target.run_dir, flush=True)
    step("migrate", lambda: vm.migrate(target).wait(60))
    vm = target
"""


@pytest.mark.versioned(MIGRATION)
def test_a_sigkill_during_a_migration_leaves_the_guest_running_on_exactly_one_side(
    vms: VMFactory, tmp_path: Path
) -> None:
    """Each side settles at its own attach, the source first: a source cancels a migration
    nobody follows (before postcopy) or, migrated away, quits at clean_leftovers; a target that
    has the whole guest resumes it. After both attaches the guest runs on one side, with its
    data, and the other QEMU is gone or waits empty."""
    vm = vms.launch(vms.spec("traveller", memory_mib=256))
    with GuestShell(vm) as shell:
        shell.run("head -c 1000000 /dev/urandom > /tmp/data && sha256sum /tmp/data > /tmp/sum", check=True)
    # One migration here first, to learn how long one takes (where the kills should land).
    target = VM.launch_incoming(
        vm.migration_target_spec(name="first"), run_dir=vms.run_dir("first"), inventory=vm.inventory
    )
    vms.vms.append(target)
    began = time.monotonic()
    vm.migrate(target).wait(60)
    kills = Kills(("migrate",))
    kills.took["migrate"] = [time.monotonic() - began]
    vm, current, found = target, target.run_dir, Counter[str]()
    for round_ in range(KILLS_PER_OPERATION):
        vm.close()
        vms.vms.remove(vm)  # the child holds it now; the attach after the kill adds it again
        lines = kill_inside(MIGRATIONS, current, tmp_path, kills, "migrate")
        last = kills.learn(lines)
        pending = None  # the child may have moved the guest more than once before the kill
        for entry in lines.splitlines():
            if entry.startswith("target "):
                pending = Path(entry.split()[1])
            elif entry.startswith("done migrate ") and pending is not None:
                current, pending = pending, None
        pair = [current] if pending is None else [current, pending]
        vm = running_side(vms, pair, f"round {round_} after {last}")
        with GuestShell(vm) as shell:
            assert shell.run("sha256sum -c /tmp/sum").output.strip() == "/tmp/data: OK", f"round {round_}"
        found["moved" if vm.run_dir == pending else "stayed"] += 1
        current = vm.run_dir
        reap_orphans(tmp_path, keep=current)
    assert kills.landed["migrate"] >= KILLS_PER_OPERATION // 2, kills.landed
    assert found["stayed"] > 0, found  # and "moved" where the migration had completed
    print("kills landed:", dict(kills.landed), "the guest:", dict(found))


def reap_orphans(work: Path, *, keep: Path) -> None:
    """End the target QEMUs the killed child had launched but no attach took over (it was killed
    before it could say where): by the pid each wrote, if that process is still that QEMU."""
    for run_dir in work.glob("t*-*"):
        if run_dir == keep:
            continue
        try:
            pid = int((run_dir / "qemu.pid").read_text())
            if str(run_dir).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone already, or never started


def held_by_qemu(vm: VM) -> set[str]:
    """Every block node, fdset, device, QOM object, chardev and netdev QEMU holds, named as
    ``vm.leftovers`` names them. Asked of QEMU itself, not through vmctl's journal and queries,
    which are what attach settles with: a part they missed would be missed twice."""
    qmp = vm.qmp
    # `info network` lists each NIC (type=nic) with its netdev below it: only the netdevs are parts here.
    network = re.findall(r"^[ \\]*([\w.-]+): index=\d+,type=(\w+)", qmp.human("info network"), re.MULTILINE)
    return (
        {f"node {node['node-name']}" for node in qmp.execute("query-named-block-nodes", {"flat": True})}
        | {f"fdset {fd.get('opaque')}" for fdset in qmp.execute("query-fdsets") for fd in fdset["fds"]}
        | {f"device {name}" for name in children(vm, "/machine/peripheral")}
        | {f"object {name}" for name in children(vm, "/objects")}
        | {f"chardev {chardev['label']}" for chardev in qmp.execute("query-chardev")}
        | {f"netdev {name}" for name, kind in network if kind != "nic"}
    )


def children(vm: VM, path: str) -> set[str]:
    """The QOM children of ``path`` (qom-list lists its properties too)."""
    return {entry["name"] for entry in vm.qmp.execute("qom-list", {"path": path}) if entry["type"].startswith("child<")}


def active_node(vm: VM, device: str) -> str | None:
    """The node QEMU's block device ``device`` reads and writes (query-block names a virtio-blk
    by the QOM path of its backend; a device being torn down has no name there any more)."""
    for block in vm.qmp.execute("query-block"):
        qdev = block.get("qdev", "")
        if block.get("inserted") and (qdev == device or qdev.startswith(f"/machine/peripheral/{device}/")):
            return str(block["inserted"]["node-name"])
    return None


def whole(vm: VM) -> set[str]:
    """The parts QEMU has of the devices the inventory lists, when each is whole."""
    parts = set()
    if vm.inventory.disk("kd1") is not None:
        parts |= {"device kd1", "node kd1-fmt", "node kd1-file", f"fdset {fdset_tag('kd1')}"}
    if vm.inventory.nic("kn1") is not None:
        parts |= {"device kn1", f"netdev {netdev_id('kn1')}"}
    return parts


pytestmark = pytest.mark.timeout(600)
