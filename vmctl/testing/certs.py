"""Throwaway x509 credentials for tests, made with ``openssl``: a CA, and a server and a client
certificate it signed, laid out as ``vmctl.TLSCreds`` (QEMU's ``tls-creds-x509``) reads them."""

from __future__ import annotations

import ipaddress
import subprocess
from pathlib import Path

from vmctl.model.secret import Secret
from vmctl.model.tls import TLSCreds

_DAYS = "2"


def make_ca(directory: str | Path, *, name: str = "vmctl test CA") -> tuple[Path, Path]:
    """A self-signed CA in ``directory``: its certificate and key."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    cert, key = out / "ca-cert.pem", out / "ca-key.pem"
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", _DAYS, "-subj", f"/CN={name}",
        "-keyout", str(key), "-out", str(cert),
    )  # fmt: skip
    key.chmod(0o600)
    return cert, key


def make_tls_creds(
    directory: str | Path,
    *,
    hostname: str,
    ca: tuple[Path, Path] | None = None,
    server_ca: tuple[Path, Path] | None = None,
    key_password: Secret | None = None,
) -> TLSCreds:
    """Credentials in ``directory``: the CA's certificate (a new CA unless ``ca`` is given), and a
    server certificate for ``hostname`` (a name or an IP address) and a client certificate, both
    signed by the CA, or the server's by ``server_ca`` (a peer the client must refuse); their
    keys encrypted with ``key_password`` if given."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    ca = ca or make_ca(out / "ca")
    (out / "ca-cert.pem").write_bytes(ca[0].read_bytes())
    try:
        ipaddress.ip_address(hostname)
        san = f"IP:{hostname}"
    except ValueError:
        san = f"DNS:{hostname}"
    for role, usage, signer in (("server", "serverAuth", server_ca or ca), ("client", "clientAuth", ca)):
        key, request, cert = out / f"{role}-key.pem", out / f"{role}.csr", out / f"{role}-cert.pem"
        extensions = out / f"{role}.ext"
        extensions.write_text(
            f"subjectAltName={san}\nextendedKeyUsage={usage}\nkeyUsage=digitalSignature,keyEncipherment\n"
        )
        protection = ["-passout", "stdin"] if key_password is not None else ["-nodes"]
        _openssl(
            "req", "-newkey", "rsa:2048", *protection, "-subj", f"/CN={hostname}",
            "-keyout", str(key), "-out", str(request),
            stdin=key_password.reveal() if key_password is not None else None,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", str(request), "-CA", str(signer[0]), "-CAkey", str(signer[1]),
            "-CAcreateserial", "-days", _DAYS, "-extfile", str(extensions), "-out", str(cert),
        )  # fmt: skip
        request.unlink()
        extensions.unlink()
        key.chmod(0o600)
    return TLSCreds(dir=out, key_password=key_password)


def _openssl(*args: str, stdin: bytes | None = None) -> None:
    result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, timeout=60, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.decode(errors='replace').strip()}")
