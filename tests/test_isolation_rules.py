"""How a launch is confined: a uid from the pool and a private /dev as root, and a warning otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from vmctl.vm import devjail
from vmctl.vm.isolation import Isolation
from vmctl.vm.uidpool import UidPool

FIRST = 1_950_000_000


def isolation(tmp_path: Path, *, private_dev: bool = True) -> Isolation:
    return Isolation(pool=UidPool(first=FIRST, size=2, lock_dir=tmp_path / "pool"), private_dev=private_dev)


def test_as_root_auto_takes_a_pool_uid_and_runs_qemu_in_a_private_dev_as_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    confined = isolation(tmp_path).confine("auto", vm="vm1")
    try:
        assert confined.user is not None and confined.user.uid == FIRST and confined.lease is not None
        assert confined.pass_fds == (confined.lease.fd,)
        jail = confined.prefix.index(str(devjail.JAIL_SCRIPT))
        assert confined.prefix[jail + 1 : jail + 4] == ("private", str(FIRST), str(FIRST))
        assert confined.prefix[confined.prefix.index("--") + 1] == "setpriv"  # the jail runs setpriv, which runs QEMU
        assert f"--reuid={FIRST}" in confined.prefix
    finally:
        confined.close()
    assert not isolation(tmp_path).pool.holder(FIRST)


def test_a_named_run_as_keeps_its_user_and_still_gets_a_private_dev(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    confined = isolation(tmp_path).confine("64123", vm="vm1")
    assert confined.lease is None and confined.user is not None and confined.user.uid == 64123
    assert str(devjail.JAIL_SCRIPT) in confined.prefix


def test_turning_the_private_dev_off_is_said_at_warning_and_keeps_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with capture_logs() as logs:
        confined = isolation(tmp_path, private_dev=False).confine("auto", vm="vm1")
    confined.close()
    assert "shared" in confined.prefix
    assert [entry["event"] for entry in logs if entry["log_level"] == "warning"] == ["isolation.shared_dev"]


def test_without_root_qemu_runs_as_vmctl_with_the_hosts_dev_and_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    with capture_logs() as logs:
        confined = isolation(tmp_path).confine("auto", vm="vm1")
    assert (confined.user, confined.lease, confined.prefix) == (None, None, ())
    assert any(entry["event"] == "isolation.shared_dev" for entry in logs)


def test_the_private_dev_holds_the_hosts_basic_nodes_and_only_existing_owned_ones() -> None:
    nodes = {node.split(":")[0]: node for node in devjail.nodes()}
    assert {"null", "zero", "full", "random", "urandom"} <= set(nodes)
    assert nodes["null"].split(":")[1:] == ["1", "3", "666", "0"]
    for name in set(nodes) & set(devjail.OWNED_NODES):
        assert nodes[name].endswith(":600:1") and os.path.exists(f"/dev/{name}")
