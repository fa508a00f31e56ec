"""Tenants cannot reach each other: each QEMU a root vmctl starts runs as a uid of its own, from the
pool, in a /dev of its own, and nothing of one VM is open to another VM's QEMU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from integration.conftest import VMFactory, make_image
from integration.versions import ISOLATION
from vmctl import VM, DiskSpec
from vmctl.errors import LaunchError
from vmctl.testing import GuestShell
from vmctl.vm.devjail import OWNED_NODES
from vmctl.vm.uidpool import UidPool

pytestmark = [
    pytest.mark.versioned(ISOLATION),
    pytest.mark.skipif(os.geteuid() != 0, reason="uids of their own and private /devs need vmctl as root"),
]

#: What a probe does with each path: open a file, list a directory, connect to a socket.
PROBE = textwrap.dedent(
    """
    import errno, json, os, socket, stat, sys
    found = {}
    for path in sys.argv[1:]:
        try:
            mode = os.lstat(path).st_mode
            if stat.S_ISSOCK(mode):
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(path)
            elif stat.S_ISDIR(mode):
                os.listdir(path)
            else:
                os.close(os.open(path, os.O_RDONLY))
            found[path] = "reached"
        except OSError as exc:
            found[path] = errno.errorcode.get(exc.errno, str(exc.errno))
    print(json.dumps(found))
    """
)


def ids_of(pid: int) -> tuple[str, str, str]:
    """A process's uid, gid and supplementary groups, as /proc says."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return fields["Uid"].split()[0], fields["Gid"].split()[0], ",".join(fields["Groups"].split())


def probe_as(pid: int, paths: list[str]) -> dict[str, str]:
    """What a process with ``pid``'s uid, gid and groups (an escaped QEMU) gets at each path."""
    uid, gid, groups = ids_of(pid)
    who = ["setpriv", f"--reuid={uid}", f"--regid={gid}", f"--groups={groups}" if groups else "--clear-groups"]
    done = subprocess.run([*who, sys.executable, "-I", "-S", "-c", PROBE, *paths], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: dict[str, str] = json.loads(done.stdout)
    return result


def everything_in(directory: Path) -> list[str]:
    paths = [str(directory)]
    for root, dirs, files in os.walk(directory):
        paths += [os.path.join(root, name) for name in (*dirs, *files)]
    return paths


def test_another_vms_qemu_reaches_nothing_in_a_vms_run_dir(vms: VMFactory) -> None:
    a = vms.launch(vms.spec("a"), wait_ready=False)
    b = vms.launch(vms.spec("b", guest_agent=True), wait_ready=False)
    assert ids_of(a.pid)[0] != ids_of(b.pid)[0]
    tried = probe_as(a.pid, everything_in(b.run_dir))
    names = {Path(path).name for path in tried}
    assert {"qmp.sock", "tools.sock", "qemu.pid", "vm.json", "master-key", "qemu.log"} <= names, tried
    assert set(tried.values()) <= {"EACCES", "ECONNREFUSED"}, tried
    assert probe_as(b.pid, [str(b.run_dir / "qmp.sock")]) != {str(b.run_dir / "qmp.sock"): "EACCES"}  # B's own


def test_a_qemu_sees_only_its_own_small_dev(vms: VMFactory) -> None:
    a = vms.launch(vms.spec("a"), wait_ready=False)
    b = vms.launch(vms.spec("b"), wait_ready=False)
    dev = Path(f"/proc/{a.pid}/root/dev")
    seen = set(os.listdir(dev))
    assert seen <= {"null", "zero", "full", "random", "urandom", "ptmx", "pts", "fd", "stdin", "stdout", "stderr",
                    "kvm", "net", "vhost-net", "userfaultfd"}, seen  # fmt: skip
    assert not {"sda", "vda", "mem", "kmem", "port", "nvme0n1"} & seen
    uid, gid, _ = ids_of(a.pid)
    for name in OWNED_NODES:
        node = dev / name
        if node.exists():
            info = node.stat()
            assert (str(info.st_uid), str(info.st_gid), info.st_mode & 0o777) == (uid, gid, 0o600), name
    # B's QEMU has its own nodes, not A's: the host's /dev is untouched.
    assert Path(f"/proc/{b.pid}/root/dev/kvm").stat().st_uid == int(ids_of(b.pid)[0])
    assert os.stat("/dev/kvm").st_uid == 0


def test_no_uid_is_given_to_two_live_vms_through_kills_attach_and_a_killed_control_plane(
    vms: VMFactory, tmp_path: Path
) -> None:
    live = [vms.launch(vms.spec(f"u{i}"), wait_ready=False) for i in range(4)]
    os.kill(live[0].pid, signal.SIGKILL)  # a crash, seen by nobody yet
    live[1].kill()
    live[2].close()  # detached: the lease stays with its QEMU
    vms.vms.remove(live[2])
    attached = VM.attach(vms.run_dir("u2"))
    vms.vms.append(attached)
    # A control plane that launches a VM and is killed: its QEMU keeps running, and its uid.
    orphan_dir = vms.run_dir("orphan")
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from integration.conftest import VMFactory
        from vmctl.testing import TestGuest
        from vmctl import VM
        factory = VMFactory(TestGuest.ensure(), __import__("pathlib").Path({str(tmp_path)!r}))
        vm = VM.launch(factory.spec("orphan"), run_dir={str(orphan_dir)!r})
        print(vm.pid, flush=True)
        os.kill(os.getpid(), 9)
        """
    )
    plane = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert plane.stdout.strip().isdigit(), plane.stderr
    orphan_pid = int(plane.stdout)
    try:
        more = [vms.launch(vms.spec(f"n{i}"), wait_ready=False) for i in range(3)]
        running = [vm for vm in (*live, attached, *more) if not vm.has_exited and vm is not live[2]]
        pids = [vm.pid for vm in running] + [orphan_pid]
        uids = [ids_of(pid)[0] for pid in pids]
        assert len(set(uids)) == len(uids), dict(zip(pids, uids, strict=True))
        pool = UidPool.from_env()
        assert all(int(uid) in pool.ids and pool.holder(int(uid)) for uid in uids)
        assert int(ids_of(orphan_pid)[0]) in pool.ids
    finally:
        orphan = VM.attach(orphan_dir)
        orphan.kill()
        orphan.close()
    # Gone, whoever ended them: their uids are free again.
    dead_uid = int(os.stat(vms.run_dir("u0")).st_gid)
    deadline = time.monotonic() + 10
    while UidPool.from_env().holder(dead_uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not UidPool.from_env().holder(dead_uid)


def test_a_migration_target_on_the_same_host_runs_as_a_uid_of_its_own(vms: VMFactory) -> None:
    source = vms.launch(vms.spec("src"))
    target = vms.incoming(source)
    assert ids_of(source.pid)[0] != ids_of(target.pid)[0]
    # While the target listens, the source's QEMU cannot reach its socket: vmctl hands it a connection.
    socket_path = str(target.run_dir / "qmp.sock")
    assert probe_as(source.pid, [socket_path]) == {socket_path: "EACCES"}
    result = source.migrate(target).wait(120)
    assert result.status == "completed"
    assert target.status().running
    with GuestShell(target) as shell:
        assert shell.run("echo moved").output == "moved\n"


def test_a_storage_copy_between_uids_reaches_the_targets_nbd_server_through_vmctl(
    vms: VMFactory, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "data.qcow2", "qcow2", "16M")
    source = vms.launch(vms.spec("src", disks=[DiskSpec(id="d1", path=image)]))
    with GuestShell(source) as shell:
        shell.run("echo copied-across | dd of=/dev/vda bs=512 conv=fsync 2>/dev/null", check=True)
    target_image = make_image(tmp_path / "copy.qcow2", "qcow2", "16M")
    target = VM.launch_incoming(
        source.migration_target_spec(name="dst", disk_paths={"d1": target_image}),
        run_dir=vms.run_dir("dst"),
        inventory=source.inventory,
    )
    vms.vms.append(target)
    assert ids_of(source.pid)[0] != ids_of(target.pid)[0]
    assert source.migrate(target, copy_storage=True).wait(180).status == "completed"
    with GuestShell(target) as shell:
        assert shell.run("head -c 13 /dev/vda").output == "copied-across"


def test_a_launch_that_fails_holds_no_uid_after_it(vms: VMFactory) -> None:
    pool = UidPool.from_env()
    before = {uid for uid in pool.ids if pool.holder(uid)}
    with pytest.raises(LaunchError, match="no-such-device"):
        vms.launch(vms.spec("broken", extra_args=("-device", "no-such-device")), wait_ready=False)
    assert {uid for uid in pool.ids if pool.holder(uid)} <= before
