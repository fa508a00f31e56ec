"""A hotplugged character device (a unix socket or a ring buffer), optionally a virtio-serial port."""

from __future__ import annotations

from typing import Literal

import attrs

from vmctl.model.names import chardev_port_id

ChardevKind = Literal["socket", "ringbuf"]


@attrs.frozen(kw_only=True)
class Chardev:
    id: str
    kind: ChardevKind
    path: str | None = None  # the unix socket QEMU listens on (kind "socket")
    size: int | None = None  # the ring buffer's size (kind "ringbuf")
    port_name: str | None = None  # the virtio-serial port the guest sees, if any

    @property
    def port_id(self) -> str:
        return chardev_port_id(self.id)
