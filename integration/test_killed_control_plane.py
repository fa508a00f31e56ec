"""A control plane SIGKILLed at random moments of device operations; the next attach finds the VM
consistent: each operation completed and is in the inventory, or is undone, or its leftovers are
named (``vm.leftovers``) and ``clean_leftovers()`` removes them.

A child process attaches and plugs and unplugs a disk and a NIC in a loop; the test kills it at a
random moment, attaches, checks QEMU against the inventory, cleans up, and goes again.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from integration.conftest import REPO, VMFactory, make_image
from vmctl import VM, DiskSpec, NicSpec
from vmctl.model.names import fdset_tag, netdev_id
from vmctl.vm import journal

ROUNDS = int(os.environ.get("VMCTL_KILL_ROUNDS", "40"))

CHILD = """
import logging, sys
import structlog
structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.CRITICAL))
from vmctl import VM
run_dir, image = sys.argv[1], sys.argv[2]
vm = VM.attach(run_dir)
vm.clean_leftovers()
print("attached", flush=True)
while True:
    if vm.inventory.disk("kd1") is None:
        vm.hotplug_disk(image, id="kd1")
    vm.unplug_disk("kd1")
    if vm.inventory.nic("kn1") is None:
        vm.hotplug_nic(id="kn1")
    vm.unplug_nic("kn1")
"""


def qemu_has(vm: VM) -> dict[str, bool]:
    """What QEMU has of the child's disk and NIC, part by part."""
    disk = vm.inventory.disk("kd1")
    nic = vm.inventory.nic("kn1")
    found = {}
    for intent in (
        journal.Intent(operation="hotplug_disk", disk=disk or _disk_like("kd1")),
        journal.Intent(operation="hotplug_nic", nic=nic or _nic_like("kn1")),
    ):
        found.update(journal.parts(vm.qmp, intent))
    return found


def _disk_like(disk_id: str) -> DiskSpec:
    return DiskSpec(id=disk_id, path="/unused")


def _nic_like(nic_id: str) -> NicSpec:
    return NicSpec(id=nic_id)


def whole(vm: VM) -> set[str]:
    """The parts QEMU has of the devices the inventory lists, when each is whole."""
    parts = set()
    if vm.inventory.disk("kd1") is not None:
        parts |= {"device kd1", "node kd1-fmt", "node kd1-file", f"fdset {fdset_tag('kd1')}"}
    if vm.inventory.nic("kn1") is not None:
        parts |= {"device kn1", f"netdev {netdev_id('kn1')}"}
    return parts


def taps() -> int:
    return sum(1 for _ in Path("/sys/class/net").glob("*/tun_flags"))


def test_attach_after_a_sigkill_at_any_moment_finds_the_vm_consistent(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("victim"))
    image = make_image(tmp_path / "kd1.qcow2", "qcow2")
    run_dir = vm.run_dir
    rng = random.Random(1234)
    taps_before = taps()
    outcomes: dict[str, int] = {"consistent": 0, "leftovers": 0}
    for round_ in range(ROUNDS):
        vm.close()
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(run_dir), str(image)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            line = child.stdout.readline()
            if line == "attached\n":
                time.sleep(rng.uniform(0.0, 2.0))  # somewhere in a hotplug or an unplug
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(10)
        _, errors = child.communicate(timeout=10)
        assert line == "attached\n" and child.returncode == -signal.SIGKILL, f"the child failed: {errors}"
        attached = VM.attach(run_dir)
        vms.vms[vms.vms.index(vm)] = vm = attached
        found = qemu_has(vm)
        present = {name for name, there in found.items() if there}
        listed = set(vm.leftovers)
        for device in ("kd1", "kn1"):
            mine = {name for name in found if device in name}
            have, left = present & mine, listed & mine
            if left:  # stopped half-way: what QEMU has of it is named (an eject under way may end meanwhile)
                assert have <= left, f"round {round_}: QEMU has {have} of {device}, leftovers {left}"
            else:  # listed and whole, or not listed and gone
                assert have == whole(vm) & mine, f"round {round_}: QEMU has {have} of {device}, {vm.inventory}"
        outcomes["leftovers" if listed else "consistent"] += 1
        vm.clean_leftovers()
        assert vm.leftovers == ()
        present = {name for name, there in qemu_has(vm).items() if there}
        assert present == whole(vm), f"round {round_}: after cleaning, QEMU has {present}"
        assert taps() == taps_before + (vm.inventory.nic("kn1") is not None), f"round {round_}: a tap leaked"
    # The kills landed both between operations and inside them.
    assert outcomes["consistent"] > 0 and outcomes["leftovers"] > 0, outcomes
