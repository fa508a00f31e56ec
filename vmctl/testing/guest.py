"""The tiny test guest: a Debian cloud kernel and a busybox initramfs, built once and cached.

It boots under TCG in a few seconds, loads the virtio modules, prints ``READY_MARKER`` on the
first serial port and serves a command shell (see :mod:`vmctl.testing.shell`) on the second.
Everything comes from Debian packages fetched with ``apt-get download`` (no root needed) and
unpacked with ``dpkg-deb -x``; the initramfs is written by :mod:`vmctl.testing.cpio`.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import attrs

from vmctl.errors import VmctlError
from vmctl.logs import get_logger
from vmctl.testing.cache import cached_build
from vmctl.testing.cpio import NewcArchive

log = get_logger(__name__)

READY_MARKER = "VMCTL-GUEST-READY"
#: Loaded in this order (each needs the ones before it).
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_balloon",
    "virtio_console",
    "virtio_mem",
    "pvpanic",
    "pvpanic-mmio",
    "scsi_common",
    "scsi_mod",
    "virtio_scsi",
    "sd_mod",
    "button",
    "evdev",
)
#: Loaded only when UEFI booted the guest.
EFI_MODULES = ("efivarfs",)
KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
AGENT_PACKAGE = "qemu-guest-agent"
AGENT_LOG = "/tmp/qemu-ga.log"
KERNEL_APPEND = "console=ttyS0 loglevel=3 panic=-1"

_INIT = f"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /tmp /run /mnt
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
for module in {" ".join(MODULES)}; do
    insmod /lib/modules/$module.ko || echo "vmctl-guest: insmod $module failed"
done
# Booted by UEFI: its variables, as a Linux host shows them.
if [ -d /sys/firmware/efi ]; then
    for module in {" ".join(EFI_MODULES)}; do insmod /lib/modules/$module.ko; done
    mount -t efivarfs efivarfs /sys/firmware/efi/efivars
fi
# Hotplugged memory comes online by itself (there is no udev here), movable so it can be unplugged.
echo online_movable > /sys/devices/system/memory/auto_online_blocks 2>/dev/null
# ACPI power button -> power off, unless the test wants a guest that ignores it.
if ! grep -q vmctl.noacpi /proc/cmdline; then
    for event in /dev/input/event*; do
        [ -e "$event" ] && (dd if="$event" of=/dev/null bs=24 count=1 2>/dev/null; poweroff -f) &
    done
fi
# The guest agent, on its virtio-serial port when the VM has one (its ports come up just after
# the driver binds, so wait a little for them; a VM without a virtio-serial device waits not at all).
if [ -n "$(ls /sys/bus/virtio/drivers/virtio_console/ 2>/dev/null | grep virtio)" ]; then
    for i in $(seq 30); do
        for port in /sys/class/virtio-ports/*; do
            if [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ]; then
                /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${{port##*/}}" -v -l {AGENT_LOG} \
                    -f /run/qemu-ga.pid -t /run &
                break 2
            fi
        done
        sleep 0.1
    done
fi
# Hold the shell port open for good: the 8250 driver empties the UART's FIFO whenever the port is
# opened after having been closed, which would eat a command the host sent in between.
exec 3<>/dev/ttyS1
stty -F /dev/ttyS1 raw -echo 115200
(while :; do /bin/vmctl-shell </dev/ttyS1 >/dev/ttyS1 2>&1; sleep 0.2; done) &
echo {READY_MARKER}
while :; do sleep 3600; done
"""

# One command per line: "<id> <base64 of the script>"; the answer is framed with the id and
# carries the output in base64 so that any bytes survive the serial line.
_SHELL = """#!/bin/sh
while read -r id encoded; do
    [ -n "$id" ] || continue
    echo "$encoded" | base64 -d > /tmp/.vmctl-cmd
    sh /tmp/.vmctl-cmd > /tmp/.vmctl-out 2>&1 </dev/null
    status=$?
    echo "VMCTL-BEGIN $id"
    base64 /tmp/.vmctl-out
    echo "VMCTL-END $id $status"
done
"""

# What qemu-ga runs to power the guest off (a distribution's shutdown(8), for busybox).
_SHUTDOWN = """#!/bin/sh
case " $* " in
    *" -r "*) exec reboot -f ;;
    *" -H "*) exec halt -f ;;
    *) exec poweroff -f ;;
esac
"""

_RECIPE = hashlib.sha256((_INIT + _SHELL + _SHUTDOWN + KERNEL_APPEND + AGENT_PACKAGE).encode()).hexdigest()[:12]


class GuestBuildError(VmctlError):
    """The test guest could not be built (missing tool, package or network)."""


@attrs.frozen(kw_only=True)
class TestGuest:
    """A bootable test guest: pass ``kernel``, ``initrd`` and ``append`` to a VM spec."""

    __test__ = False  # not a pytest test class

    kernel: Path
    initrd: Path
    append: str

    @classmethod
    def ensure(cls, cache_dir: str | os.PathLike[str] | None = None) -> TestGuest:
        """Build the guest unless a build of the same recipe is cached; safe across processes."""
        target = cached_build(
            cache_dir, kind="test-guest", recipe=_RECIPE, products=("vmlinuz", "initrd.gz"), build=_build
        )
        return cls(kernel=target / "vmlinuz", initrd=target / "initrd.gz", append=KERNEL_APPEND)


def _run(*command: str, cwd: Path | None = None) -> str:
    if shutil.which(command[0]) is None:
        raise GuestBuildError(f"{command[0]} is needed to build the test guest (it comes with apt/dpkg)")
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise GuestBuildError(f"{' '.join(command)} failed: {result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def kernel_package() -> str:
    """The versioned kernel package that the cloud kernel meta-package points to."""
    output = _run("apt-cache", "depends", KERNEL_META_PACKAGE)
    for line in output.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise GuestBuildError(
        f"apt knows no {KERNEL_META_PACKAGE}: run `apt-get update` (the package lists may be missing)"
    )


def _build(root: Path, target: Path) -> None:
    log.info("test_guest.build", target=str(target))
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-") as scratch:
        work = Path(scratch)
        packages = [kernel_package(), BUSYBOX_PACKAGE, AGENT_PACKAGE]
        _run("apt-get", "download", *packages, cwd=work)
        unpacked = work / "root"
        for deb in sorted(work.glob("*.deb")):
            _run("dpkg-deb", "-x", str(deb), str(unpacked))
        kernels = sorted((unpacked / "boot").glob("vmlinuz-*"))
        busybox = unpacked / "bin" / "busybox"
        if not kernels or not busybox.exists():
            raise GuestBuildError(f"the packages {packages} did not contain a kernel and busybox")
        archive = NewcArchive()
        archive.file("init", _INIT.encode(), mode=0o755)
        archive.file("bin/busybox", busybox.read_bytes(), mode=0o755)
        archive.file("bin/vmctl-shell", _SHELL.encode(), mode=0o755)
        archive.file("sbin/shutdown", _SHUTDOWN.encode(), mode=0o755)
        archive.symlink("sbin/hwclock", "/bin/busybox")
        archive.symlink("var/run", "/run")
        agent = unpacked / "usr" / "sbin" / "qemu-ga"
        archive.file("usr/sbin/qemu-ga", agent.read_bytes(), mode=0o755)
        for library in shared_libraries(agent):
            archive.file(str(library).lstrip("/"), library.read_bytes(), mode=0o755)
        archive.char_device("dev/console", 5, 1)
        archive.char_device("dev/null", 1, 3, mode=0o666)
        for module in (*MODULES, *EFI_MODULES):
            archive.file(f"lib/modules/{module}.ko", _module_bytes(unpacked, module))
        staging = work / "guest"
        staging.mkdir()
        shutil.copyfile(kernels[-1], staging / "vmlinuz")
        with open(staging / "initrd.gz", "wb") as initrd:
            archive.write_gzip(initrd)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    log.info("test_guest.built", target=str(target), kernel=kernels[-1].name)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries ``binary`` loads (the dynamic loader included), as ``ldd`` finds
    them on this host, by the paths the loader asks for."""
    found: list[Path] = []
    for line in _run("ldd", str(binary)).splitlines():
        words = line.split()
        if "not found" in line:
            raise GuestBuildError(f"{binary.name} needs {words[0]}, which this host lacks (install it with apt)")
        if "=>" in words and len(words) > words.index("=>") + 1 and words[words.index("=>") + 1].startswith("/"):
            found.append(Path(words[words.index("=>") + 1]))
        elif words and words[0].startswith("/"):
            found.append(Path(words[0]))  # the loader, by its absolute name
    return found


def _module_bytes(unpacked: Path, module: str) -> bytes:
    for suffix in (".ko", ".ko.xz"):
        found = sorted((unpacked / "lib" / "modules").rglob(module + suffix))
        if found:
            data = found[0].read_bytes()
            return lzma.decompress(data) if suffix == ".ko.xz" else data
    raise GuestBuildError(f"kernel module {module} is not in the kernel package")
