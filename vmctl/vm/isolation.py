"""How a root vmctl keeps tenants apart: a uid of its own and a /dev of its own for each QEMU.

``Isolation`` is the host's policy (the uid pool, whether QEMU gets a private /dev);
``Isolation.confine`` turns it and a spec's ``run_as`` into what one launch needs: the user QEMU
runs as, the pool's lease on its uid (passed to QEMU, which holds it for its life), and the
command that runs QEMU so (``devjail`` then ``setpriv``).

``run_as="auto"`` (the default): as root, a uid and gid from the pool, unique among live VMs; as
anyone else, vmctl's own user. ``run_as="user[:group]"`` names the user, as before, and
``run_as=None`` keeps vmctl's own; a private /dev holds in every case where vmctl is root.
"""

from __future__ import annotations

import os

import attrs

from vmctl.logs import get_logger
from vmctl.vm import devjail
from vmctl.vm.privileges import QemuUser
from vmctl.vm.uidpool import Lease, UidPool

log = get_logger(__name__)


@attrs.frozen(kw_only=True)
class Isolation:
    """A host's rules for the QEMUs it runs; ``from_env`` is the default (see ``UidPool.from_env``)."""

    pool: UidPool = attrs.field(factory=UidPool)
    #: A /dev of its own for each QEMU (needs root); off only on purpose, and said at warning.
    private_dev: bool = True

    @classmethod
    def from_env(cls) -> Isolation:
        return cls(pool=UidPool.from_env())

    def confine(self, run_as: str | None, *, vm: str) -> Confinement:
        """What launching a QEMU with ``run_as`` takes; the caller closes the result once QEMU runs
        (or did not start)."""
        root = os.geteuid() == 0
        lease = None
        if run_as == "auto" and root:
            lease = self.pool.take()
            user: QemuUser | None = QemuUser(name=str(lease.uid), uid=lease.uid, gid=lease.gid)
        else:
            user = QemuUser.resolve(run_as)
        prefix: list[str] = []
        if root:
            prefix += devjail.prefix(user.uid if user else 0, user.gid if user else 0, private=self.private_dev)
            if not self.private_dev:
                log.warning("isolation.shared_dev", vm=vm, reason="Isolation(private_dev=False)")
        else:
            log.warning("isolation.shared_dev", vm=vm, reason="vmctl is not root: QEMU keeps the host's /dev")
        if user is not None:
            prefix += user.command_prefix()
        return Confinement(user=user, lease=lease, prefix=tuple(prefix))


@attrs.frozen(kw_only=True)
class Confinement:
    """One launch's user, lease and command prefix."""

    user: QemuUser | None
    lease: Lease | None
    prefix: tuple[str, ...]

    @property
    def pass_fds(self) -> tuple[int, ...]:
        """The fds QEMU inherits for its confinement: the lease, which it holds for its life."""
        return () if self.lease is None else (self.lease.fd,)

    def close(self) -> None:
        if self.lease is not None:
            self.lease.close()
