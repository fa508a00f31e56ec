"""LUKS-encrypted qcow2 disks, at launch, at hotplug, through snapshots and a migration, with
the passphrase nowhere in clear: not on QEMU's command line, the QMP socket, the logs, the state
file; and the guest's data nowhere in clear in the images."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from structlog.typing import EventDict

from integration.conftest import VMFactory
from integration.versions import MIGRATION
from vmctl import VM, DiskSpec, Secret, create_image
from vmctl.testing import GuestShell
from vmctl.testing.faults import record

PASSPHRASE = b"vmctl-test-passphrase-7f3a9c"
MARKER = "guest-data-b51e07d2c4"


def encrypted_image(path: Path) -> Path:
    create_image(path, 16 << 20, encryption=Secret(PASSPHRASE), key_derivation_ms=100)  # a throwaway: not 2 s an open
    return path


def image_info(path: Path) -> dict[str, object]:
    output = subprocess.run(
        ["qemu-img", "info", "-U", "--output=json", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return dict(json.loads(output))


def plaintext_of(path: Path) -> bytes:
    """The image's guest-visible bytes, read with the passphrase (from a file only root reads)."""
    key_file = path.with_suffix(".key")
    key_file.write_bytes(PASSPHRASE)
    key_file.chmod(0o600)
    out = path.with_suffix(".plain")
    subprocess.run(
        [
            "qemu-img", "convert", "-U", "--object", f"secret,id=k,file={key_file}",
            "--image-opts", f"driver=qcow2,file.filename={path},encrypt.key-secret=k", "-O", "raw", str(out),
        ],
        check=True,
    )  # fmt: skip
    return out.read_bytes()


def test_the_guest_writes_through_an_encrypted_disk_and_the_image_holds_only_ciphertext(
    vms: VMFactory, tmp_path: Path
) -> None:
    image = encrypted_image(tmp_path / "enc.qcow2")
    assert image_info(image)["encrypted"] is True
    vm = vms.launch(vms.spec(disks=[DiskSpec(id="e1", path=image, encryption=Secret(PASSPHRASE))]))
    with GuestShell(vm) as shell:
        device = shell.block_device("e1")
        shell.run(f"echo {MARKER} | dd of=/dev/{device} bs=4096 conv=fsync 2>/dev/null", check=True)
        assert shell.run(f"head -c 21 /dev/{device}").output == MARKER
    vm.kill()
    assert MARKER.encode() not in image.read_bytes()
    assert plaintext_of(image).startswith(MARKER.encode())


@pytest.fixture
def logged() -> Iterator[list[EventDict]]:
    """Every event vmctl logs during the test, debug included, whatever logging an earlier test
    left configured (vmctl binds its loggers when a VM is made: this starts before the launch)."""
    with capture_logs() as entries:
        yield entries


@pytest.mark.versioned(MIGRATION)
def test_a_passphrase_is_nowhere_in_clear_through_hotplug_snapshot_and_migration(
    vms: VMFactory, tmp_path: Path, logged: list[EventDict]
) -> None:
    vm = vms.launch(vms.spec(memory_mib=256))
    disk = DiskSpec(id="e2", path=encrypted_image(tmp_path / "hot.qcow2"), encryption=Secret(PASSPHRASE))
    with record(vm.qmp) as sent:
        vm.hotplug_disk(disk)
        with GuestShell(vm) as shell:
            device = shell.block_device("e2")  # once the guest has it
            shell.run(f"echo {MARKER} | dd of=/dev/{device} bs=4096 conv=fsync 2>/dev/null", check=True)
        vm.snapshot_disks(["e2"], overlays={"e2": tmp_path / "hot.s1.qcow2"})
        with GuestShell(vm) as shell:  # written into the new overlay
            shell.run(f"echo {MARKER}-s1 | dd of=/dev/{device} bs=4096 seek=1 conv=fsync 2>/dev/null", check=True)
    overlay = tmp_path / "hot.s1.qcow2"
    assert image_info(overlay)["encrypted"] is True
    assert MARKER.encode() not in overlay.read_bytes()
    target = VM.launch_incoming(
        vm.migration_target_spec(name="enc-dst"), run_dir=vms.run_dir("enc-dst"), inventory=vm.inventory
    )
    vms.vms.append(target)
    with record(vm.qmp) as migrating, record(target.qmp) as incoming:
        vm.migrate(target).wait(60)
    hot = tmp_path / "hot.qcow2"  # the guest's first write is there, encrypted
    assert MARKER.encode() not in hot.read_bytes() and plaintext_of(hot).startswith(MARKER.encode())
    with GuestShell(target) as shell:  # the target opened the chain with its own master key
        assert shell.run(f"head -c 21 /dev/{device}").output == MARKER
        second = shell.run(f"dd if=/dev/{device} bs=4096 skip=1 count=1 2>/dev/null | head -c 24").output
        assert second == f"{MARKER}-s1"
    # Each place must hold what the passphrase could have leaked through, or its check proves nothing.
    assert {"object-add", "transaction"} <= set(sent.names), sent.names  # the secret, the snapshot
    assert "migrate" in migrating.names and "migrate-incoming" in incoming.names, (migrating, incoming)
    operations = [("vm1", "object-add"), ("vm1", "transaction"), ("vm1", "migrate"), ("enc-dst", "migrate-incoming")]
    for monitor, command in operations:
        assert any(e.get("monitor") == monitor and e.get("cmd") == command for e in logged), (monitor, command)
    places = {
        f"the QMP commands to {where}": json.dumps([arguments for _, arguments in recording.commands]).encode()
        for where, recording in [("the source", sent), ("the source migrating", migrating), ("the target", incoming)]
    }
    places["the logs"] = repr(logged).encode()
    for side in (vm, target):
        places[f"{side.name}'s state file"] = (side.run_dir / "vm.json").read_bytes()
        places[f"{side.name}'s QEMU log"] = (side.run_dir / "qemu.log").read_bytes()
    places["the target's command line"] = Path(f"/proc/{target.pid}/cmdline").read_bytes()
    for where, found in places.items():
        assert PASSPHRASE not in found, f"the passphrase is in {where}"
    key = (target.run_dir / "master-key").read_bytes()
    assert key not in places["the target's command line"]
    assert os.stat(target.run_dir / "master-key").st_mode & 0o777 == 0o600
    assert b"vmctl-sealed-secret" in places["enc-dst's state file"]
