"""The uid pool: one uid per live VM, held by the QEMU's inherited lock, freed when it goes."""

from __future__ import annotations

import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmctl.errors import LaunchError, PoolExhausted
from vmctl.vm import uidpool
from vmctl.vm.uidpool import UidPool

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a pool's processes run as its ids: needs root")

FIRST = 1_900_000_000


@pytest.fixture
def pool(tmp_path: Path) -> UidPool:
    return UidPool(first=FIRST, size=3, lock_dir=tmp_path / "pool")


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        child.kill()
        child.wait()


def test_leases_held_at_once_get_different_uids_and_a_closed_one_is_given_again(pool: UidPool) -> None:
    first, second = pool.take(), pool.take()
    assert first.uid != second.uid and {first.uid, second.uid} <= set(pool.ids)
    assert pool.holder(first.uid)
    first.close()
    assert not pool.holder(first.uid)
    assert pool.take().uid == first.uid


def test_a_full_pool_is_a_typed_error(pool: UidPool) -> None:
    leases = [pool.take() for _ in pool.ids]
    with pytest.raises(PoolExhausted, match="held by a live VM"):
        pool.take()
    for lease in leases:
        lease.close()


def test_a_lease_passed_to_a_process_stays_taken_until_that_process_ends(
    pool: UidPool, children: list[subprocess.Popen[bytes]]
) -> None:
    lease = pool.take()
    child = subprocess.Popen(["sleep", "60"], pass_fds=[lease.fd])
    children.append(child)
    lease.close()  # the control plane lets go (or dies): the child holds the lock
    assert pool.holder(lease.uid)
    assert pool.take().uid != lease.uid
    child.kill()
    child.wait()
    assert not pool.holder(lease.uid)


@needs_root
def test_a_uid_a_live_process_runs_as_is_not_given_even_unlocked(
    pool: UidPool, children: list[subprocess.Popen[bytes]]
) -> None:
    children.append(
        subprocess.Popen(["setpriv", f"--reuid={FIRST}", f"--regid={FIRST}", "--clear-groups", "sleep", "60"])
    )
    for _ in range(100):  # until setpriv has changed its uid
        if FIRST in uidpool.uids_in_use():
            break
        subprocess.run(["sleep", "0.02"], check=True)
    lease = pool.take()
    assert lease.uid == FIRST + 1
    lease.close()


def test_a_pool_that_meets_a_user_or_subordinate_ids_is_refused(
    pool: UidPool, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    entry = pwd.struct_passwd(("tenant", "x", FIRST + 1, FIRST + 1, "", "/", "/bin/sh"))
    monkeypatch.setattr(pwd, "getpwall", lambda: [entry])
    with pytest.raises(LaunchError, match="holds the user tenant"):
        pool.take()
    monkeypatch.setattr(pwd, "getpwall", list)
    subuid = tmp_path / "subuid"
    subuid.write_text(f"alice:{FIRST - 10}:65536\n")
    monkeypatch.setattr(uidpool, "_SUBORDINATE_FILES", (str(subuid),))
    with pytest.raises(LaunchError, match="alice's subordinate ids"):
        pool.take()


@pytest.mark.parametrize(("first", "size"), [(1000, 10), (2**31 - 5, 10), (FIRST, 0)])
def test_a_pool_outside_the_ids_it_may_use_is_refused(first: int, size: int) -> None:
    with pytest.raises(LaunchError, match="uid pool"):
        UidPool(first=first, size=size)


def test_a_lock_dir_others_may_enter_is_refused(pool: UidPool) -> None:
    pool.lock_dir.mkdir(mode=0o755)
    pool.lock_dir.chmod(0o755)
    with pytest.raises(LaunchError, match="mode 0700"):
        pool.take()


def test_the_pool_is_configured_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMCTL_UID_POOL", f"{FIRST}:16")
    monkeypatch.setenv("VMCTL_UID_POOL_DIR", str(tmp_path))
    assert UidPool.from_env() == UidPool(first=FIRST, size=16, lock_dir=tmp_path)
    monkeypatch.setenv("VMCTL_UID_POOL", "lots")
    with pytest.raises(LaunchError, match="FIRST:SIZE"):
        UidPool.from_env()
