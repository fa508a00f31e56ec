"""TLS credentials: checked before use, parameters per side, and QEMU's copy readable by its group only."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vmctl import Secret, TLSCreds
from vmctl.errors import InvalidArgument
from vmctl.model.migration import MigrationOptions
from vmctl.vm import tls as tls_ops
from vmctl.vm.migration import _tls_hostname

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem", "client-cert.pem", "client-key.pem")


def creds(tmp_path: Path, *names: str) -> TLSCreds:
    for name in names:
        (tmp_path / name).write_text(name)
    return TLSCreds(dir=tmp_path)


def test_missing_files_are_named_before_anything_is_sent(tmp_path: Path) -> None:
    partial = creds(tmp_path, "ca-cert.pem", "client-cert.pem", "client-key.pem")
    assert [os.path.basename(p) for p in partial.paths("client")] == [
        "ca-cert.pem",
        "client-cert.pem",
        "client-key.pem",
    ]
    with pytest.raises(InvalidArgument, match=r"server-cert\.pem, .*server-key\.pem"):
        partial.paths("server")


def test_each_side_gets_its_own_credentials_and_the_source_the_hostname() -> None:
    options = MigrationOptions(tls_server="s", tls_client="c", tls_hostname="10.0.0.2")
    assert options.parameters(source=False) == {"tls-creds": "s"}
    assert options.parameters(source=True) == {"tls-creds": "c", "tls-hostname": "10.0.0.2"}
    assert "tls-creds" not in MigrationOptions().parameters(source=True)


def test_the_hostname_is_where_the_source_connects() -> None:
    assert _tls_hostname("tcp:10.0.0.2:4444", None) == "10.0.0.2"
    assert _tls_hostname("tcp:[fd00::2]:4444", None) == "fd00::2"
    with pytest.raises(InvalidArgument, match="tcp:"):
        _tls_hostname("unix:/run/x.sock", None)


def test_qemus_copy_is_roots_and_readable_by_the_run_dirs_group_only(tmp_path: Path) -> None:
    source = tmp_path / "pki"
    source.mkdir()
    run_dir = tmp_path / "vm"
    run_dir.mkdir()
    os.chown(run_dir, 0, 64124)
    copied = tls_ops.stage(creds(source, *FILES), run_dir, "migration", "server")
    assert copied == run_dir / "tls-migration-server"
    assert sorted(p.name for p in copied.iterdir()) == ["ca-cert.pem", "server-cert.pem", "server-key.pem"]
    for path in (copied, *copied.iterdir()):
        info = path.stat()
        assert (info.st_uid, info.st_gid) == (os.geteuid(), 64124)
        assert stat.S_IMODE(info.st_mode) & 0o007 == 0  # nothing for others
    assert (copied / "server-key.pem").read_text() == "server-key.pem"


def test_a_key_password_is_a_secret_and_never_shows(tmp_path: Path) -> None:
    protected = TLSCreds(dir=tmp_path, key_password=Secret(b"pw-123"))
    assert "pw-123" not in repr(protected)
    with pytest.raises(InvalidArgument, match="Secret"):
        TLSCreds(dir=tmp_path, key_password=b"pw-123")  # type: ignore[arg-type]
