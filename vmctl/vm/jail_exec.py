"""Run as a script, never imported: give this process a /dev of its own, then exec the command.

``python -I -S jail_exec.py private|shared UID GID NODE... -- COMMAND...`` (see
``vmctl.vm.devjail``, which writes the line). Either way QEMU's umask becomes 007: what it creates
(its sockets) is its own and its group's, never everyone's. ``private``: in a new mount namespace,
private so that nothing mounted here reaches the host,
a small tmpfs on /dev holding only the device nodes named (``name:major:minor:mode:owned``, where
``owned`` nodes are made the VM's, ``UID:GID`` mode 0600 instead of root's), the usual links, and
a devpts of its own. Then exec: QEMU runs with the same pid and sees nothing else of the host's
devices. Standard library only, so that it starts fast and imports nothing of vmctl's.
"""

import ctypes
import os
import stat
import sys

CLONE_NEWNS = 0x00020000
MS_NOSUID = 0x2
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(None, use_errno=True)


def _fail(what: str, errno: int) -> None:
    sys.stderr.write(f"vmctl: cannot give QEMU a private /dev: {what}: {os.strerror(errno)}\n")
    sys.exit(126)


def _call(what: str, result: int) -> None:
    if result != 0:
        _fail(what, ctypes.get_errno())


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _call(
        f"mount {target}",
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
    )


def main(argv: list[str]) -> None:
    split = argv.index("--")
    mode, uid, gid, *nodes = argv[:split]
    command = argv[split + 1 :]
    if mode == "private":
        _private_dev(uid, gid, nodes)
    os.umask(0o007)  # after /dev is made: its directories stay 0755
    # The tmpfs is root's, 0755: an unprivileged QEMU can neither add nor remove anything in it.
    os.execvp(command[0], command)


def _private_dev(uid: str, gid: str, nodes: list[str]) -> None:
    _call("unshare", _libc.unshare(CLONE_NEWNS))
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    _mount("vmctl-dev", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=256k,nr_inodes=64")
    for node in nodes:
        name, major, minor, mode, owned = node.split(":")
        path = f"/dev/{name}"
        os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
        os.mknod(path, stat.S_IFCHR | int(mode, 8), os.makedev(int(major), int(minor)))
        os.chmod(path, int(mode, 8))  # past the umask
        if owned == "1":
            os.chown(path, int(uid), int(gid))
    os.mkdir("/dev/pts", 0o755)
    _mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, f"newinstance,ptmxmode=0666,mode=0620,gid={gid}")
    for link, target in (
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ):
        os.symlink(target, f"/dev/{link}")


if __name__ == "__main__":
    main(sys.argv[1:])
