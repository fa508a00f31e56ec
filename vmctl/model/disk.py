"""A disk: one value from launch through hotplug, attach and migration, and the arguments it renders.

Its block nodes and its device are rendered here, once, as QMP dictionaries: the command line
passes them as JSON (``-blockdev {...}``, ``-device {...}``) and hotplug passes the same
dictionaries to ``blockdev-add`` and ``device_add``, so a disk plugged at boot and the same disk
hotplugged get identical properties. Only the image's filename differs: a path at boot, the
fdset vmctl passed its image in (``/dev/fdset/N``) when hotplugged.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final, Literal, TypedDict

import attrs

from vmctl.errors import InvalidArgument, SpecError
from vmctl.model.names import SCSI_CONTROLLER, disk_node_names, secret_object_id
from vmctl.model.pcie import check_port, device_bus
from vmctl.model.secret import Secret
from vmctl.model.validate import check_id, check_pci_addr, path_text

if TYPE_CHECKING:
    from typing_extensions import Unpack

DiskFormat = Literal["qcow2", "raw"]
DiskBus = Literal["virtio-blk", "scsi"]
CacheMode = Literal["writeback", "none", "writethrough", "directsync", "unsafe"]
Aio = Literal["threads", "native", "io_uring"]
#: What the format layer does with a write of zeroes: nothing special (``off``), writes it as a
#: zero cluster (``on``), or also frees the space under it (``unmap``, which needs ``discard``).
DetectZeroes = Literal["off", "on", "unmap"]
DETECT_ZEROES: Final = ("off", "on", "unmap")
#: A failed read or write: ``stop`` pauses the guest (``vm.resume()`` retries it), ``report``
#: passes the error to the guest, ``ignore`` drops it, ``enospc`` stops on a full host disk and
#: reports anything else.
ErrorPolicy = Literal["stop", "report", "ignore", "enospc"]
ERROR_POLICIES: Final = ("stop", "report", "ignore", "enospc")

#: mode -> (cache.direct, cache.no-flush, the device's write-cache), as QEMU's -drive cache= means it.
CACHE_MODES: Final[Mapping[str, tuple[bool, bool, bool]]] = MappingProxyType(
    {
        "writeback": (False, False, True),
        "none": (True, False, True),
        "writethrough": (False, False, False),
        "directsync": (True, False, False),
        "unsafe": (False, True, True),
    }
)
AIO_MODES: Final = ("threads", "native", "io_uring")


@attrs.frozen(kw_only=True)
class Throttle:
    """I/O limits for a disk (``block_set_io_throttle``); 0 means unlimited."""

    bps: int = 0
    bps_rd: int = 0
    bps_wr: int = 0
    iops: int = 0
    iops_rd: int = 0
    iops_wr: int = 0

    def __attrs_post_init__(self) -> None:
        for name, value in attrs.asdict(self).items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise InvalidArgument(f"throttle {name} must be a whole number >= 0, not {value!r}")
        if (self.bps and (self.bps_rd or self.bps_wr)) or (self.iops and (self.iops_rd or self.iops_wr)):
            raise InvalidArgument("a total limit cannot be combined with read/write limits of the same kind")

    @property
    def unlimited(self) -> bool:
        return not any(attrs.astuple(self))

    def arguments(self) -> dict[str, int]:
        return attrs.asdict(self)

    @classmethod
    def from_qmp(cls, info: Mapping[str, Any]) -> Throttle:
        """From a ``query-block`` inserted-image entry."""
        return cls(**{name: int(info.get(name, 0)) for name in attrs.fields_dict(cls)})


@attrs.frozen(kw_only=True)
class Overlay:
    """A qcow2 layer on top of a disk's base image (an external snapshot)."""

    layer: int
    path: str = attrs.field(converter=path_text)


def _overlays(value: Iterable[Overlay | Mapping[str, Any]]) -> tuple[Overlay, ...]:
    return tuple(o if isinstance(o, Overlay) else Overlay(**o) for o in value)


def _throttle(value: Throttle | Mapping[str, Any] | None) -> Throttle | None:
    if value is None or isinstance(value, Throttle):
        return None if value is None or value.unlimited else value
    throttle = Throttle(**value)
    return None if throttle.unlimited else throttle


@attrs.frozen(kw_only=True)
class DiskSpec:
    """A disk. ``cache``, ``aio`` and ``throttle`` hold from boot (or hotplug) on, are kept in the
    inventory when changed at run time, and go with the disk to a migration target."""

    id: str
    path: str = attrs.field(converter=path_text)
    format: DiskFormat = "qcow2"
    read_only: bool = False
    bus: DiskBus = "virtio-blk"
    cache: CacheMode = "writeback"
    aio: Aio = "threads"
    throttle: Throttle | None = attrs.field(default=None, converter=_throttle)
    discard: bool = False  # pass the guest's discards (TRIM) down to the image
    detect_zeroes: DetectZeroes = "off"
    on_error: ErrorPolicy | None = None  # what a failed read or write does (None: QEMU's default, enospc)
    port: int | None = None  # its PCIe root port on q35 (chosen at launch or hotplug)
    pci_addr: str | None = None  # on a plain PCI bus: pinned so that a migration target lays it out alike
    base_layer: int = 0  # the layer number of ``path`` (not 0 once a stream or mirror replaced it)
    overlays: tuple[Overlay, ...] = attrs.field(default=(), converter=_overlays)  # bottom to top
    #: The passphrase of a LUKS-encrypted qcow2 image (every layer of the chain, overlays vmctl
    #: makes included). QEMU gets it encrypted with the VM's master key, never in clear.
    encryption: Secret | None = None

    def __attrs_post_init__(self) -> None:
        check_id("disk", self.id, max_length=20)  # node names derived from it must fit QEMU's 31
        if re.search(r"-o\d+$", self.id):
            raise SpecError(f"disk id {self.id!r} must not end in -o<number> (that names snapshot layers)")
        check_pci_addr(self.id, self.pci_addr)
        check_port(self.id, self.port, self.pci_addr)
        if self.bus == "scsi" and (self.port is not None or self.pci_addr is not None):
            raise SpecError(f"disk {self.id}: a SCSI disk sits on the SCSI controller, not on a PCI slot")
        if self.on_error not in (None, *ERROR_POLICIES):
            raise SpecError(
                f"disk {self.id}: on_error must be one of {', '.join(ERROR_POLICIES)}, not {self.on_error!r}"
            )
        if not isinstance(self.discard, bool):
            raise SpecError(f"disk {self.id}: discard must be True or False, not {self.discard!r}")
        if self.detect_zeroes not in DETECT_ZEROES:
            raise SpecError(
                f"disk {self.id}: detect_zeroes must be one of {', '.join(DETECT_ZEROES)}, not {self.detect_zeroes!r}"
            )
        if self.detect_zeroes == "unmap" and not self.discard:
            raise SpecError(f"disk {self.id}: detect_zeroes='unmap' frees space, which needs discard=True")
        if self.format not in ("qcow2", "raw"):
            raise SpecError(f"disk {self.id}: format must be qcow2 or raw, not {self.format!r}")
        if self.bus not in ("virtio-blk", "scsi"):
            raise SpecError(f"disk {self.id}: bus must be virtio-blk or scsi, not {self.bus!r}")
        if not self.path:
            raise SpecError(f"disk {self.id}: the image path is empty")
        if self.encryption is not None and not isinstance(self.encryption, Secret):
            raise SpecError(
                f"disk {self.id}: encryption is a vmctl.Secret (its passphrase), not {type(self.encryption)}"
            )
        if self.encryption is not None and self.format != "qcow2":
            raise SpecError(f"disk {self.id}: encryption is for qcow2 images (LUKS inside qcow2), not {self.format}")
        if self.cache not in CACHE_MODES:
            raise SpecError(f"disk {self.id}: cache must be one of {', '.join(CACHE_MODES)}, not {self.cache!r}")
        if self.aio not in AIO_MODES:
            raise SpecError(f"disk {self.id}: aio must be threads, native or io_uring, not {self.aio!r}")
        if self.aio == "native" and not self.direct:
            raise SpecError(f"disk {self.id}: aio=native needs an O_DIRECT cache mode (none or directsync)")

    @classmethod
    def of(cls, disk: DiskSpec | str | os.PathLike[str], **options: Unpack[DiskOptions]) -> DiskSpec:
        """The disk a caller asks for: a ``DiskSpec`` as it is, or one made of an image path and
        the settings given by keyword (the one adapter from keywords to the value)."""
        unknown = set(options) - DISK_OPTIONS
        if unknown:
            raise InvalidArgument(
                f"unknown disk option(s) {', '.join(sorted(unknown))}: a disk takes {', '.join(sorted(DISK_OPTIONS))}"
            )
        if not isinstance(disk, DiskSpec):
            if "id" not in options:
                raise InvalidArgument("a disk given by its image path needs an id=")
            return cls(path=disk, **options)
        asked = options.pop("id", disk.id)
        if asked != disk.id:
            raise InvalidArgument(f"id={asked!r} contradicts the DiskSpec's id {disk.id!r}")
        if options:
            raise InvalidArgument(
                f"disk {disk.id}: {', '.join(sorted(options))} given beside a DiskSpec; set them in the DiskSpec"
            )
        return disk

    # -- the chain -------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        """Layer numbers from the base image up to the active (top) one."""
        return [self.base_layer, *(o.layer for o in self.overlays)]

    @property
    def active_node(self) -> str:
        """The format node the guest's device reads and writes."""
        return disk_node_names(self.id, self.layers[-1])[1]

    def next_layer(self) -> int:
        return max(self.layers) + 1

    def with_overlay(self, path: str | os.PathLike[str]) -> DiskSpec:
        """This disk with a new active layer on top: the overlay file at ``path``."""
        overlay = Overlay(layer=self.next_layer(), path=os.path.realpath(path))
        return attrs.evolve(self, overlays=(*self.overlays, overlay))

    def layer_path(self, layer: int) -> str:
        if layer == self.base_layer:
            return self.path
        for overlay in self.overlays:
            if overlay.layer == layer:
                return overlay.path
        raise InvalidArgument(f"disk {self.id} has no layer {layer} (layers: {self.layers})")

    def layer_format(self, layer: int) -> str:
        return self.format if layer == self.base_layer else "qcow2"

    # -- what it renders -------------------------------------------------------------------

    @property
    def direct(self) -> bool:
        """Whether the image is opened with O_DIRECT (cache none or directsync)."""
        return CACHE_MODES[self.cache][0]

    def open_flags(self) -> int:
        """How vmctl opens an image of this disk to pass it by fd (QEMU matches the access mode)."""
        access = os.O_RDONLY if self.read_only else os.O_RDWR
        return access | os.O_CLOEXEC | (os.O_DIRECT if self.direct else 0)

    def layer_nodes(self, layer: int, filename: str, *, backing: str | None = None) -> list[dict[str, Any]]:
        """The protocol and format nodes of one layer, as ``blockdev-add`` arguments.

        ``backing`` names the format node below an overlay (``None`` for the base image, which
        opens its own backing, or for an overlay whose backing is attached later)."""
        direct, no_flush, _ = CACHE_MODES[self.cache]
        cache = {"direct": direct, "no-flush": no_flush}
        file_node, format_node = disk_node_names(self.id, layer)
        protocol: dict[str, Any] = {
            "driver": "file",
            "node-name": file_node,
            "filename": filename,
            "read-only": self.read_only,
            "aio": self.aio,
            "cache": cache,
        }
        fmt: dict[str, Any] = {
            "driver": self.layer_format(layer),
            "node-name": format_node,
            "file": file_node,
            "read-only": self.read_only,
            "cache": cache,
        }
        if self.discard:
            protocol["discard"] = fmt["discard"] = "unmap"
        if self.detect_zeroes != "off":
            fmt["detect-zeroes"] = self.detect_zeroes
        if layer != self.base_layer:
            fmt["backing"] = backing
        if self.encryption is not None:
            fmt["encrypt"] = {"format": "luks", "key-secret": secret_object_id(self.id)}
        return [protocol, fmt]

    def device_properties(self) -> dict[str, Any]:
        """The guest's device, as ``device_add`` arguments (the same for ``-device``)."""
        write_cache = CACHE_MODES[self.cache][2]
        device: dict[str, Any] = {
            "driver": "virtio-blk-pci",
            "id": self.id,
            "drive": self.active_node,
            "serial": self.id,
            "write-cache": "on" if write_cache else "off",
        }
        if self.on_error is not None:
            # Reads have no "enospc": running out of space is a write's failure.
            device.update(werror=self.on_error, rerror="report" if self.on_error == "enospc" else self.on_error)
        if self.bus == "scsi":
            device.update(driver="scsi-hd", bus=f"{SCSI_CONTROLLER}.0")
        elif self.pci_addr:
            device["addr"] = self.pci_addr
        else:
            device.update(device_bus(self.port))
        return device

    def arguments(self, filenames: Mapping[int, str] | None = None) -> list[str]:
        """The command-line arguments of the whole chain and the device (QEMU's JSON syntax);
        ``filenames`` gives a layer's image another name (its ``/dev/fdset/N``)."""
        argv: list[str] = []
        below: str | None = None
        for layer in self.layers:
            filename = (filenames or {}).get(layer) or self.layer_path(layer)
            for node in self.layer_nodes(layer, filename, backing=below):
                argv += ["-blockdev", json.dumps(node, separators=(",", ":"))]
            below = disk_node_names(self.id, layer)[1]
        return [*argv, "-device", json.dumps(self.device_properties(), separators=(",", ":"))]


class DiskOptions(TypedDict, total=False):
    """A ``DiskSpec``'s settings by keyword: what ``hotplug_disk(path, id=..., cache=...)`` takes
    beside the image. Declared once here; every VM's ``hotplug_disk`` types its ``**options`` with it
    and hands them to :meth:`DiskSpec.of`, so no layer restates them or their defaults."""

    id: str
    format: DiskFormat
    read_only: bool
    bus: DiskBus
    cache: CacheMode
    aio: Aio
    discard: bool
    detect_zeroes: DetectZeroes
    on_error: ErrorPolicy | None
    throttle: Throttle | None
    encryption: Secret | None


DISK_OPTIONS: Final = frozenset(DiskOptions.__annotations__)
