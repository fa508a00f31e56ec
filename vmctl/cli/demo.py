"""``vmctl demo``: boot two tiny guests and drive them (hotplug, reset, live migration, shutdown),
printing every step and every QMP event."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from vmctl.errors import VmctlError
from vmctl.model import VMSpec
from vmctl.model.migration import MigrationProgress
from vmctl.ops.nodes import block_nodes
from vmctl.qmp import Event
from vmctl.testing import READY_MARKER, GuestShell, TestGuest
from vmctl.vm import VM
from vmctl.vm.process import qemu_binary


class _Printer:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started = time.monotonic()

    def say(self, text: str) -> None:
        self.out.write(f"[{time.monotonic() - self.started:6.2f}s] {text}\n")
        self.out.flush()

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        began = time.monotonic()
        self.say(f"==> {text}")
        yield
        self.say(f"    done in {(time.monotonic() - began) * 1000:.0f} ms")


def run_demo(out: TextIO, *, cache_dir: Path | None = None) -> int:
    printer = _Printer(out)
    if qemu_binary() is None or shutil.which("qemu-img") is None:
        printer.say("QEMU is missing: apt-get install qemu-system-x86 qemu-utils (./run.sh demo does it)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="vmctl-demo-"))
    work.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    vms: list[VM] = []
    try:
        with printer.step("building the test guest (Debian cloud kernel + busybox initramfs; cached)"):
            guest = TestGuest.ensure(cache_dir)
        with printer.step("booting two VMs under TCG (demo-a, demo-b), each with its monitor on a unix socket"):
            for name in ("demo-a", "demo-b"):
                spec = VMSpec(
                    name=name,
                    kernel=guest.kernel,
                    initrd=guest.initrd,
                    append=guest.append,
                    accel="tcg",
                    memory_mib=256,
                    shell_serial=True,
                )
                vm = VM.launch(spec, run_dir=work / name)
                vms.append(vm)
                vm.qmp.on_event(_event_printer(printer, name))
                printer.say(f"    {name}: QEMU {vm.qmp.version}, pid {vm.pid}, run dir {vm.run_dir}")
            for vm in vms:
                vm.console.wait_for(READY_MARKER, timeout=120)
                printer.say(f"    {vm.name}: guest is up ({vm.status().run_state.value})")
        first, second = vms
        _disk_round_trip(printer, first, work)
        vms[0] = _migrate(printer, first, work)
        with printer.step("pause, resume and a host reset of demo-b (an expected reset)"):
            second.pause()
            printer.say(f"    demo-b is {second.status().run_state.value}")
            second.resume()
            printer.say(f"    demo-b is {second.status().run_state.value}")
            mark = second.console.position
            second.reset()
            second.console.wait_for(READY_MARKER, timeout=120, since=mark)
            printer.say(f"    resets seen: {[('expected' if r.expected else 'unexpected') for r in second.resets]}")
        with printer.step("shutting both down through ACPI (escalating to quit/SIGTERM/SIGKILL if ignored)"):
            for vm in vms:
                result = vm.shutdown(timeout=30)
                printer.say(f"    {vm.name}: {result.method.value} in {result.seconds:.2f}s, {result.exit}")
        printer.say("demo finished")
        return 0
    except VmctlError as exc:
        printer.say(f"demo failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        for vm in vms:
            if not vm.has_exited and vm.process.poll() is None:
                vm.kill()
            vm.close()
        shutil.rmtree(work, ignore_errors=True)


def _disk_round_trip(printer: _Printer, vm: VM, work: Path) -> None:
    image = work / "data.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    with GuestShell(vm) as shell:
        with printer.step(f"hotplugging {image.name} into {vm.name} (fd passed with add-fd, no path access needed)"):
            disk = vm.hotplug_disk(image, id="data1")
            fdsets = [f["fdset-id"] for f in vm.qmp.execute("query-fdsets")]
            where = f"behind PCIe root port {disk.port}" if disk.port is not None else f"at PCI {disk.pci_addr}"
            printer.say(f"    fdsets {fdsets}, node {disk.active_node}, device {disk.id} {where}")
            device = shell.block_device("data1")
            printer.say(f"    the guest sees /dev/{device}")
        with printer.step("writing in the guest, reading back in the guest"):
            shell.run(f"echo 'hello from the guest' | dd of=/dev/{device} conv=sync,fsync 2>/dev/null", check=True)
            text = shell.run(f"dd if=/dev/{device} bs=21 count=1 2>/dev/null").output
            printer.say(f"    read back: {text!r}")
        with printer.step("unplugging data1 (waits for the guest to release it, then removes nodes and fdset)"):
            vm.unplug_disk("data1")
            left = list(block_nodes(vm.qmp))
            printer.say(
                f"    block nodes left: {left or 'none'}; fdsets left: {vm.qmp.execute('query-fdsets') or 'none'}"
            )
    raw = work / "data.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    with open(raw, "rb") as data:
        printer.say(f"    the host reads the image: {data.read(21).decode(errors='replace')!r}")
    os.unlink(raw)


def _migrate(printer: _Printer, source: VM, work: Path) -> VM:
    image = work / "carried.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    with printer.step(f"preparing {source.name} for migration: a hotplugged disk with data, 16 MB of data in RAM"):
        source.hotplug_disk(image, id="carried1")
        with GuestShell(source) as shell:
            device = shell.block_device("carried1")
            shell.run(f"echo 'written before migration' | dd of=/dev/{device} conv=sync,fsync 2>/dev/null", check=True)
            shell.run("head -c 16000000 /dev/urandom > /tmp/pattern && sha256sum /tmp/pattern > /tmp/sum", check=True)
    with printer.step(f"live-migrating {source.name} to a new QEMU (unix socket, 64 MiB/s cap to watch it go)"):
        target = VM.launch_incoming(
            source.migration_target_spec(name=f"{source.name}-migrated"),
            run_dir=work / f"{source.name}-migrated",
            inventory=source.inventory,
        )
        target.qmp.on_event(_event_printer(printer, target.name))
        try:
            # The convergence policy: this idle guest needs none of its later steps (compression, where
            # it is safe, is on from the start).
            migration = source.migrate(target, bandwidth=64 * 1024 * 1024, finish_within=120, max_downtime_ms=1000)
            result = migration.wait(300, on_progress=lambda p: printer.say("    " + _bar(p)), progress_interval=0.4)
        except BaseException:
            target.kill()
            target.close()
            raise
        printer.say(
            f"    completed: {result.total_time_ms} ms total, {result.downtime_ms} ms downtime, "
            f"escalations: {', '.join(e.change for e in result.escalations) or 'none needed'}, "
            f"{result.transferred / 1e6:.0f} MB sent; {source.name} quit, {target.name} is "
            f"{target.status().run_state.value}"
        )
    source.close()
    with printer.step(f"checking inside {target.name}: RAM and disk came along"), GuestShell(target) as shell:
        printer.say("    " + shell.run("sha256sum -c /tmp/sum").output.strip())
        text = shell.run(f"dd if=/dev/{device} bs=24 count=1 2>/dev/null").output
        printer.say(f"    the carried disk reads: {text!r}")
    return target


def _bar(progress: MigrationProgress) -> str:
    done = progress.total - progress.remaining if progress.total else 0
    fraction = done / progress.total if progress.total else 0.0
    filled = int(fraction * 30)
    eta = "ETA   --" if progress.eta_s is None else f"ETA {progress.eta_s:4.1f}s"
    throttle = f", throttled {progress.throttle_percent}%" if progress.throttle_percent else ""
    return (
        f"[{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {eta}  "
        f"sent {progress.transferred / 1e6:6.1f} MB, left {progress.remaining / 1e6:6.1f} MB, "
        f"dirtying {progress.dirty_rate / 1e6:5.1f} MB/s, pass {progress.passes}{throttle}"
    )


def _event_printer(printer: _Printer, name: str) -> Callable[[Event], None]:
    def show(event: Event) -> None:
        details = f" {dict(event.data)}" if event.data else ""
        printer.say(f"    [{name}] event {event.name}{details}")

    return show
