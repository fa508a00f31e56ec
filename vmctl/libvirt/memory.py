"""Memory hotplug of a libvirt domain: DIMMs and virtio-mem, through ``attachDeviceFlags``,
``detachDeviceAlias`` and (virtio-mem's requested size) ``updateDeviceFlags``.

The domain needs ``max_memory_mib`` (libvirt's ``<maxMemory>`` and its NUMA cell, which
``domain_xml`` renders), and ``memory_slots`` for DIMMs. QMP (through libvirtd) only reads back
where QEMU put a DIMM and how big a virtio-mem device has become.
"""

from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from typing import Any

import attrs

from vmctl.errors import DeviceExists, InvalidArgument, WaitTimeout
from vmctl.libvirt.calls import bounded
from vmctl.libvirt.devices import LibvirtDevices
from vmctl.libvirt.devicexml import device_alias, vmctl_id
from vmctl.libvirt.errors import LibvirtDeviceNotFound
from vmctl.libvirt.monitor import LibvirtMonitor
from vmctl.model.memory import MemorySpec, VirtioMemSpec
from vmctl.ops import memory as memory_ops

_VIRTIO_MEM_BLOCK_MIB = 2  # the guest plugs in 2 MiB blocks (x86's huge page: the smallest allowed)


class LibvirtMemory:
    """The memory part of a ``LibvirtVM``; it shares the devices part's lock and detach."""

    def __init__(self, *, name: str, domain: Any, devices: LibvirtDevices, qmp: LibvirtMonitor) -> None:
        self.name = name
        self._domain = domain
        self._devices = devices
        self._qmp = qmp
        self._flags = devices.flags

    def memory_devices(self) -> list[memory_ops.MemoryDevice]:
        """The DIMMs as QEMU reports them, named by their vmctl ids."""
        found = []
        for device in memory_ops.memory_devices(self._qmp):
            try:
                found.append(attrs.evolve(device, id=vmctl_id(device.id)))
            except InvalidArgument:
                found.append(device)  # one libvirt named itself
        return found

    def hotplug_memory(self, size_mib: int, *, id: str, timeout: float = 30.0) -> MemorySpec:
        """Add a DIMM of ``size_mib`` (a multiple of 128) on NUMA node 0."""
        if isinstance(size_mib, bool) or not isinstance(size_mib, int) or size_mib <= 0 or size_mib % 128:
            raise InvalidArgument(f"memory {id}: the size must be a positive multiple of 128 MiB, not {size_mib!r}")
        with self._devices.lock:
            self._refuse_duplicate(id)
            self._refuse_beyond_max(id, size_mib)
            element = _memory_element("dimm", id, size_mib)
            bounded(f"{self.name}: attach memory {id}", timeout, self._domain.attachDeviceFlags,
                    ET.tostring(element, encoding="unicode"), self._flags)  # fmt: skip
            [device] = [d for d in self.memory_devices() if d.id == id]
            return MemorySpec(id=id, size_mib=size_mib, slot=device.slot, addr=device.address)

    def unplug_memory(self, id: str, *, timeout: float = 30.0) -> None:
        with self._devices.lock:
            self._require(id)
            self._devices.detach(id, timeout)

    def add_virtio_mem(self, id: str, *, max_size_mib: int, size_mib: int = 0, timeout: float = 30.0) -> VirtioMemSpec:
        """Add a virtio-mem device of up to ``max_size_mib`` (a multiple of 128) and plug ``size_mib`` of it."""
        if (
            isinstance(max_size_mib, bool)
            or not isinstance(max_size_mib, int)
            or max_size_mib <= 0
            or max_size_mib % 128
        ):
            raise InvalidArgument(f"virtio-mem {id}: max size must be a positive multiple of 128 MiB")
        _check_size(id, size_mib, max_size_mib)
        with self._devices.lock:
            self._refuse_duplicate(id)
            element = _memory_element("virtio-mem", id, max_size_mib, requested_mib=0)
            bounded(f"{self.name}: attach virtio-mem {id}", timeout, self._domain.attachDeviceFlags,
                    ET.tostring(element, encoding="unicode"), self._flags)  # fmt: skip
            spec = VirtioMemSpec(id=id, max_size_mib=max_size_mib, size_mib=0)
            if size_mib:
                self.resize_virtio_mem(id, size_mib, timeout=timeout)
                spec = VirtioMemSpec(id=id, max_size_mib=max_size_mib, size_mib=size_mib)
            return spec

    def resize_virtio_mem(self, id: str, size_mib: int, *, wait: bool = True, timeout: float = 30.0) -> None:
        """Ask the guest to plug or unplug memory down to ``size_mib`` (``updateDeviceFlags``); by
        default wait until QEMU reports the device at that size."""
        deadline = time.monotonic() + timeout
        with self._devices.lock:
            element = self._require(id)
            target = element.find("target")
            assert target is not None
            max_mib = _mib(target.find("size"))
            _check_size(id, size_mib, max_mib)
            requested = target.find("requested")
            if requested is None:
                requested = ET.SubElement(target, "requested")
            requested.text, requested.attrib = str(size_mib), {"unit": "MiB"}
            for volatile in ("current", "address"):  # what libvirt reports, not what it takes
                for child in target.findall(volatile):
                    target.remove(child)
            bounded(f"{self.name}: resize virtio-mem {id}", timeout, self._domain.updateDeviceFlags,
                    ET.tostring(element, encoding="unicode"), self._devices.live_flag)  # fmt: skip
            path = f"/machine/peripheral/{device_alias(id)}"
            while wait and int(self._qmp.execute("qom-get", {"path": path, "property": "size"})) != size_mib << 20:
                if time.monotonic() >= deadline:
                    raise WaitTimeout(f"{self.name}: virtio-mem {id} did not reach {size_mib} MiB in {timeout:g}s")
                time.sleep(0.1)

    def virtio_mem(self) -> tuple[VirtioMemSpec, ...]:
        """The virtio-mem devices as libvirt's live XML records them (requested size)."""
        found = []
        for element in ET.fromstring(self._devices.xml()).iter("memory"):
            alias, target = element.find("alias"), element.find("target")
            if element.get("model") != "virtio-mem" or alias is None or target is None:
                continue
            found.append(VirtioMemSpec(
                id=vmctl_id(alias.get("name", "")), max_size_mib=_mib(target.find("size")),
                size_mib=_mib(target.find("requested")),
            ))  # fmt: skip
        return tuple(found)

    def _require(self, id: str) -> ET.Element:
        for element in ET.fromstring(self._devices.xml()).iter("memory"):
            alias = element.find("alias")
            if alias is not None and alias.get("name") == device_alias(id):
                return element
        raise LibvirtDeviceNotFound(f"{self.name} has no hotplugged memory {id!r}")

    def _refuse_beyond_max(self, id: str, size_mib: int) -> None:
        domain = ET.fromstring(self._devices.xml())
        most, now = _mib(domain.find("maxMemory")), _mib(domain.find("memory"))
        if now + size_mib > most:
            raise InvalidArgument(f"memory {id}: {size_mib} MiB more exceeds max_memory_mib ({most} MiB, {now} in use)")

    def _refuse_duplicate(self, id: str) -> None:
        if f"'{device_alias(id)}'" in self._devices.xml():
            raise DeviceExists(f"{self.name} already has a device {id!r}")


def _memory_element(model: str, id: str, size_mib: int, *, requested_mib: int | None = None) -> ET.Element:
    element = ET.Element("memory", model=model)
    target = ET.SubElement(element, "target")
    ET.SubElement(target, "size", unit="MiB").text = str(size_mib)
    ET.SubElement(target, "node").text = "0"
    if requested_mib is not None:
        ET.SubElement(target, "block", unit="MiB").text = str(_VIRTIO_MEM_BLOCK_MIB)
        ET.SubElement(target, "requested", unit="MiB").text = str(requested_mib)
    ET.SubElement(element, "alias", name=device_alias(id))
    return element


def _mib(element: ET.Element | None) -> int:
    if element is None or not element.text:
        return 0
    scale = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "b": 1 / (1 << 20), "bytes": 1 / (1 << 20)}
    return int(int(element.text) * scale.get(element.get("unit", "KiB"), 1 / 1024))


def _check_size(id: str, size_mib: int, max_size_mib: int) -> None:
    if isinstance(size_mib, bool) or not isinstance(size_mib, int) or not 0 <= size_mib <= max_size_mib:
        raise InvalidArgument(f"virtio-mem {id}: the size must be 0..{max_size_mib} MiB, not {size_mib!r}")
    if size_mib % _VIRTIO_MEM_BLOCK_MIB:
        raise InvalidArgument(f"virtio-mem {id}: the size must be a multiple of {_VIRTIO_MEM_BLOCK_MIB} MiB")
