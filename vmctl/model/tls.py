"""x509 credentials for TLS (migration, NBD), laid out as QEMU's ``tls-creds-x509`` reads them."""

from __future__ import annotations

import os
from typing import Literal

import attrs

from vmctl.errors import InvalidArgument
from vmctl.model.secret import Secret
from vmctl.model.validate import path_text

Endpoint = Literal["server", "client"]

#: The files each end reads from the directory (QEMU's names); the CA certificate verifies the peer.
FILES: dict[Endpoint, tuple[str, ...]] = {
    "server": ("ca-cert.pem", "server-cert.pem", "server-key.pem"),
    "client": ("ca-cert.pem", "client-cert.pem", "client-key.pem"),
}


@attrs.frozen(kw_only=True)
class TLSCreds:
    """A directory of x509 credentials: ``ca-cert.pem``, ``server-cert.pem``, ``server-key.pem``,
    ``client-cert.pem``, ``client-key.pem``. Both ends verify their peer against the CA."""

    dir: str = attrs.field(converter=path_text)
    #: The password of the private keys, when they are encrypted (QEMU gets it as a secret
    #: object, encrypted with the VM's master key).
    key_password: Secret | None = None

    def __attrs_post_init__(self) -> None:
        if self.key_password is not None and not isinstance(self.key_password, Secret):
            raise InvalidArgument("TLSCreds.key_password is a vmctl.Secret")

    def paths(self, endpoint: Endpoint) -> list[str]:
        """The files of one end; ``InvalidArgument`` naming any that is missing."""
        paths = [os.path.join(self.dir, name) for name in FILES[endpoint]]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise InvalidArgument(f"TLS credentials in {self.dir}: missing {', '.join(missing)}")
        return paths
