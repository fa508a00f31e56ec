"""A real Debian 12 guest for tests: systemd, udev, qemu-guest-agent and the cloud kernel on an
ext4 root, booted by OVMF and systemd-boot from a GPT disk of its own. Built once, and cached.

Everything comes from Debian packages: ``mmdebstrap`` makes the root (a minbase variant plus
``PACKAGES``), ``mke2fs -d`` turns that directory into an ext4 partition, ``mkfs.vfat`` and
``mcopy`` make the EFI system partition (systemd-boot as ``\\EFI\\BOOT\\BOOTX64.EFI``, OVMF's
removable-media fallback, a loader entry, the kernel and initrd), ``sfdisk`` writes the GPT on a
plain file, ``dd`` puts both partitions in place and ``qemu-img convert`` makes it a qcow2. Nothing
is loop-mounted. The build runs as root (mmdebstrap's root mode keeps the files' owners, which
``mke2fs -d`` copies).

The image is never written by a test: boot an overlay of it (``DebianGuest.overlay``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Final

import attrs

from vmctl.logs import get_logger
from vmctl.testing.cache import cached_build
from vmctl.testing.guest import GuestBuildError, _run

log = get_logger(__name__)

SUITE: Final = "bookworm"
#: Installed on top of mmdebstrap's minbase variant (Essential and apt), without recommends.
PACKAGES: Final = (
    "systemd",
    "systemd-sysv",
    "udev",
    # systemd-logind needs the system bus, and logind is what turns the ACPI power button into a
    # poweroff; without dbus it fails (a degraded system) and the guest ignores the button.
    "dbus",
    "linux-image-cloud-amd64",
    "zstd",  # initramfs-tools' compressor (without it, it falls back to gzip and says so)
    "qemu-guest-agent",
    "iproute2",
    "e2fsprogs",
    "util-linux",
    "kmod",
    "systemd-boot-efi",  # only its EFI binary is used: it goes onto the EFI system partition
)
#: Paths dpkg never unpacks: documentation, manual pages and translations nobody reads in a test.
DPKG_OPTIONS: Final = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/lintian/*",
)
#: Sizes in MiB. The GPT takes the first MiB and the last one (its backup); the partitions' free
#: space costs nothing in the qcow2, which holds only the blocks written.
ESP_MIB: Final = 64
ROOT_MIB: Final = 1024
MIB: Final = 1 << 20
SECTOR: Final = 512
ESP_OFFSET: Final = MIB
ROOT_OFFSET: Final = ESP_OFFSET + ESP_MIB * MIB
DISK_BYTES: Final = ROOT_OFFSET + ROOT_MIB * MIB + MIB
ESP_TYPE: Final = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ROOT_TYPE: Final = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"  # "Linux root (x86-64)"
MERGED_USR_HOOKS: Final = "/usr/share/mmdebstrap/hooks/merged-usr"  # comes with mmdebstrap
SYSTEMD_BOOT: Final = "usr/lib/systemd/boot/efi/systemd-bootx64.efi"
HOSTNAME: Final = "vmctl-debian"
#: The kernel's options besides ``root=``. ``rw``: the root is mounted writable at once, so neither
#: the initramfs nor systemd runs fsck on it (it was just made). ``systemd.gpt_auto=0``: the root
#: partition has the discoverable root type and the ESP sits beside it; the generator would mount
#: the ESP at /boot or /efi, which nothing here wants (and the agent's freeze would see it).
KERNEL_OPTIONS: Final = "rw console=ttyS0 systemd.gpt_auto=0"
#: Units that would run housekeeping in the middle of a test (timers that fire after boot) or
#: at boot for nothing (e2scrub_reap looks for LVM snapshots).
MASKED_UNITS: Final = (
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
    "fstrim.timer",
)

# Written into the root after mmdebstrap; "{...}" fields are filled from the recipe's ids.
_FILES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "etc/fstab": "PARTUUID={root_partuuid} / ext4 rw,errors=remount-ro 0 1\n",
        "etc/hostname": HOSTNAME + "\n",
        "etc/hosts": f"127.0.0.1 localhost\n127.0.1.1 {HOSTNAME}\n::1 localhost ip6-localhost ip6-loopback\n",
        # A fixed machine id: with none systemd would treat every boot as the first one and apply
        # the unit presets (enabling units nobody asked for).
        "etc/machine-id": "{machine_id}\n",
        # The serial console is root's shell: no password to type in a test, and one to look
        # around in when a test fails (the console is in the VM's log).
        "etc/systemd/system/serial-getty@ttyS0.service.d/autologin.conf": (
            "[Service]\n"
            "ExecStart=\n"
            "ExecStart=-/sbin/agetty --autologin root --noclear --keep-baud 115200,57600,38400,9600 - $TERM\n"
        ),
        # The journal in memory: nothing for it to write while the agent holds the root frozen,
        # and a test guest's journal has no later boot to be read in.
        "etc/systemd/journald.conf.d/vmctl.conf": "[Journal]\nStorage=volatile\nRuntimeMaxUse=32M\n",
        # Every request the agent reads, and its freeze and thaw, go to its stderr: the journal.
        "etc/qemu/qemu-ga.conf": "[general]\nverbose=true\n",
    }
)

_LOADER_CONF: Final = "default debian.conf\ntimeout 0\neditor no\n"
_LOADER_ENTRY: Final = (
    "title Debian 12 (vmctl test guest)\nlinux /vmlinuz\ninitrd /initrd.img\noptions root=PARTUUID={root_partuuid} "
    + KERNEL_OPTIONS
    + "\n"
)
#: Bumped when the build steps (the code below) change what they make.
_BUILD_VERSION: Final = 2


def recipe() -> str:
    """The recipe's content hash: every package, option, file and size that goes into the image."""
    parts = {
        "suite": SUITE,
        "packages": PACKAGES,
        "dpkg": DPKG_OPTIONS,
        "hooks": MERGED_USR_HOOKS,
        "sizes": (ESP_MIB, ROOT_MIB),
        "kernel": KERNEL_OPTIONS,
        "masked": MASKED_UNITS,
        "files": dict(_FILES),
        "loader": (_LOADER_CONF, _LOADER_ENTRY),
        "build": _BUILD_VERSION,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


@attrs.frozen(kw_only=True)
class Ids:
    """The image's identifiers, derived from its recipe (a rebuild of the same recipe has the same)."""

    disk_guid: str
    esp_partuuid: str
    root_partuuid: str
    root_fs_uuid: str
    esp_volume_id: str
    machine_id: str

    @classmethod
    def of(cls, recipe: str) -> Ids:
        def named(name: str) -> uuid.UUID:
            return uuid.uuid5(uuid.NAMESPACE_URL, f"vmctl-debian-guest:{recipe}:{name}")

        return cls(
            disk_guid=str(named("disk")),
            esp_partuuid=str(named("esp")),
            root_partuuid=str(named("root")),
            root_fs_uuid=str(named("rootfs")),
            esp_volume_id=named("esp-volume").hex[:8],
            machine_id=named("machine-id").hex,
        )


def partition_table(ids: Ids) -> str:
    """The GPT as ``sfdisk`` reads it: the ESP from 1 MiB, the root right after it."""
    esp, root = ESP_OFFSET // SECTOR, ROOT_OFFSET // SECTOR
    return (
        "label: gpt\n"
        f"label-id: {ids.disk_guid}\n"
        "unit: sectors\n"
        f"first-lba: {esp}\n"
        f"start={esp}, size={ESP_MIB * MIB // SECTOR}, type={ESP_TYPE}, uuid={ids.esp_partuuid}, name=esp\n"
        f"start={root}, size={ROOT_MIB * MIB // SECTOR}, type={ROOT_TYPE}, uuid={ids.root_partuuid}, name=root\n"
    )


def root_files(ids: Ids) -> dict[str, str]:
    """The files written into the root after mmdebstrap: path (relative to /) -> text."""
    return {path: text.format(**attrs.asdict(ids)) for path, text in _FILES.items()}


def loader_entry(ids: Ids) -> str:
    """systemd-boot's entry: the kernel and initrd on the ESP, the root by its partition's UUID."""
    return _LOADER_ENTRY.format(**attrs.asdict(ids))


@attrs.frozen(kw_only=True)
class DebianGuest:
    """A bootable Debian disk image (qcow2). Boot an ``overlay`` of it with
    ``VMSpec(firmware="uefi", machine="q35", disks=[DiskSpec(id=..., path=overlay)])``."""

    __test__ = False  # not a pytest test class

    #: The cached image; read-only: tests write overlays on it.
    image: Path
    #: Where the ext4 root starts in the disk, in bytes (to read it on the host).
    root_offset: int
    root_partuuid: str
    root_fs_uuid: str

    @classmethod
    def ensure(cls, cache_dir: str | os.PathLike[str] | None = None) -> DebianGuest:
        """Build the image unless a build of the same recipe is cached; safe across processes."""
        digest = recipe()
        ids = Ids.of(digest)
        target = cached_build(
            cache_dir,
            kind="debian-guest",
            recipe=digest,
            products=("disk.qcow2",),
            build=lambda root, target: _build(root, target, ids),
        )
        return cls(
            image=target / "disk.qcow2",
            root_offset=ROOT_OFFSET,
            root_partuuid=ids.root_partuuid,
            root_fs_uuid=ids.root_fs_uuid,
        )

    def overlay(self, path: str | os.PathLike[str]) -> Path:
        """A new qcow2 at ``path`` whose backing file is the image: what a VM boots from and writes to."""
        path = Path(path)
        _run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(self.image), str(path))
        return path


def _build(root: Path, target: Path, ids: Ids) -> None:
    if os.geteuid() != 0:
        raise GuestBuildError("the Debian test guest is built as root (mmdebstrap's root mode): run ./run.sh setup")
    for tool, package in (
        ("mmdebstrap", "mmdebstrap"),
        ("mkfs.vfat", "dosfstools"),
        ("mcopy", "mtools"),
        ("sfdisk", "fdisk"),
        ("mke2fs", "e2fsprogs"),
        ("qemu-img", "qemu-utils"),
        ("unshare", "util-linux"),
    ):
        if shutil.which(tool) is None:
            raise GuestBuildError(f"{tool} is needed to build the Debian test guest: apt-get install {package}")
    started = time.monotonic()
    log.info("debian_guest.build", target=str(target))
    # A build killed half-way left its scratch directory; none runs now (the lock is ours). No
    # mount is left in one: mmdebstrap's were in a mount namespace that died with it.
    for stale in root.glob(".build-debian-*"):
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build-debian-") as scratch:
        work = Path(scratch)
        tree = work / "root"
        _bootstrap(work, tree)
        _configure(tree, ids)
        esp = work / "esp.img"
        kernel, initrd = _boot_files(tree)
        _make_esp(esp, tree, ids)
        # The firmware boots the copies on the ESP; the root's would be 27 MB nobody reads.
        kernel.unlink()
        initrd.unlink()
        rootfs = work / "root.img"
        # The root's ext4, with the tree as its content: mke2fs copies owners, modes and links.
        _run(
            "mke2fs", "-q", "-t", "ext4", "-L", "root", "-U", ids.root_fs_uuid,
            "-d", str(tree), str(rootfs), f"{ROOT_MIB}M",
        )  # fmt: skip
        disk = work / "disk.raw"
        with open(disk, "wb") as raw:
            raw.truncate(DISK_BYTES)
        _sfdisk(disk, partition_table(ids))
        for image, offset in ((esp, ESP_OFFSET), (rootfs, ROOT_OFFSET)):
            # sparse: the partitions' unused blocks stay holes, which qemu-img leaves out of the qcow2.
            seek = f"seek={offset // MIB}"
            _run("dd", f"if={image}", f"of={disk}", "bs=1M", seek, "conv=notrunc,sparse", "status=none")
        staging = work / "guest"
        staging.mkdir(mode=0o755)
        # Compressed: 100 MB instead of 280; booting from it was no slower (QEMU inflates a cluster
        # once per read, the guest reads little of the image).
        _run("qemu-img", "convert", "-c", "-O", "qcow2", str(disk), str(staging / "disk.qcow2"))
        # QEMU, as its unprivileged user, opens the image by path as its overlays' backing file;
        # nobody writes it.
        (staging / "disk.qcow2").chmod(0o444)
        facts = {"recipe": target.name, "kernel": kernel.name.removeprefix("vmlinuz-"), "packages": PACKAGES}
        (staging / "build.json").write_text(json.dumps(facts, indent=1) + "\n")
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        os.rename(staging, target)
    log.info(
        "debian_guest.built",
        target=str(target),
        seconds=round(time.monotonic() - started, 1),
        bytes=(target / "disk.qcow2").stat().st_size,
    )


def _bootstrap(work: Path, tree: Path) -> None:
    """The root directory, by mmdebstrap. It runs in a mount namespace of its own: the /proc,
    /sys and /dev it mounts in the chroot go with it, also if it dies half-way (a cleanup would
    otherwise delete through a mount left behind)."""
    command = [
        "unshare", "--mount", "--propagation", "private",
        "mmdebstrap", "--mode=root", "--format=directory", "--variant=minbase",
        f"--include={','.join(PACKAGES)}",
        *(f"--dpkgopt={option}" for option in DPKG_OPTIONS),
        "--aptopt=Acquire::Retries \"3\"",
        # The merged /usr made as debootstrap makes it (directory symlinks, and usr-is-merged):
        # else the Essential init-system-helpers' "usrmerge | usr-is-merged" installs usrmerge,
        # which brings perl (75 MB).
        f"--hook-dir={MERGED_USR_HOOKS}",
        SUITE, str(tree),
    ]  # fmt: skip
    with open(work / "mmdebstrap.log", "w+") as output:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, timeout=1800, check=False
        )
        if result.returncode != 0:
            output.seek(0)
            tail = output.read()[-4000:]
            raise GuestBuildError(f"mmdebstrap failed (exit {result.returncode}):\n{tail}")


def _configure(tree: Path, ids: Ids) -> None:
    for relative, text in root_files(ids).items():
        path = tree / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for unit in MASKED_UNITS:
        link = tree / "etc/systemd/system" / unit
        link.unlink(missing_ok=True)
        link.symlink_to("/dev/null")
    # mmdebstrap copied the host's resolver configuration; this guest has no network to resolve on.
    (tree / "etc/resolv.conf").unlink(missing_ok=True)


def _boot_files(tree: Path) -> tuple[Path, Path]:
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestBuildError(f"expected one kernel in the guest's /boot, found {[k.name for k in kernels]}")
    initrd = tree / "boot" / ("initrd.img-" + kernels[0].name.removeprefix("vmlinuz-"))
    if not initrd.exists():
        raise GuestBuildError(f"the kernel's postinst made no {initrd.name}")
    return kernels[0], initrd


def _make_esp(esp: Path, tree: Path, ids: Ids) -> None:
    kernel, initrd = _boot_files(tree)
    loader = tree / SYSTEMD_BOOT
    if not loader.exists():
        raise GuestBuildError(f"systemd-boot-efi did not install /{SYSTEMD_BOOT}")
    with open(esp, "wb") as image:
        image.truncate(ESP_MIB * MIB)
    _run("mkfs.vfat", "-n", "ESP", "-i", ids.esp_volume_id, str(esp))
    entry = esp.parent / "debian.conf"
    entry.write_text(loader_entry(ids))
    conf = esp.parent / "loader.conf"
    conf.write_text(_LOADER_CONF)
    _run("mmd", "-i", str(esp), "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries")
    for source, destination in (
        (loader, "::/EFI/BOOT/BOOTX64.EFI"),
        (conf, "::/loader/loader.conf"),
        (entry, "::/loader/entries/debian.conf"),
        (kernel, "::/vmlinuz"),
        (initrd, "::/initrd.img"),
    ):
        _run("mcopy", "-i", str(esp), str(source), destination)


def _sfdisk(disk: Path, table: str) -> None:
    result = subprocess.run(
        ["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(disk)],
        input=table, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise GuestBuildError(f"sfdisk failed: {result.stderr.strip()}")
