"""Secrets: never shown, sealed in the state file, encrypted with the VM's master key for QEMU."""

from __future__ import annotations

import base64
import json
import os
import pickle
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vmctl import DiskSpec, Inventory, Secret, VMSpec
from vmctl.errors import SpecError
from vmctl.vm.secrets import create_master_key, load_master_key, master_key_fd, seal, secret_object, unseal
from vmctl.vm.statefile import STATE_FILE, VMRecord, read_record, write_record

PASSPHRASE = b"correct horse battery staple"


def qemu_decrypts(obj: dict[str, str], key: bytes) -> bytes:
    """What QEMU's secret object does with ``data`` (AES-256-CBC, the iv given, PKCS#7 padding)."""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(base64.b64decode(obj["iv"]))).decryptor()
    padded = decryptor.update(base64.b64decode(obj["data"])) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    return unpadder.update(padded) + unpadder.finalize()


def test_a_secret_never_shows_itself() -> None:
    secret = Secret("hunter2")
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret) and "hunter2" not in f"{secret!r} {secret}"
    assert "hunter2" not in repr(DiskSpec(id="d1", path="/i.qcow2", encryption=secret))
    with pytest.raises(TypeError):
        pickle.dumps(secret)
    assert secret == Secret(b"hunter2") and secret != Secret("other")
    with pytest.raises(TypeError):
        Secret("")


def test_a_secret_object_is_encrypted_with_the_master_key_and_a_fresh_iv(tmp_path: Path) -> None:
    key = create_master_key(tmp_path)
    assert load_master_key(tmp_path) == key and len(key) == 32
    assert (tmp_path / "master-key").stat().st_mode & 0o777 == 0o600
    first = secret_object("vmctl-secret-d1", Secret(PASSPHRASE), key)
    second = secret_object("vmctl-secret-d1", Secret(PASSPHRASE), key)
    assert first["keyid"] == "vmctl-master-key" and first["format"] == "base64"
    assert first["iv"] != second["iv"] and first["data"] != second["data"]
    assert PASSPHRASE not in json.dumps(first).encode()
    assert qemu_decrypts(first, key) == qemu_decrypts(second, key) == PASSPHRASE


def test_the_master_key_reaches_qemu_in_a_memfd_it_reads_from_the_start() -> None:
    fd = master_key_fd(b"k" * 32)
    try:
        with open(f"/proc/self/fd/{fd}", "rb") as reopened:  # as QEMU opens it
            assert reopened.read() == b"k" * 32
    finally:
        os.close(fd)


def test_sealed_secrets_come_back_whole_and_only_with_the_key(tmp_path: Path) -> None:
    key = create_master_key(tmp_path)
    sealed = seal(Secret(PASSPHRASE), key)
    assert PASSPHRASE not in json.dumps(sealed).encode()
    assert unseal(sealed, key) == Secret(PASSPHRASE)
    with pytest.raises(ValueError):
        unseal(sealed, b"x" * 32)


def test_the_state_file_holds_a_disks_passphrase_sealed(tmp_path: Path) -> None:
    create_master_key(tmp_path)
    disk = DiskSpec(id="d1", path="/img/enc.qcow2", encryption=Secret(PASSPHRASE))
    spec = VMSpec(name="vm1", kernel="/boot/vmlinuz", disks=[disk])
    write_record(
        tmp_path,
        VMRecord(pid=1, start_time=2, qmp_socket="/x", spec=spec, inventory=Inventory(disks=(disk,))),
    )
    text = (tmp_path / STATE_FILE).read_bytes()
    assert PASSPHRASE not in text and b"vmctl-sealed-secret" in text
    record = read_record(tmp_path)
    assert record.spec.disks[0].encryption == Secret(PASSPHRASE)
    assert record.inventory.disks[0] == disk


def test_an_encrypted_disk_opens_every_layer_with_its_secret_object() -> None:
    disk = DiskSpec(id="d1", path="/img/enc.qcow2", encryption=Secret(PASSPHRASE))
    fmt = disk.layer_nodes(0, "/dev/fdset/0")[1]
    assert fmt["encrypt"] == {"format": "luks", "key-secret": "vmctl-secret-d1"}
    with pytest.raises(SpecError, match="qcow2"):
        DiskSpec(id="d2", path="/img/x.raw", format="raw", encryption=Secret(PASSPHRASE))
    with pytest.raises(SpecError, match=r"vmctl\.Secret"):
        DiskSpec(id="d3", path="/img/x.qcow2", encryption="hunter2")  # type: ignore[arg-type]


def test_the_command_line_loads_the_master_key_first_then_secrets_in_ciphertext_only(tmp_path: Path) -> None:
    key = create_master_key(tmp_path)
    disk = DiskSpec(id="d1", path="/img/enc.qcow2", encryption=Secret(PASSPHRASE))
    spec = VMSpec(name="vm1", kernel="/boot/vmlinuz", disks=[disk])
    argv = spec.command_line(
        qemu_binary="qemu",
        run_dir=tmp_path,
        accel="tcg",
        passed={"vmctl:master-key": 9, "vmctl:disk:d1": 10},
        objects=[secret_object("vmctl-secret-d1", disk.encryption, key)],  # type: ignore[arg-type]
    )
    objects = [argv[i + 1] for i, a in enumerate(argv) if a == "-object"]
    assert objects[0] == "secret,id=vmctl-master-key,format=raw,file=/proc/self/fd/9"
    assert json.loads(objects[1])["keyid"] == "vmctl-master-key"
    assert PASSPHRASE not in " ".join(argv).encode() and key not in " ".join(argv).encode()
