"""The operator's side on real QEMU: the screen, keys and NMIs, and the ``vmctl`` tools (``ls``,
``top`` in a real terminal, ``agent``, ``screenshot``), which reach each VM on its tools monitor
while the test (the control plane) holds the first one."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import VMFactory
from vmctl import VM
from vmctl.errors import InvalidArgument
from vmctl.testing import GuestShell

pytestmark = pytest.mark.timeout(180)


def vmctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmctl.cli", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_a_screendump_is_a_png_of_the_vga_text_screen_also_from_the_cli(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("screen", vga=True))
    assert png_size(vm.screendump(tmp_path / "screen.png")) == (720, 400)  # 80x25 characters of 9x16
    done = vmctl("screenshot", str(vm.run_dir), str(tmp_path / "cli.png"))
    assert done.returncode == 0, done.stderr
    assert png_size(tmp_path / "cli.png") == (720, 400)
    ppm = vm.screendump(tmp_path / "screen.ppm", format="ppm").read_bytes()
    assert ppm.startswith(b"P6\n720 400\n255\n")


def test_a_vm_without_a_display_refuses_a_screendump_before_anything_is_sent(vms: VMFactory, tmp_path: Path) -> None:
    vm = vms.launch(vms.spec("no-screen"), wait_ready=False)
    with pytest.raises(InvalidArgument, match="vga=True"):
        vm.screendump(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_keys_reach_the_guests_keyboard_and_an_nmi_its_kernel(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("keys", vga=True, append="vmctl.noacpi"))
    with GuestShell(vm) as shell:
        keyboard = shell.poll("grep -l 'AT Translated' /sys/class/input/event*/device/name | cut -d/ -f5")
        reader = shell.run(f"dd if=/dev/input/{keyboard} of=/tmp/keys bs=24 count=4 2>/dev/null & echo $!", check=True)
        # Keys pressed before the reader holds the device would be lost to it.
        shell.poll(f"ls -l /proc/{reader.output.strip()}/fd | grep -q 'input/{keyboard}$' && echo open")
        vm.send_keys(["shift", "a"])
        shell.poll("[ $(stat -c %s /tmp/keys) -ge 96 ] && echo got")  # press and release events
        vm.inject_nmi()
        assert "NMI" in shell.poll("dmesg | grep -i 'NMI received'")


def test_ls_lists_every_vm_under_a_root_with_its_state_while_the_control_plane_holds_it(vms: VMFactory) -> None:
    running = vms.launch(vms.spec("ls-running", cpus=2, memory_mib=320), wait_ready=False)
    paused = vms.launch(vms.spec("ls-paused"), wait_ready=False)
    paused.pause()
    gone = vms.launch(vms.spec("ls-gone"), wait_ready=False)
    gone.kill()
    done = vmctl("ls", str(vms.tmp_path))
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert header.split() == ["NAME", "STATE", "PID", "VCPUS", "MEMORY", "DISKS", "UPTIME"]
    table = {line.split()[0]: line.split() for line in lines}
    assert table["ls-running"][1:5] == ["running", str(running.pid), "2", "320"]
    assert table["ls-paused"][1] == "paused"
    assert table["ls-gone"][1] == "exited" and table["ls-gone"][-1] == "-"
    listed = [json.loads(line) for line in vmctl("ls", "--json", str(vms.tmp_path)).stdout.splitlines()]
    assert sorted(row["name"] for row in listed) == ["ls-gone", "ls-paused", "ls-running"]
    assert running.status().running  # the control plane's monitor was never disturbed


def test_agent_exec_from_the_cli_returns_the_guests_output_and_exit_code(vms: VMFactory) -> None:
    vm = vms.launch(vms.spec("cli-agent", guest_agent=True))
    deadline = time.monotonic() + 30
    while not vm.agent.answers():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    done = vmctl("agent", str(vm.run_dir), "exec", "--", "sh", "-c", "echo from-the-guest; echo warn >&2; exit 4")
    assert (done.returncode, done.stdout, done.stderr) == (4, "from-the-guest\n", "warn\n")
    assert vmctl("agent", str(vm.run_dir), "fsfreeze-status").stdout == "thawed\n"
    assert vm.agent.fsfreeze_status().value == "thawed"  # and the library's agent still works


@pytest.fixture
def tmux() -> Iterator[list[str]]:
    """A tmux server of the test's own (its own socket), killed afterwards."""
    command = ["tmux", "-L", f"vmctl-test-{uuid.uuid4().hex[:8]}"]
    try:
        yield command
    finally:
        subprocess.run([*command, "kill-server"], capture_output=True, check=False)


def test_top_in_a_real_terminal_shows_each_vms_use_and_quits_on_q(vms: VMFactory, tmux: list[str]) -> None:
    busy = vms.launch(vms.spec("top-busy"))
    vms.launch(vms.spec("top-idle"), wait_ready=False)
    with GuestShell(busy) as shell:
        shell.run("(while :; do :; done) >/dev/null 2>&1 &", check=True)
    top = f"{sys.executable} -m vmctl.cli top {vms.tmp_path} --interval 0.5"
    subprocess.run([*tmux, "new-session", "-d", "-s", "top", "-x", "150", "-y", "20", top], check=True)
    deadline = time.monotonic() + 30
    while True:
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", "top"], capture_output=True, text=True).stdout
        rows = {line.split()[0]: line.split() for line in screen.splitlines() if line.startswith("top-")}
        if "top-busy" in rows and rows["top-busy"][3] != "-":
            break
        assert time.monotonic() < deadline, screen
        time.sleep(0.3)
    assert "NAME" in screen and "CPU%" in screen and "q quits" in screen
    assert rows["top-busy"][1] == "running" and float(rows["top-busy"][3]) > 20  # a guest spinning, under TCG
    assert "top-idle" in rows
    subprocess.run([*tmux, "send-keys", "-t", "top", "q"], check=True)
    deadline = time.monotonic() + 10
    while subprocess.run([*tmux, "has-session", "-t", "top"], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, "vmctl top did not quit on q"
        time.sleep(0.1)


def test_migrate_from_the_cli_moves_the_guest_and_shows_its_progress(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("cli-move"))
    with GuestShell(source) as shell:
        shell.run("echo still-here > /tmp/marker", check=True)
    vms.vms.remove(source)
    source.close()  # the operator's case: no control plane holds the VM
    target_dir = vms.run_dir("cli-move-dst")
    done = vmctl("migrate", str(source.run_dir), str(target_dir), "--timeout", "240", timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"migrating cli-move: {source.run_dir} -> {target_dir}"
    assert "MiB sent in" in done.stdout and done.stdout.rstrip().endswith("completed")
    target = VM.attach(target_dir)
    vms.vms.append(target)
    assert target.status().running
    with GuestShell(target) as shell:
        assert shell.run("cat /tmp/marker").output == "still-here\n"
    _reap(source.pid)  # the source's QEMU quit after handing over; it was this process's child
    listed = [json.loads(line) for line in vmctl("ls", "--json", str(vms.tmp_path)).stdout.splitlines()]
    assert sorted((row["run_dir"], row["state"]) for row in listed) == [
        (str(source.run_dir), "exited"),
        (str(target_dir), "running"),
    ]
    assert vmctl("migrate", str(source.run_dir), str(target_dir)).returncode == 1  # the target dir is taken


def _reap(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.05)
    raise AssertionError(f"pid {pid} did not exit")
