"""A disk's and a NIC's libvirt device XML, rendered from vmctl's values and parsed back.

Pure: no I/O, no libvirt. Each device is named ``ua-{id}`` (libvirt keeps only aliases with
the ``ua-`` prefix from a user's XML and passes them to QEMU as the device id), and a disk's
``<serial>`` is its id, as on vmctl's own command line, so the guest finds it under
``/dev/disk/by-id`` alike.

What a disk carries: path, format, read-only, bus (virtio / scsi), cache, aio (``io=``),
discard, on_error (``error_policy``; libvirt, like vmctl, reports read errors when it is
``enospc``), throttle (``<iotune>``), its root port or PCI address when the spec pins one, the
overlay chain (``<backingStore>``, see ``disk_xml``) and, given the UUID of a libvirt secret
that holds the passphrase, LUKS encryption. What it does not: the layer numbers (a parsed chain
counts 0, 1, ... from the base) and the passphrase itself (a parsed disk has no ``encryption``).

What a NIC carries: MAC, model, tap (``type='ethernet'``, an existing tap libvirt does not
manage) or user networking, queues (tap only: libvirt refuses multiqueue user networking),
link state, root port or PCI address when pinned.

Parsed back, a device libvirt placed has the port it got (the root port of bus N is port
N - 1, as ``domain_xml`` numbers them) and a NIC the MAC libvirt made up: a defined domain's
XML says more than the spec it came from. Ids take letters, digits, ``_`` and ``-`` only.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from typing import Any, Final

from vmctl.errors import InvalidArgument, SpecError
from vmctl.model.disk import DiskBus, DiskSpec, Overlay, Throttle
from vmctl.model.nic import NicSpec

ALIAS_PREFIX: Final = "ua-"
#: libvirt's names for vmctl's, where they differ.
_ERROR_POLICY: Final = {"stop": "stop", "report": "report", "ignore": "ignore", "enospc": "enospace"}
_TARGET_BUS: Final = {"virtio-blk": "virtio", "scsi": "scsi"}
_DEV_PREFIX: Final = {"virtio-blk": "vd", "scsi": "sd"}
_NIC_MODEL: Final = {
    "virtio-net-pci": "virtio",
    "virtio-net-pci-transitional": "virtio-transitional",
    "virtio-net-pci-non-transitional": "virtio-non-transitional",
}
#: Throttle field -> libvirt's <iotune> element.
#: A disk's <driver> attributes that name a DiskSpec setting as it is: (attribute, field).
_DRIVER_SETTINGS: Final = (("cache", "cache"), ("io", "aio"), ("detect_zeroes", "detect_zeroes"))
_IOTUNE: Final = {
    "bps": "total_bytes_sec",
    "bps_rd": "read_bytes_sec",
    "bps_wr": "write_bytes_sec",
    "iops": "total_iops_sec",
    "iops_rd": "read_iops_sec",
    "iops_wr": "write_iops_sec",
}
_ALIAS_ID = re.compile(r"[A-Za-z0-9_-]+")
_PCI_ADDR = re.compile(r"0x([0-9a-f]{1,2})\.([0-7])")


def _inverse(mapping: dict[str, str]) -> dict[str, str]:
    return {value: key for key, value in mapping.items()}


# -- names -------------------------------------------------------------------------------------


def device_alias(id: str) -> str:
    """The libvirt alias of vmctl device ``id`` (QEMU sees it as the device's id). libvirt
    silently drops a user alias with a character other than letters, digits, ``_`` and ``-``
    (seen on 9.0), and the device could not be found by it again: such an id is refused."""
    if not _ALIAS_ID.fullmatch(id):
        raise SpecError(f"device id {id!r}: under libvirt, ids take only letters, digits, _ and - (no '.')")
    return ALIAS_PREFIX + id


def vmctl_id(alias: str) -> str:
    """The vmctl id of a device named ``device_alias(id)``; ``InvalidArgument`` for libvirt's own aliases."""
    if not alias.startswith(ALIAS_PREFIX) or len(alias) == len(ALIAS_PREFIX):
        raise InvalidArgument(f"{alias!r} is not a vmctl device alias (those start with {ALIAS_PREFIX!r})")
    return alias[len(ALIAS_PREFIX) :]


def _dev_name(index: int) -> str:
    """a, b, ... z, aa, ab, ...: libvirt's disk name suffixes (bijective base 26)."""
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = chr(ord("a") + rest) + letters
    return letters


def next_target_dev(used: Iterable[str], bus: DiskBus) -> str:
    """The first of vda, vdb, ... (sda, ... for SCSI) not in ``used``."""
    if bus not in _DEV_PREFIX:
        raise InvalidArgument(f"bus must be virtio-blk or scsi, not {bus!r}")
    taken = set(used)
    index = 0
    while (name := _DEV_PREFIX[bus] + _dev_name(index)) in taken:
        index += 1
    return name


# -- rendering ---------------------------------------------------------------------------------


def _address(parent: ET.Element, port: int | None, pci_addr: str | None) -> None:
    """A pinned placement: root port N is the PCI controller of index N + 1 (``domain_xml``
    numbers them so); a PCI address is a slot on the root bus. Else libvirt chooses."""
    if port is not None:
        ET.SubElement(parent, "address", type="pci", domain="0x0000", bus=f"0x{port + 1:02x}", slot="0x00",
                      function="0x0")  # fmt: skip
    elif pci_addr is not None:
        found = _PCI_ADDR.fullmatch(pci_addr)
        assert found is not None  # checked by the spec
        slot, function = found.groups()
        ET.SubElement(parent, "address", type="pci", domain="0x0000", bus="0x00", slot=f"0x{int(slot, 16):02x}",
                      function=f"0x{function}")  # fmt: skip


def _source(parent: ET.Element, path: str, secret_uuid: str | None) -> None:
    source = ET.SubElement(parent, "source", file=path)
    if secret_uuid is not None:
        encryption = ET.SubElement(source, "encryption", format="luks")
        ET.SubElement(encryption, "secret", type="passphrase", uuid=secret_uuid)


def disk_element(disk: DiskSpec, *, target_dev: str, secret_uuid: str | None = None) -> ET.Element:
    """``disk_xml`` as an element (for ``domain_xml``)."""
    if disk.encryption is not None and secret_uuid is None:
        raise SpecError(
            f"disk {disk.id}: an encrypted disk needs its passphrase in a libvirt secret: pass that secret's UUID"
        )
    if disk.base_layer != 0 or [o.layer for o in disk.overlays] != list(range(1, len(disk.overlays) + 1)):
        # The XML has no layer numbers: a chain parsed back counts from 0, so a renumbered one would not match.
        raise SpecError(f"disk {disk.id}: libvirt keeps no layer numbers; its chain must count 0, 1, 2, ...")
    secret = secret_uuid if disk.encryption is not None else None
    element = ET.Element("disk", type="file", device="disk")
    top = disk.layers[-1]
    driver = ET.SubElement(element, "driver", name="qemu", type=disk.layer_format(top), cache=disk.cache, io=disk.aio)
    if disk.discard:
        driver.set("discard", "unmap")
    if disk.detect_zeroes != "off":
        driver.set("detect_zeroes", disk.detect_zeroes)
    if disk.on_error is not None:
        driver.set("error_policy", _ERROR_POLICY[disk.on_error])
    _source(element, disk.layer_path(top), secret)
    below = element
    for layer in reversed(disk.layers[:-1]):
        # The chain is given whole, each layer on the one below, so libvirt opens no backing file by header.
        below = ET.SubElement(below, "backingStore", type="file")
        ET.SubElement(below, "format", type=disk.layer_format(layer))
        _source(below, disk.layer_path(layer), secret)
    ET.SubElement(element, "target", dev=target_dev, bus=_TARGET_BUS[disk.bus])
    if disk.throttle is not None:
        iotune = ET.SubElement(element, "iotune")
        for field, name in _IOTUNE.items():
            if value := getattr(disk.throttle, field):
                ET.SubElement(iotune, name).text = str(value)
    if disk.read_only:
        ET.SubElement(element, "readonly")
    ET.SubElement(element, "serial").text = disk.id
    ET.SubElement(element, "alias", name=device_alias(disk.id))
    _address(element, disk.port, disk.pci_addr)
    return element


def disk_xml(disk: DiskSpec, *, target_dev: str, secret_uuid: str | None = None) -> str:
    """One ``<disk>``, for a domain or for ``attachDeviceFlags``.

    Overlays become the ``<backingStore>`` chain below the active (top) layer, each layer's
    format given, so libvirt opens the chain as vmctl would (it probes no image header but the
    base's: a base with a backing file of its own keeps it). An encrypted disk needs
    ``secret_uuid``, a libvirt secret (usage ``volume``) holding its passphrase: libvirt, not
    vmctl, hands it to QEMU; every layer uses it, as vmctl does."""
    return ET.tostring(disk_element(disk, target_dev=target_dev, secret_uuid=secret_uuid), encoding="unicode")


def nic_element(nic: NicSpec, *, vhost: bool = True, new_tap: bool = False) -> ET.Element:
    """``nic_xml`` as an element (for ``domain_xml``)."""
    if nic.tap is None and nic.queues > 1 and not new_tap:
        raise SpecError(f"nic {nic.id}: libvirt has multiqueue only for taps, not user networking")
    element = ET.Element("interface", type="user" if nic.tap is None and not new_tap else "ethernet")
    if nic.mac is not None:
        ET.SubElement(element, "mac", address=nic.mac)
    if nic.tap is not None:
        ET.SubElement(element, "target", dev=nic.tap, managed="no")
    ET.SubElement(element, "model", type=_NIC_MODEL.get(nic.model, nic.model))
    driver = ET.Element("driver")
    if not vhost and nic.model.startswith("virtio-net"):
        driver.set("name", "qemu")
    if nic.queues > 1:
        driver.set("queues", str(nic.queues))
    if driver.attrib:
        element.append(driver)
    ET.SubElement(element, "link", state="up" if nic.link_up else "down")
    ET.SubElement(element, "alias", name=device_alias(nic.id))
    _address(element, nic.port, nic.pci_addr)
    return element


def nic_xml(nic: NicSpec, *, vhost: bool = True, new_tap: bool = False) -> str:
    """One ``<interface>``, for a domain or for ``attachDeviceFlags``. ``vhost=False`` keeps a
    virtio NIC's data path in QEMU (``<driver name='qemu'>``): vhost-net needs KVM's ioeventfds,
    and under TCG QEMU only falls back after complaining. ``new_tap``: a NIC without ``tap`` gets a
    tap that libvirt makes (and removes with it), as vmctl's own hotplug does, not user networking."""
    return ET.tostring(nic_element(nic, vhost=vhost, new_tap=new_tap), encoding="unicode")


# -- parsing back ------------------------------------------------------------------------------


def _root_port_buses(domain: ET.Element) -> set[int]:
    return {
        int(c.get("index", "-1"))
        for c in domain.iterfind("devices/controller[@type='pci']")
        if c.get("model") == "pcie-root-port"
    }


def _placement(device: ET.Element, root_ports: set[int]) -> tuple[int | None, str | None]:
    """(root port, PCI address) of a device, the inverse of ``_address``."""
    address = device.find("address[@type='pci']")
    if address is None:
        return None, None
    bus, slot, function = (int(address.get(name, "0"), 0) for name in ("bus", "slot", "function"))
    if bus == 0:
        return None, f"0x{slot:x}.{function}"
    return (bus - 1 if bus in root_ports and slot == 0 and function == 0 else None), None


def _device_id(device: ET.Element, fallback: str) -> str:
    alias = device.find("alias")
    name = "" if alias is None else alias.get("name", "")
    return vmctl_id(name) if name.startswith(ALIAS_PREFIX) else fallback


def _chain(disk: ET.Element, id: str) -> list[tuple[str, str]]:
    """(path, format) of each layer, from the top down; an empty ``<backingStore/>`` ends it."""
    driver = disk.find("driver")
    format = "raw" if driver is None else driver.get("type", "raw")
    layers: list[tuple[str, str]] = []
    node: ET.Element | None = disk
    while node is not None:
        source = node.find("source")
        if node.get("type", "file") != "file" or source is None or not source.get("file"):
            break
        layers.append((source.get("file", ""), format))
        node = node.find("backingStore")
        format_element = None if node is None else node.find("format")
        format = "raw" if format_element is None else format_element.get("type", "raw")
    if not layers:
        raise SpecError(f"disk {id}: vmctl models disks on image files only")
    return layers


def _parse_disk(disk: ET.Element, root_ports: set[int]) -> DiskSpec:
    target = disk.find("target")
    dev = "" if target is None else target.get("dev", "")
    serial = disk.findtext("serial")
    id = _device_id(disk, serial or dev)
    bus = {"virtio": "virtio-blk", "scsi": "scsi"}.get("" if target is None else target.get("bus", ""))
    if bus is None:
        raise SpecError(f"disk {id}: vmctl models virtio and SCSI disks only")
    layers = _chain(disk, id)[::-1]
    (path, format), overlays = layers[0], layers[1:]
    driver = disk.find("driver")
    attrib = {} if driver is None else driver.attrib
    iotune = disk.find("iotune")
    throttle = None
    if iotune is not None:
        throttle = Throttle(**{field: int(iotune.findtext(name) or 0) for field, name in _IOTUNE.items()})
    port, pci_addr = _placement(disk, root_ports) if bus != "scsi" else (None, None)
    error_policy = attrib.get("error_policy")
    # An attribute libvirt leaves out is the hypervisor's default, which is the DiskSpec's too.
    settings: dict[str, Any] = {name: attrib[xml] for xml, name in _DRIVER_SETTINGS if xml in attrib}
    return DiskSpec(
        id=id,
        path=path,
        format=format,  # type: ignore[arg-type]  # DiskSpec checks it
        read_only=disk.find("readonly") is not None,
        bus=bus,  # type: ignore[arg-type]
        throttle=throttle,
        discard=attrib.get("discard") == "unmap",
        on_error=None if error_policy is None else _inverse(_ERROR_POLICY).get(error_policy, error_policy),  # type: ignore[arg-type]
        port=port,
        pci_addr=pci_addr,
        overlays=tuple(Overlay(layer=index, path=p) for index, (p, _) in enumerate(overlays, start=1)),
        **settings,
    )


def _parse_nic(interface: ET.Element, index: int, root_ports: set[int]) -> NicSpec:
    kind = interface.get("type")
    alias = interface.find("alias")
    id = _device_id(interface, (alias.get("name") if alias is not None else None) or f"net{index}")
    if kind not in ("user", "ethernet"):
        raise SpecError(f"nic {id}: vmctl models user networking and taps, not interface type {kind!r}")
    mac, model, target, driver, link = (interface.find(name) for name in ("mac", "model", "target", "driver", "link"))
    model_type = "virtio" if model is None else model.get("type", "virtio")
    port, pci_addr = _placement(interface, root_ports)
    return NicSpec(
        id=id,
        mac=None if mac is None else mac.get("address"),
        model=_inverse(_NIC_MODEL).get(model_type, model_type),
        tap=None if target is None or kind == "user" else target.get("dev"),
        queues=1 if driver is None else int(driver.get("queues", "1")),
        link_up=link is None or link.get("state", "up") == "up",
        port=port,
        pci_addr=pci_addr,
    )


def _domain(xml: str) -> ET.Element:
    try:
        return ET.fromstring(xml)
    except ET.ParseError as exc:
        raise InvalidArgument(f"not a domain XML: {exc}") from None


def disks_from_xml(xml: str) -> tuple[DiskSpec, ...]:
    """The disks (``device='disk'``; CD-ROMs and the like are skipped) of a domain XML."""
    domain = _domain(xml)
    ports = _root_port_buses(domain)
    return tuple(_parse_disk(d, ports) for d in domain.iterfind("devices/disk[@device='disk']"))


def nics_from_xml(xml: str) -> tuple[NicSpec, ...]:
    """The NICs of a domain XML. One libvirt named itself is called by its alias (``net0``)."""
    domain = _domain(xml)
    ports = _root_port_buses(domain)
    return tuple(_parse_nic(n, i, ports) for i, n in enumerate(domain.iterfind("devices/interface")))


def target_devs(xml: str) -> dict[str, str]:
    """Disk id -> its target dev (``vda``) in a domain XML."""
    found = {}
    for disk in _domain(xml).iterfind("devices/disk[@device='disk']"):
        target = disk.find("target")
        dev = "" if target is None else target.get("dev", "")
        found[_device_id(disk, disk.findtext("serial") or dev)] = dev
    return found
