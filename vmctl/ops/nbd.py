"""NBD exports of disks (for storage migration or backup), on one NBD server per VM."""

from __future__ import annotations

from typing import Any

import attrs

from vmctl.errors import CommandError, CommandTimeout, DeviceError, EventTimeout
from vmctl.model import DiskSpec
from vmctl.model.names import export_id
from vmctl.model.validate import check_unix_path
from vmctl.ops.queries import ask, execute_checked
from vmctl.qmp import QMPMonitor

NbdAddress = str | tuple[str, int]


@attrs.frozen(kw_only=True)
class Export:
    id: str
    name: str
    disk: str
    writable: bool
    uri: str  # how an NBD client (qemu-img, another QEMU) reaches it


def socket_address(address: NbdAddress) -> dict[str, Any]:
    """QAPI SocketAddress (flat), as blockdev-add's nbd ``server`` takes it."""
    if isinstance(address, tuple):
        host, port = address
        return {"type": "inet", "host": host, "port": str(port)}
    return {"type": "unix", "path": check_unix_path("NBD socket", address)}


def server_address(address: NbdAddress) -> dict[str, Any]:
    """QAPI SocketAddressLegacy (nested ``data``), as nbd-server-start's ``addr`` takes it."""
    flat = socket_address(address)
    kind = flat.pop("type")
    return {"type": kind, "data": flat}


def export_uri(address: NbdAddress, name: str) -> str:
    if isinstance(address, tuple):
        return f"nbd://{address[0]}:{address[1]}/{name}"
    return f"nbd+unix:///{name}?socket={address}"


def start_server(qmp: QMPMonitor, address: NbdAddress, *, tls_creds: str | None = None) -> None:
    """Start the NBD server; with ``tls_creds`` (a tls-creds-x509 object) it speaks only TLS."""
    arguments: dict[str, Any] = {"addr": server_address(address)}
    if tls_creds is not None:
        arguments["tls-creds"] = tls_creds
    qmp.execute("nbd-server-start", arguments)


def stop_server(qmp: QMPMonitor) -> None:
    """Stop the NBD server; one that is not running is fine (a late reply: asked again)."""
    for attempt in range(2):
        try:
            qmp.execute("nbd-server-stop")
            return
        except CommandError as exc:
            if "not running" in exc.desc:
                return
            raise
        except CommandTimeout:
            if attempt:
                raise


def add_export(qmp: QMPMonitor, disk: DiskSpec, address: NbdAddress, *, writable: bool, name: str | None) -> Export:
    export_name = name or disk.id
    arguments = {
        "type": "nbd",
        "id": export_id(disk.id),
        "node-name": disk.active_node,
        "name": export_name,
        "writable": writable,
    }
    execute_checked(qmp, "block-export-add", arguments, took=lambda: exported(qmp, disk.id))
    return Export(
        id=export_id(disk.id), name=export_name, disk=disk.id, writable=writable, uri=export_uri(address, export_name)
    )


def remove_export(qmp: QMPMonitor, disk_id: str, *, timeout: float = 10.0) -> None:
    """Remove the export once its clients let go (BLOCK_EXPORT_DELETED)."""
    with qmp.events("BLOCK_EXPORT_DELETED", match={"id": export_id(disk_id)}) as deleted:
        try:
            qmp.execute("block-export-del", {"id": export_id(disk_id)})
        except CommandError as exc:
            if "not found" in exc.desc.lower():
                return
            raise
        except CommandTimeout:
            pass  # it may be on its way: the event or the exports tell
        try:
            deleted.get(timeout)
        except EventTimeout:
            if exported(qmp, disk_id):
                raise DeviceError(f"the NBD export of {disk_id} is still there after {timeout:g}s") from None


def exported(qmp: QMPMonitor, disk_id: str) -> bool:
    return any(e.get("id") == export_id(disk_id) for e in ask(qmp, "query-block-exports"))
