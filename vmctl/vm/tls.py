"""TLS credentials loaded into a QEMU: copied into its run dir where its user may read them (a
key file stays root's elsewhere), then a ``tls-creds-x509`` object that verifies the peer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Literal

from vmctl.errors import InvalidArgument
from vmctl.model.tls import Endpoint, TLSCreds
from vmctl.ops.devices import object_exists, remove_object
from vmctl.ops.queries import execute_checked
from vmctl.qmp import Monitor
from vmctl.vm.secrets import load_master_key, secret_object

Purpose = Literal["migration", "nbd"]


def creds_id(purpose: Purpose, endpoint: Endpoint) -> str:
    """One object per use and end: an NBD server's credentials stay in use while it runs."""
    return f"vmctl-tls-{purpose}-{endpoint}"


def stage(creds: TLSCreds, run_dir: Path, purpose: Purpose, endpoint: Endpoint) -> Path:
    """Copy one end's files into ``run_dir/tls-<purpose>-<endpoint>``: root's, readable by the run dir's
    group (QEMU's), nobody else."""
    sources = creds.paths(endpoint)
    directory = run_dir / f"tls-{purpose}-{endpoint}"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o750)
    group = run_dir.stat().st_gid
    os.chown(directory, os.geteuid(), group)
    for source in sources:
        copy = directory / os.path.basename(source)
        fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "wb") as out, open(source, "rb") as data:
            shutil.copyfileobj(data, out)
        os.chown(copy, os.geteuid(), group)
    return directory


def load(qmp: Monitor, creds: TLSCreds, run_dir: Path, purpose: Purpose, endpoint: Endpoint) -> str:
    """Load one end's credentials into QEMU; returns the object's id (``unload`` takes it out).
    Credentials loaded earlier are replaced: the files may have changed."""
    object_id = creds_id(purpose, endpoint)
    directory = stage(creds, run_dir, purpose, endpoint)
    unload(qmp, purpose, endpoint)
    arguments: dict[str, Any] = {
        "qom-type": "tls-creds-x509",
        "id": object_id,
        "dir": str(directory),
        "endpoint": endpoint,
        "verify-peer": True,
    }
    if creds.key_password is not None:  # the key's password, encrypted with the master key
        key = load_master_key(run_dir)
        if key is None:
            raise InvalidArgument("this VM has no master key for the TLS key's password (launched by an older vmctl)")
        password = secret_object(f"{object_id}-password", creds.key_password, key)
        execute_checked(qmp, "object-add", password, took=lambda: object_exists(qmp, password["id"]))
        arguments["passwordid"] = password["id"]
    try:
        execute_checked(qmp, "object-add", arguments, took=lambda: object_exists(qmp, object_id))
    except BaseException:
        remove_object(qmp, f"{object_id}-password")
        raise
    return object_id


def unload(qmp: Monitor, purpose: Purpose, endpoint: Endpoint) -> None:
    """Take one end's credentials (and their key's password) out of QEMU, if there."""
    remove_object(qmp, creds_id(purpose, endpoint))
    remove_object(qmp, f"{creds_id(purpose, endpoint)}-password")
