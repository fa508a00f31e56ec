"""Secrets as libvirt passes them: a master key per VM, every other secret encrypted with it.

The master key is 32 random bytes in the run dir (root's only, mode 0600). QEMU gets it once, at
launch, through a memfd it reads as ``/proc/self/fd/N`` (never on its command line, never on
disk where it could read it). Every other secret reaches QEMU as a ``secret`` object whose data is
AES-256-CBC-encrypted with that key (``keyid``, ``iv``), on the command line and over QMP alike;
the state file holds secrets sealed the same way. So no secret is ever in clear on the QMP
socket, in ``/proc/<pid>/cmdline``, in the logs, a transcript or the state file.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmctl.errors import LaunchError
from vmctl.model.names import MASTER_KEY_FILE, MASTER_KEY_ID
from vmctl.model.secret import Secret
from vmctl.vm.passing import own_file

KEY_BYTES = 32  # AES-256
_IV_BYTES = 16
#: How a sealed secret looks in the state file (a JSON object with this one key).
SEALED = "vmctl-sealed-secret"


def create_master_key(run_dir: Path) -> bytes:
    """A new master key for a VM being launched, written to its run dir (root's only)."""
    key = os.urandom(KEY_BYTES)
    fd = own_file(str(run_dir / MASTER_KEY_FILE), 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key)
        out.flush()
        os.fsync(out.fileno())
    return key


def load_master_key(run_dir: Path) -> bytes | None:
    """The VM's master key, or None for a VM launched without one (by an older vmctl)."""
    try:
        fd = os.open(run_dir / MASTER_KEY_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as key_file:
        info = os.fstat(key_file.fileno())
        if info.st_uid != os.geteuid() or info.st_mode & 0o077:
            raise LaunchError(f"{run_dir / MASTER_KEY_FILE} is not vmctl's own private file: remove the VM")
        key = key_file.read()
    if len(key) != KEY_BYTES:
        raise LaunchError(f"{run_dir / MASTER_KEY_FILE} is not a master key ({len(key)} bytes)")
    return key


def master_key_fd(key: bytes) -> int:
    """A memfd holding the key, for QEMU to read once at launch (a memfd's mode lets QEMU's user
    reopen it through /proc/self/fd; nothing else can name it)."""
    fd = os.memfd_create("vmctl-master-key", os.MFD_CLOEXEC)
    os.write(fd, key)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def master_key_object(fd: int) -> str:
    """The ``-object`` that loads the master key from the fd QEMU inherits."""
    return f"secret,id={MASTER_KEY_ID},format=raw,file=/proc/self/fd/{fd}"


def secret_object(object_id: str, secret: Secret, key: bytes) -> dict[str, Any]:
    """``object-add`` arguments (or an ``-object`` in JSON) for ``secret``, encrypted with ``key``."""
    data, iv = _encrypt(secret.reveal(), key)
    return {
        "qom-type": "secret",
        "id": object_id,
        "data": data,
        "format": "base64",
        "keyid": MASTER_KEY_ID,
        "iv": iv,
    }


def seal(secret: Secret, key: bytes) -> dict[str, str]:
    """``secret`` as the state file holds it."""
    data, iv = _encrypt(secret.reveal(), key)
    return {SEALED: data, "iv": iv}


def unseal(sealed: dict[str, str], key: bytes) -> Secret:
    decryptor = Cipher(algorithms.AES(key), modes.CBC(base64.b64decode(sealed["iv"]))).decryptor()
    padded = decryptor.update(base64.b64decode(sealed[SEALED])) + decryptor.finalize()
    unpadder = padding.PKCS7(algorithms.AES.block_size).unpadder()
    return Secret(unpadder.update(padded) + unpadder.finalize())


def _encrypt(plaintext: bytes, key: bytes) -> tuple[str, str]:
    """AES-256-CBC with PKCS#7 padding, as QEMU's secret objects decrypt (base64 data and iv)."""
    iv = os.urandom(_IV_BYTES)
    padder = padding.PKCS7(algorithms.AES.block_size).padder()
    padded = padder.update(plaintext) + padder.finalize()
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(padded) + encryptor.finalize()
    return base64.b64encode(ciphertext).decode(), base64.b64encode(iv).decode()
