"""Migration setup on the fake: a target already listening is recognised in QEMU's own words."""

from __future__ import annotations

from typing import Any

import pytest

from vmctl.errors import MigrationError
from vmctl.ops import migration as migration_ops
from vmctl.qmp import Monitor
from vmctl.testing import FakeCall, FakeQEMU
from vmctl.testing.faults import Fault, inject


class Incoming:
    """An ``-incoming defer`` QEMU: it listens once, and says where as QEMU 7.2 and 10.0 do."""

    def __init__(self, fake: FakeQEMU, reported: dict[str, Any]) -> None:
        self.reported = reported
        self.listening = False
        fake.on("query-migrate", lambda call: {"socket-address": [reported]} if self.listening else {})
        fake.on("migrate-incoming", self.listen)

    def listen(self, call: FakeCall) -> Any:
        assert not self.listening, "QEMU takes migrate-incoming once"
        self.listening = True
        return {}


# QEMU reports a TCP listener numerically, with its family flagged (socket_sockaddr_to_address_inet).
TCP = {"type": "inet", "host": "10.0.0.2", "port": "4444", "ipv4": True}
UNIX = {"type": "unix", "path": "/run/vm/migration.sock"}


@pytest.mark.parametrize(("uri", "reported"), [("tcp:10.0.0.2:4444", TCP), ("unix:/run/vm/migration.sock", UNIX)])
def test_a_late_migrate_incoming_reply_finds_the_target_listening_where_asked(
    monitor: Monitor, fake: FakeQEMU, uri: str, reported: dict[str, Any]
) -> None:
    incoming = Incoming(fake, reported)
    with inject(monitor, Fault.TIMEOUT, at=2):  # query-migrate, then migrate-incoming: late
        migration_ops.listen_incoming(monitor, uri)
    assert incoming.listening
    migration_ops.listen_incoming(monitor, uri)  # a retry of the whole setup is fine too
    assert len(fake.calls_of("migrate-incoming")) == 1


def test_a_target_listening_elsewhere_is_refused(monitor: Monitor, fake: FakeQEMU) -> None:
    incoming = Incoming(fake, TCP)
    incoming.listening = True
    with pytest.raises(MigrationError, match="listens for the migration on"):
        migration_ops.listen_incoming(monitor, "tcp:10.0.0.2:5555")
