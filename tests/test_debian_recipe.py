"""The Debian test guest's recipe: what it hashes, the ids it derives, the disk layout it writes."""

from __future__ import annotations

import attrs
import pytest

from vmctl.testing import debian
from vmctl.testing.debian import (
    DISK_BYTES,
    ESP_MIB,
    ESP_OFFSET,
    MIB,
    ROOT_MIB,
    ROOT_OFFSET,
    SECTOR,
    Ids,
    loader_entry,
    partition_table,
    recipe,
    root_files,
)


def partitions(table: str) -> dict[str, dict[str, str]]:
    """sfdisk's partition lines, by name: each field as text."""
    found = {}
    for line in table.splitlines():
        if line.startswith("start="):
            fields = dict(field.strip().split("=", 1) for field in line.split(","))
            found[fields["name"]] = fields
    return found


def test_the_recipe_hash_is_stable_and_changes_with_the_packages_and_the_files(monkeypatch: pytest.MonkeyPatch) -> None:
    before = recipe()
    assert recipe() == before and len(before) == 12
    monkeypatch.setattr(debian, "PACKAGES", (*debian.PACKAGES, "less"))
    with_less = recipe()
    assert with_less != before
    monkeypatch.setattr(debian, "_FILES", {**debian._FILES, "etc/motd": "hello\n"})
    assert recipe() not in (before, with_less)


def test_ids_are_derived_from_the_recipe_and_all_differ() -> None:
    ids = Ids.of("abc")
    assert Ids.of("abc") == ids and Ids.of("abd") != ids
    values = list(attrs.asdict(ids).values())
    assert len(set(values)) == len(values)
    assert len(ids.machine_id) == 32 and len(ids.esp_volume_id) == 8


def test_the_partition_table_puts_the_esp_then_the_root_where_the_guest_says_they_start() -> None:
    ids = Ids.of(recipe())
    table = partition_table(ids)
    assert table.startswith("label: gpt\n") and f"label-id: {ids.disk_guid}\n" in table
    parts = partitions(table)
    assert int(parts["esp"]["start"]) * SECTOR == ESP_OFFSET == MIB
    assert int(parts["esp"]["size"]) * SECTOR == ESP_MIB * MIB
    assert int(parts["root"]["start"]) * SECTOR == ROOT_OFFSET == ESP_OFFSET + ESP_MIB * MIB
    assert int(parts["root"]["size"]) * SECTOR == ROOT_MIB * MIB
    # The backup GPT's 33 sectors fit after the root.
    assert DISK_BYTES - (ROOT_OFFSET + ROOT_MIB * MIB) >= 33 * SECTOR
    assert parts["root"]["uuid"] == ids.root_partuuid and parts["esp"]["uuid"] == ids.esp_partuuid


def test_the_loader_entry_and_fstab_name_the_root_partition_by_its_uuid() -> None:
    ids = Ids.of(recipe())
    entry = loader_entry(ids)
    options = next(line for line in entry.splitlines() if line.startswith("options "))
    assert f"root=PARTUUID={ids.root_partuuid}" in options.split() and "console=ttyS0" in options.split()
    files = root_files(ids)
    assert files["etc/fstab"].split()[:3] == [f"PARTUUID={ids.root_partuuid}", "/", "ext4"]
    assert files["etc/machine-id"] == ids.machine_id + "\n"
    assert "{" not in "".join(files.values())  # every field filled in
