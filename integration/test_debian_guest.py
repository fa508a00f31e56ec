"""A real Debian 12 guest (``vmctl.testing.DebianGuest``: systemd, udev, qemu-guest-agent on an
ext4 root, booted by OVMF and systemd-boot from its own disk), driven end to end.

The module boots one guest, once: the tests run in order on it (the migration moves it to its
target, and the shutdown ends it, so they come last). Each effect is checked inside the guest,
through the agent systemd started, or on the image's bytes on the host.
"""

from __future__ import annotations

import logging
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import REPO, VMFactory, make_image
from integration.versions import DISTRIBUTION
from vmctl import VM, VMSpec, restore_disk
from vmctl.errors import AgentError, VmctlError
from vmctl.model import DiskSpec
from vmctl.model.agent import ExecResult, FreezeStatus
from vmctl.model.status import ShutdownEvent, ShutdownMethod
from vmctl.testing import DebianGuest, TestGuest

# The first test's setup may build the image (about 50 s here, when `./run.sh setup` has not) and
# boots the guest (about 25 s under TCG, 50 on a loaded host): more than the 180 s default allows.
# run.sh's workers take whole modules (pytest-xdist's --dist loadfile): one boots the guest, and
# runs the tests in their order on it.
pytestmark = [pytest.mark.timeout(400), pytest.mark.versioned(DISTRIBUTION)]

log = logging.getLogger(__name__)

#: OVMF, the kernel and systemd under TCG: about 25 s on 2 idle cores, twice that on a busy host.
BOOT_TIMEOUT = 240.0
ROOT = "root"


class Guest:
    """The module's one VM, and where it runs now (the migration test moves it)."""

    def __init__(self, vms: VMFactory, image: DebianGuest, tmp_path: Path, vm: VM) -> None:
        self.vms = vms
        self.image = image
        self.tmp_path = tmp_path
        self.vm = vm

    def exec(self, script: str, *, timeout: float = 30.0) -> ExecResult:
        """Run a shell script in the guest through the agent. An agent that fails says what the
        guest's console last showed (the guest may have stopped, or qemu-ga with it)."""
        try:
            return self.vm.agent.exec(["sh", "-c", script], timeout=timeout)
        except AgentError as exc:
            raise AssertionError(f"{exc}\nthe console's end:\n{self.console_tail()}") from exc

    def console_tail(self) -> str:
        try:
            status = self.vm.status()
            self.vm.console.read()
        except VmctlError as exc:
            return f"(unreadable: {exc})"
        return f"({status.run_state.value})\n{self.vm.console.history[-3000:]}"

    def run(self, script: str, *, timeout: float = 30.0) -> str:
        """Run a shell script in the guest; its stdout, once it exited 0."""
        result = self.exec(script, timeout=timeout)
        assert result.ok, f"{script!r} exited {result.exit_code}: {result.stderr.decode(errors='replace')}"
        return result.stdout.decode()

    def poll(self, script: str, *, timeout: float = 30.0) -> str:
        """Run ``script`` until it exits 0 (at most ``timeout`` seconds); its stdout."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.exec(script, timeout=timeout)
            if result.ok:
                return result.stdout.decode()
            assert time.monotonic() < deadline, f"{script!r} still exits {result.exit_code} after {timeout:g}s"
            time.sleep(0.2)


@pytest.fixture(scope="module")
def debian(guest: TestGuest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    image = DebianGuest.ensure(REPO / ".cache")
    tmp_path = tmp_path_factory.mktemp("debian")
    vms = VMFactory(guest, tmp_path)  # run dirs QEMU's user can reach, and every QEMU reaped after
    try:
        spec = VMSpec(
            name="debian",
            machine="q35",
            firmware="uefi",
            accel="tcg",
            memory_mib=512,
            # One vCPU: two boot no faster on an idle 2-core host, and slower on a busy one.
            cpus=1,
            disks=[DiskSpec(id=ROOT, path=image.overlay(tmp_path / "root.qcow2"))],
            guest_agent=True,
        )
        vm = vms.launch(spec, wait_ready=False)
        # qemu-ga starts once udev has announced its port, near the end of the boot.
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not vm.agent.answers(timeout=1.0):
            if time.monotonic() > deadline:
                vm.console.read()
                pytest.fail(f"the guest agent never answered; the console's end:\n{vm.console.history[-3000:]}")
            time.sleep(0.5)
        yield Guest(vms, image, tmp_path, vm)
    finally:
        vms.cleanup()


def test_systemd_is_pid_1_and_reaches_running_or_degraded(debian: Guest) -> None:
    assert debian.run("readlink /proc/1/exe").strip() == "/usr/lib/systemd/systemd"
    result = debian.vm.agent.exec(["systemctl", "is-system-running", "--wait"], timeout=BOOT_TIMEOUT)
    state = result.stdout.decode().strip()
    failed = debian.run("systemctl --failed --no-legend --plain")
    assert state in ("running", "degraded"), f"systemd is {state!r}; failed units:\n{failed}"
    if state == "degraded":
        log.warning("the Debian guest booted degraded; failed units:\n%s", failed)
    assert debian.run("findmnt -no FSTYPE,SOURCE /").split() == ["ext4", "/dev/vda2"]


def test_the_agent_answering_is_systemds_qemu_guest_agent_unit(debian: Guest) -> None:
    assert debian.run("systemctl is-active qemu-guest-agent").strip() == "active"
    main_pid = debian.run("systemctl show --value -p MainPID qemu-guest-agent").strip()
    assert debian.run(f"readlink /proc/{main_pid}/exe").strip() == "/usr/sbin/qemu-ga"
    # What the agent runs is its child: the process answering is the unit's.
    assert debian.run("echo $PPID").strip() == main_pid
    info = debian.vm.agent.info()
    assert info.version.startswith("7.2.")  # bookworm's qemu-guest-agent
    assert {"guest-exec", "guest-fsfreeze-freeze", "guest-fsfreeze-thaw"} <= set(info.commands)


def test_a_hotplugged_disk_gets_its_by_id_link_holds_the_guests_ext4_and_is_gone_after_unplug(debian: Guest) -> None:
    image = make_image(debian.tmp_path / "data.raw", "raw", "64M")
    debian.vm.hotplug_disk(image, id="data1", format="raw")
    link = "/dev/disk/by-id/virtio-data1"  # udev's name for the virtio serial vmctl sets (the disk id)
    device = debian.poll(f"readlink -e {link}", timeout=30).strip()
    assert device.startswith("/dev/vd") and device != "/dev/vda"
    debian.run(
        f"mkfs.ext4 -q -L data1 {link} && mkdir -p /mnt/data1 && mount {link} /mnt/data1"
        " && echo written-in-the-guest > /mnt/data1/note && umount /mnt/data1",
        timeout=60,
    )
    debian.vm.unplug_disk("data1")
    debian.poll(f"! test -e {link} && ! test -e /sys/block/{device.removeprefix('/dev/')}")
    assert "data1" not in debian.run("cat /sys/block/*/serial; echo")
    found = subprocess.run(["debugfs", "-R", "cat /note", str(image)], capture_output=True, text=True, check=True)
    assert found.stdout == "written-in-the-guest\n"


def test_a_hotplugged_nic_appears_in_ip_link_with_its_mac_and_is_gone_after_unplug(debian: Guest) -> None:
    nic = debian.vm.hotplug_nic(id="net1")
    assert nic.mac is not None

    def link_of(mac: str) -> str | None:
        for line in debian.run("ip -o link show").splitlines():
            if f"link/ether {mac} " in line:
                return line.split(":")[1].strip()
        return None

    deadline = time.monotonic() + 30
    while (name := link_of(nic.mac)) is None:
        assert time.monotonic() < deadline, "the guest never showed the hotplugged NIC"
        time.sleep(0.2)
    debian.run("udevadm settle --timeout=30")  # udev renames it while it handles its "add"
    name = link_of(nic.mac)
    assert name is not None and name.startswith("enp"), name  # udev gave it its predictable name
    debian.run(f"ip link set {name} up")
    debian.vm.unplug_nic("net1")
    deadline = time.monotonic() + 30
    while link_of(nic.mac) is not None:
        assert time.monotonic() < deadline, f"{name} is still in the guest after the unplug"
        time.sleep(0.2)


def assert_clean_ext4_holding(partition: str, path: str, text: str) -> None:
    """``e2fsck -fn`` finds the ext4 at ``partition`` clean, and its file ``path`` holds ``text``."""
    fsck = subprocess.run(["e2fsck", "-fn", partition], capture_output=True, text=True, timeout=120)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    found = subprocess.run(["debugfs", "-R", f"cat {path}", partition], capture_output=True, text=True, check=True)
    assert found.stdout == text


def test_a_quiesced_snapshot_freezes_and_thaws_the_root_and_its_backing_image_is_a_clean_ext4_with_the_file(
    debian: Guest,
) -> None:
    token = secrets.token_hex(8)
    debian.run(f"echo {token} > /root/before-snapshot")  # in the page cache: the freeze must flush it
    [disk] = debian.vm.disks()
    before = disk.layer_path(disk.layers[-1])  # the module's overlay of the cached image
    [root] = debian.vm.snapshot_disks([ROOT], overlays={ROOT: debian.tmp_path / "snap1.qcow2"}, quiesce=True)
    assert len(root.layers) == 2 and root.layer_path(root.layers[0]) == before
    assert debian.vm.agent.fsfreeze_status() is FreezeStatus.THAWED
    debian.run("echo after > /root/after-snapshot && sync")  # the root takes writes again
    # qemu-ga (verbose) logs the freeze request, stops logging while frozen, and says when it thawed.
    journal = debian.run("journalctl -u qemu-guest-agent -o cat --no-pager | grep -E 'fsfreeze|filesystem (un)?freeze'")
    freeze = journal.rindex('"execute":"guest-fsfreeze-freeze"')
    frozen = journal.index("disabling logging due to filesystem freeze", freeze)
    assert "logging re-enabled due to filesystem unfreeze" in journal[frozen:], journal[freeze:]
    # The image under the new overlay (and the cached image below it): the root as frozen.
    copy = debian.tmp_path / "snapshotted.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", before, str(copy)], check=True, timeout=120)
    partition = f"{copy}?offset={debian.image.root_offset}"
    assert_clean_ext4_holding(partition, "/root/before-snapshot", f"{token}\n")
    listing = subprocess.run(["debugfs", "-R", "ls /root", partition], capture_output=True, text=True, check=True)
    assert "after-snapshot" not in listing.stdout  # written to the new overlay only
    copy.unlink()


def test_a_quiesced_backup_of_the_mounted_root_restores_to_a_clean_ext4_with_the_file(debian: Guest) -> None:
    token = secrets.token_hex(8)
    debian.run(f"echo {token} > /root/before-backup")  # in the page cache: the freeze must flush it
    out = debian.tmp_path / "backups"
    out.mkdir()
    backup = debian.vm.backup(out, checkpoint="debian1", quiesce=True).wait(300)
    assert debian.vm.agent.fsfreeze_status() is FreezeStatus.THAWED
    debian.run("echo after > /root/after-backup && sync")  # the root takes writes again
    restored = debian.tmp_path / "restored.raw"
    restore_disk([backup.files[ROOT]], restored, format="raw")
    assert_clean_ext4_holding(f"{restored}?offset={debian.image.root_offset}", "/root/before-backup", f"{token}\n")
    restored.unlink()
    debian.vm.remove_checkpoint("debian1")


def test_a_live_migration_carries_a_file_the_guest_wrote_to_the_target(debian: Guest) -> None:
    token = secrets.token_hex(8)
    debian.run(f"echo {token} > /root/migrated")
    source = debian.vm
    target = debian.vms.incoming(source, "debian-dst")
    assert source.migrate(target).wait(180).status == "completed"
    debian.vm = target
    assert source.wait(10).code == 0  # quit after handing over
    assert debian.run("cat /root/migrated").strip() == token
    assert debian.run("systemctl is-system-running").strip() in ("running", "degraded")


def test_acpi_powerdown_is_the_guests_own_systemd_poweroff_within_60s(debian: Guest) -> None:
    # vm.shutdown asks the agent first when it answers; stop it, to leave the ACPI button to logind.
    # From a timer of systemd's own, so that the agent answers this exec before it goes; a timer's
    # default accuracy is a minute (systemd coalesces wake-ups), far too coarse here.
    debian.run("systemd-run --quiet --on-active=1 --timer-property=AccuracySec=100ms systemctl stop qemu-guest-agent")
    deadline = time.monotonic() + 30
    while debian.vm.agent.answers(timeout=1.0):
        assert time.monotonic() < deadline, "the agent is still up"
        time.sleep(0.2)
    events: list[ShutdownEvent] = []
    debian.vm.on_shutdown(events.append)
    with ConsoleFollower(debian.vm) as console:
        result = debian.vm.shutdown(timeout=60)
    assert result.method is ShutdownMethod.POWERDOWN and result.seconds < 60
    assert (result.exit.code, result.exit.signal) == (0, None)
    # The guest powered itself off (the ACPI S5 write), after systemd's shutdown transaction (it
    # reaches poweroff.target, then systemd-shutdown unmounts: whose last lines may be too late).
    assert [(e.guest, e.reason) for e in events] == [(True, "guest-shutdown")]
    shown = re.sub(r"\x1b\[[0-9;]*m", "", console.text)  # systemd's colours
    assert "Reached target poweroff.target" in shown, shown[-2000:]


class ConsoleFollower:
    """Reads the console every 0.1 s while QEMU lives: the guest's last words are lost with its
    ringbuf when QEMU exits (the last tenth of a second may be missed)."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.text = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="console-follower", daemon=True)

    def __enter__(self) -> ConsoleFollower:
        self.vm.console.read()  # from here on
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                self.text += self.vm.console.read()
            except VmctlError:  # QEMU is gone, and its monitor with it
                return
            self._stop.wait(0.1)
