"""A disk whose image runs out of host space: the guest stops, vmctl reports it, and after space
is freed it resumes with every byte it wrote intact."""

from __future__ import annotations

import hashlib
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import VMFactory
from vmctl import RunState
from vmctl.model.status import DiskIOError
from vmctl.testing import GuestShell

MIB = 1 << 20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of 8 MiB of the test's own (unmounted afterwards)."""
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "vmctl-test", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_host_disk_stops_the_guest_and_a_resume_after_freeing_space_loses_nothing(
    vms: VMFactory, small_fs: Path
) -> None:
    vm = vms.launch()
    image = small_fs / "data.raw"
    subprocess.run(["truncate", "-s", "32M", str(image)], check=True)  # sparse: room for 8 MiB only
    errors: list[DiskIOError] = []
    stopped = threading.Event()

    def on_io_error(error: DiskIOError) -> None:
        errors.append(error)
        stopped.set()

    vm.on_io_error(on_io_error)
    with GuestShell(vm) as shell:
        disk = vm.hotplug_disk(image, id="full", format="raw", on_error="enospc", cache="none")
        name = shell.block_device(disk.id)
        shell.run("head -c 16777216 /dev/urandom > /tmp/data && sha256sum < /tmp/data > /tmp/sum", check=True)
        shell.send(f"dd if=/tmp/data of=/dev/{name} bs=1M oflag=direct conv=fsync 2>/dev/null; echo written")
        assert stopped.wait(60), "no BLOCK_IO_ERROR"
        assert vm.status().run_state is RunState.IO_ERROR
        error = errors[0]
        assert (error.disk_id, error.operation, error.action, error.nospace) == ("full", "write", "stop", True)
        subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)  # space freed
        vm.resume()
        assert shell.poll("cat /proc/loadavg >/dev/null && ! pgrep -x dd && echo done", timeout=60) == "done"
        check = f"dd if=/dev/{name} bs=1M count=16 iflag=direct 2>/dev/null | sha256sum | cmp - /tmp/sum && echo same"
        assert shell.run(check).output.strip() == "same"
        expected = shell.run("cut -d' ' -f1 /tmp/sum").output.strip()
    with open(image, "rb") as written:
        assert hashlib.sha256(written.read(16 * MIB)).hexdigest() == expected
    assert vm.status().run_state is RunState.RUNNING
