"""Backups' values and refusals, before anything reaches QEMU or qemu-img."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmctl import Backup, restore_disk
from vmctl.errors import InvalidArgument
from vmctl.model.backup import check_checkpoint_name


@pytest.mark.parametrize("name", ["", "a b", "x" * 41, "../up", 5])
def test_a_checkpoint_name_outside_its_alphabet_is_refused(name: object) -> None:
    with pytest.raises(InvalidArgument, match="checkpoint name"):
        check_checkpoint_name(name)


def test_a_backup_value_is_frozen_and_keeps_its_files() -> None:
    files = {"d1": "/b/d1.c1.qcow2"}
    backup = Backup(checkpoint="c1", since=None, files=files, sizes={"d1": 4096}, started=1.0, finished=2.0)
    files["d1"] = "changed"
    assert backup.files == {"d1": "/b/d1.c1.qcow2"}
    with pytest.raises(TypeError):
        backup.files["d2"] = "x"  # type: ignore[index]


def test_restore_refuses_a_missing_chain_file_or_an_existing_destination(tmp_path: Path) -> None:
    (tmp_path / "full.qcow2").write_bytes(b"")
    (tmp_path / "taken.raw").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="needs the full backup"):
        restore_disk([], tmp_path / "out.raw")
    with pytest.raises(InvalidArgument, match="does not exist"):
        restore_disk([tmp_path / "full.qcow2", tmp_path / "gone.qcow2"], tmp_path / "out.raw")
    with pytest.raises(InvalidArgument, match="exists already"):
        restore_disk([tmp_path / "full.qcow2"], tmp_path / "taken.raw")
    with pytest.raises(InvalidArgument, match="qcow2 or raw"):
        restore_disk([tmp_path / "full.qcow2"], tmp_path / "out.vmdk", format="vmdk")  # type: ignore[arg-type]
