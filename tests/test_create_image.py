"""create_image's LUKS key derivation time reaches qemu-img, and bad values never do."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from vmctl import Secret, create_image
from vmctl.errors import InvalidArgument


def key_slot_iterations(image: Path) -> int:
    info = subprocess.run(
        ["qemu-img", "info", "--output=json", str(image)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    [slot] = [s for s in json.loads(info)["format-specific"]["data"]["encrypt"]["slots"] if s["active"]]
    return int(slot["iters"])


def test_a_shorter_key_derivation_time_gives_the_key_slot_fewer_iterations(tmp_path: Path) -> None:
    create_image(tmp_path / "quick.qcow2", 1 << 20, encryption=Secret(b"pass"), key_derivation_ms=10)
    create_image(tmp_path / "slower.qcow2", 1 << 20, encryption=Secret(b"pass"), key_derivation_ms=300)
    # qemu-img measures this host's speed each time: the ratio is 30 give or take the noise.
    assert key_slot_iterations(tmp_path / "quick.qcow2") * 5 < key_slot_iterations(tmp_path / "slower.qcow2")


@pytest.mark.parametrize("bad", [0, -5, True, 2.5, "100"])
def test_a_bad_key_derivation_time_is_refused_before_qemu_img_runs(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidArgument, match="key_derivation_ms"):
        create_image(tmp_path / "x.qcow2", 1 << 20, encryption=Secret(b"pass"), key_derivation_ms=bad)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
