"""Starting a live migration of a libvirt domain to another libvirt host (peer to peer):
``LibvirtVM.migrate``, a ``MigrationRequest`` turned into libvirt's flags, parameters and XML.

The source's libvirtd connects to the target's itself (``VIR_MIGRATE_PEER2PEER``), so the caller
needs no connection to the target while it runs. The migration under way is a
``LibvirtMigration`` (:mod:`vmctl.libvirt.migration_job`). Of a ``MigrationRequest`` libvirt takes
``postcopy``, ``bandwidth``, ``downtime_limit`` and ``copy_storage``; anything else it asks for is
refused before libvirt is asked anything.

What libvirt needs:

* a disk image on a local filesystem is refused ("Migration without shared storage is unsafe")
  unless it is copied (``copy_storage``) or libvirt is told the storage is shared all the same
  (``unsafe=True``, ``VIR_MIGRATE_UNSAFE``: two hosts on one filesystem, as the tests' namespaces);
* with ``copy_storage`` (``VIR_MIGRATE_NON_SHARED_DISK``, over NBD) the target's image must exist
  at the target's path (pre-created, same virtual size): libvirt only creates a missing one in a
  storage pool of the target's that holds its directory. ``target_disks`` gives disks other paths
  on the target (``VIR_MIGRATE_PARAM_DEST_XML``);
* the console log and the shell socket are paths in the domain's XML: on a target sharing the
  source's filesystem the target's QEMU would take the shell socket's path over and truncate the
  console log while the source still runs; ``target_run_dir`` renders them (and the UEFI
  variable store) below another directory in the target's XML, live and persistent. That
  directory must exist on the target host.

After a completed migration the domain runs on the target; ``migration.target(uri)`` opens it
there as a ``LibvirtVM`` (``uri``: how the caller reaches the target's libvirtd, when that is not
the URI the source's libvirtd used). The source's domain has stopped (``persistent``: and is no
longer defined on the source).
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vmctl.errors import InvalidArgument
from vmctl.libvirt.calls import bounded
from vmctl.libvirt.devicexml import device_alias
from vmctl.libvirt.eventloop import libvirt_module
from vmctl.libvirt.migration_job import (
    LibvirtMigration,
    MigrationSource,
    Target,
    progress_from_stats,
    result_from_stats,
)
from vmctl.model.migration import MigrationRequest, check_downtime_limit
from vmctl.qmp.timeouts import check_timeout

MIB = 1 << 20

# libvirt's names (VIR_MIGRATE_PARAM_*, VIR_DOMAIN_JOB_*), as plain strings: the pure parts need no libvirt.
PARAM_BANDWIDTH = "bandwidth"
PARAM_DEST_XML = "destination_xml"
PARAM_PERSIST_XML = "persistent_xml"
#: The devices whose files (logs, sockets) are the VM's own, in its run dir.
_CHARDEVS = ("serial", "console", "channel", "parallel")


# -- the pure parts ---------------------------------------------------------------------------


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"{name} must be True or False, not {value!r}")
    return value


def bandwidth_mib(bandwidth: int | None) -> int | None:
    """``bandwidth`` (bytes per second) in libvirt's unit, whole MiB/s, rounded up (libvirt has no finer one)."""
    if bandwidth is None:
        return None
    if not isinstance(bandwidth, int) or isinstance(bandwidth, bool) or bandwidth < 1:
        raise InvalidArgument(f"bandwidth must be a positive number of bytes per second, not {bandwidth!r}")
    return math.ceil(bandwidth / MIB)


def migration_flags(libvirt: Any, *, postcopy: bool, copy_storage: bool, persistent: bool, unsafe: bool) -> int:
    """The ``VIR_MIGRATE_*`` flags of a live peer-to-peer migration with these options."""
    flags = int(libvirt.VIR_MIGRATE_PEER2PEER | libvirt.VIR_MIGRATE_LIVE)
    if postcopy:
        flags |= libvirt.VIR_MIGRATE_POSTCOPY
    if copy_storage:
        flags |= libvirt.VIR_MIGRATE_NON_SHARED_DISK
    if persistent:
        flags |= libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    if unsafe:
        flags |= libvirt.VIR_MIGRATE_UNSAFE
    return flags


def retarget_xml(
    xml: str,
    *,
    run_dir: Path | None = None,
    target_run_dir: Path | None = None,
    disks: Mapping[str, Path] | None = None,
) -> str:
    """The domain ``xml`` as the target is to run it: every path below ``run_dir`` (the console
    log, the shell socket, the UEFI variable store) moved below ``target_run_dir``, and the image of
    each disk in ``disks`` (vmctl id -> path) replaced by that path (its backing chain is dropped:
    the target's libvirt reads the target image's own). ``InvalidArgument`` for a disk it lacks."""
    domain = ET.fromstring(xml)
    if run_dir is not None and target_run_dir is not None:

        def moved(value: str) -> str | None:
            path = Path(value)
            return str(target_run_dir / path.relative_to(run_dir)) if path.is_relative_to(run_dir) else None

        for kind in _CHARDEVS:  # not a disk: an image in the run dir is the same image on shared storage
            for device in domain.iterfind(f"devices/{kind}"):
                for element in device.iter():
                    for key in ("path", "file"):
                        value = element.get(key)
                        if value is not None and (new := moved(value)) is not None:
                            element.set(key, new)
        nvram = domain.find("os/nvram")
        if nvram is not None and nvram.text and (new := moved(nvram.text.strip())) is not None:
            nvram.text = new
    wanted = {device_alias(id): (id, Path(path)) for id, path in (disks or {}).items()}
    found: set[str] = set()
    for disk in domain.iterfind("devices/disk"):
        alias = disk.find("alias")
        name = alias.get("name", "") if alias is not None else ""
        if name not in wanted:
            continue
        source = disk.find("source")
        if disk.get("type") != "file" or source is None:
            raise InvalidArgument(f"disk {wanted[name][0]} is not a file image: it cannot be given another path")
        source.attrib = {"file": str(wanted[name][1])}
        for chain in disk.findall("backingStore"):
            disk.remove(chain)
        found.add(name)
    if missing := sorted(wanted[alias][0] for alias in set(wanted) - found):
        raise InvalidArgument(f"the domain has no disk {', '.join(missing)} (target_disks names vmctl disk ids)")
    return ET.tostring(domain, encoding="unicode")


#: What of a ``MigrationRequest`` libvirt takes; any other field away from its default is refused.
_TAKEN = frozenset({"postcopy", "bandwidth", "downtime_limit", "copy_storage"})


def start_migration(
    vm: MigrationSource[Target],
    target_uri: str,
    request: MigrationRequest,
    *,
    persistent: bool = True,
    unsafe: bool = False,
    target_run_dir: str | os.PathLike[str] | None = None,
    target_disks: Mapping[str, str | os.PathLike[str]] | None = None,
    timeout: float = 30.0,
) -> LibvirtMigration[Target]:
    """Start migrating ``vm`` live to the libvirt host ``target_uri`` as ``request`` asks (see
    ``LibvirtVM.migrate``). Everything is checked before libvirt is asked anything that changes the domain."""
    if not isinstance(target_uri, str) or "://" not in target_uri:
        raise InvalidArgument(f"target_uri must be a libvirt URI such as qemu+tcp://host/system, not {target_uri!r}")
    unsupported = [
        field.name
        for field in attrs.fields(MigrationRequest)
        if field.name not in _TAKEN and getattr(request, field.name) != field.default
    ]
    if unsupported:
        raise InvalidArgument(f"a libvirt migration does not take {', '.join(unsupported)}")
    _flag(persistent, "persistent")
    _flag(unsafe, "unsafe")
    check_timeout(timeout, "timeout")
    postcopy, copy_storage = request.postcopy, request.copy_storage
    mib = bandwidth_mib(request.bandwidth)
    downtime = check_downtime_limit(request.downtime_limit)
    if postcopy and copy_storage:
        raise InvalidArgument("libvirt cannot combine postcopy with copying storage (copy_storage)")
    if target_disks is not None and not copy_storage:
        raise InvalidArgument("target_disks gives copied disks their target paths: it needs copy_storage=True")
    if target_disks is not None and not isinstance(target_disks, Mapping):
        raise InvalidArgument(f"target_disks must map disk ids to paths, not {type(target_disks).__name__}")
    disks = {id: Path(path).absolute() for id, path in (target_disks or {}).items()}
    if target_run_dir is not None and vm.known_run_dir is None:
        raise InvalidArgument(f"{vm.name}: no run_dir is known to move from (open it with run_dir=...)")
    run_dir = vm.known_run_dir.absolute() if target_run_dir is not None and vm.known_run_dir else None
    target_dir = Path(target_run_dir).absolute() if target_run_dir is not None else None
    if target_dir is not None and target_dir == run_dir:
        target_dir = run_dir = None  # the same paths: nothing to render
    libvirt = libvirt_module()
    flags = migration_flags(libvirt, postcopy=postcopy, copy_storage=copy_storage, persistent=persistent, unsafe=unsafe)
    params: dict[str, Any] = {}
    if mib is not None:
        params[PARAM_BANDWIDTH] = mib
    if target_dir is not None or disks:
        live = bounded(f"{vm.name}: XMLDesc", timeout, vm.domain.XMLDesc, libvirt.VIR_DOMAIN_XML_MIGRATABLE)
        params[PARAM_DEST_XML] = retarget_xml(live, run_dir=run_dir, target_run_dir=target_dir, disks=disks)
        if persistent:
            config = bounded(
                f"{vm.name}: XMLDesc",
                timeout,
                vm.domain.XMLDesc,
                libvirt.VIR_DOMAIN_XML_MIGRATABLE | libvirt.VIR_DOMAIN_XML_INACTIVE,
            )
            params[PARAM_PERSIST_XML] = retarget_xml(config, run_dir=run_dir, target_run_dir=target_dir, disks=disks)
    if not bounded(f"{vm.name}: isActive", timeout, vm.domain.isActive):
        raise InvalidArgument(f"{vm.name} is not running: only a running domain migrates live")
    if downtime is not None:
        # No migrateToURI3 parameter for it: set on the source's QEMU, which the migration then uses.
        bounded(f"{vm.name}: set downtime {downtime} ms", timeout, vm.domain.migrateSetMaxDowntime, downtime, 0)
    return LibvirtMigration(vm, target_uri, flags=flags, params=params, postcopy=postcopy, target_run_dir=target_dir)


__all__ = [
    "MIB",
    "LibvirtMigration",
    "bandwidth_mib",
    "check_downtime_limit",
    "migration_flags",
    "progress_from_stats",
    "result_from_stats",
    "retarget_xml",
    "start_migration",
]
