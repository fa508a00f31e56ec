"""A private libvirtd for tests: its own config, sockets, state, cache and logs, nothing of the host's.

The daemon runs as root (its QEMU driver too, unconfined) in a mount namespace of its own where
libvirt's fixed directories (``/etc/libvirt``, ``/run/libvirt``, ``/var/lib/libvirt``,
``/var/cache/libvirt``, ``/var/log/libvirt``) are bind mounts of directories below ``root_dir``, and
in a UTS namespace with a hostname of its own: libvirt refuses to migrate between two daemons with
the same hostname or host UUID. Everything it starts stays in that mount namespace, which is how
``stop()`` finds the QEMUs it leaves behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from structlog.typing import FilteringBoundLogger

from vmctl.errors import VmctlError
from vmctl.logs import get_logger
from vmctl.vm.process import qemu_binary

if TYPE_CHECKING:
    import libvirt

log: FilteringBoundLogger = get_logger(__name__)

#: libvirt's compiled-in directories; in the namespace, each is ``root_dir`` + its path.
LIBVIRT_DIRS = tuple(
    Path(path)
    for path in ("/etc/libvirt", "/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt", "/var/log/libvirt")
)
CACHE_DIR = Path("/var/cache/libvirt")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0

# Runs in the new namespaces: bind the private dirs over libvirt's ("$1" is the hostname, then
# pairs of source and target), then becomes the daemon itself, so the pid we hold is libvirtd's.
_ENTER_NAMESPACE = """set -e
hostname "$1"; shift
while [ "$#" -gt 1 ] && [ "$1" != -- ]; do mount --bind "$1" "$2"; shift 2; done
shift
exec "$@"
"""


class LibvirtdError(VmctlError):
    """The private libvirtd did not start, or left something behind."""


class PrivateLibvirtd:
    """One private libvirtd under ``root_dir``; a context manager (start on enter, stop on exit).

    ``netns``: run it in that existing network namespace. ``listen_address``: also listen on TCP
    there (no auth, no TLS), and take incoming migrations on it. ``capabilities_cache``: a directory
    to share as ``/var/cache/libvirt`` between daemons, so that only the first probes each QEMU.
    ``emulator``: the QEMU that ``start()`` has libvirt probe (default: ``qemu_binary()``).
    """

    def __init__(
        self,
        root_dir: Path,
        *,
        netns: str | None = None,
        listen_address: str | None = None,
        tcp_port: int = 16509,
        capabilities_cache: Path | None = None,
        emulator: str | None = None,
    ) -> None:
        self.root_dir = root_dir
        self.netns = netns
        self.listen_address = listen_address
        self.tcp_port = tcp_port
        self.capabilities_cache = capabilities_cache
        self.emulator = emulator or qemu_binary()
        self.host_uuid = str(uuid.uuid4())
        # With a dot, libvirt takes it as it is instead of resolving it to a fully qualified name.
        self.hostname = f"libvirtd-{self.host_uuid[:8]}.test"
        self._process: subprocess.Popen[bytes] | None = None
        self._mount_namespace: str | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.socket_path}"

    @property
    def socket_path(self) -> Path:
        return self.private("/run/libvirt/libvirt-sock")

    @property
    def tcp_uri(self) -> str | None:
        return None if self.listen_address is None else f"qemu+tcp://{self.listen_address}:{self.tcp_port}/system"

    @property
    def log_path(self) -> Path:
        return self.root_dir / "libvirtd.log"

    def private(self, path: str | Path) -> Path:
        """Where the daemon's ``path`` (below one of ``LIBVIRT_DIRS``) is, as seen from outside."""
        path = Path(path)
        if self.capabilities_cache is not None and path.is_relative_to(CACHE_DIR):
            return self.capabilities_cache / path.relative_to(CACHE_DIR)
        return self.root_dir / path.relative_to("/")

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def connect(self) -> libvirt.virConnect:
        import libvirt

        return libvirt.open(self.uri)

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        _require_qemu_account()
        self._write_config()
        mounts: list[str] = []
        for target in LIBVIRT_DIRS:
            target.mkdir(parents=True, exist_ok=True)  # the bind mount's mount point, left empty on the host
            mounts += [str(self.private(target)), str(target)]
        daemon = ["libvirtd", "--pid-file", str(self.private("/run/libvirtd.pid"))]
        if self.listen_address is not None:
            daemon.append("--listen")
        command = ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c", _ENTER_NAMESPACE]
        command += ["libvirtd-namespace", self.hostname, *mounts, "--", *daemon]
        if self.netns is not None:
            command = ["ip", "netns", "exec", self.netns, *command]  # it execs: the pid stays the daemon's
        started = time.monotonic()
        deadline = started + timeout
        # The first daemon to see a QEMU probes it and writes the shared cache; the others wait for it.
        with self._capabilities_lock(deadline), open(self.root_dir / "libvirtd.out", "wb") as out:
            self._process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                self._wait_until_answering(deadline)
                self._mount_namespace = _private_namespace(self._process.pid)
                self._probe_emulator(deadline)
            except BaseException:
                self.stop()
                raise
        log.info("libvirtd.started", pid=self.pid, uri=self.uri, seconds=round(time.monotonic() - started, 2))
        return self

    def stop(self) -> None:
        """Destroy its domains, end the daemon (SIGTERM, then SIGKILL), then whatever it left running."""
        process = self._process
        if process is None:
            return
        if process.poll() is None:
            _bounded(self._destroy_domains, STOP_TIMEOUT)
        namespace = self._mount_namespace or _private_namespace(process.pid)
        # Before it dies: a process whose namespace is gone cannot be told from a stranger's.
        ours = _processes_in(namespace) if namespace else []
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        self._process = None
        left: list[int] = []
        if namespace:
            ours = sorted({*ours, *_processes_in(namespace)} - {process.pid})
            left = _kill_all(ours, namespace)
        log.info("libvirtd.stopped", pid=process.pid, status=process.returncode, leftovers_killed=ours)
        if left:
            raise LibvirtdError(f"processes of libvirtd {process.pid} survived SIGKILL: {left}")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in (self.root_dir / "libvirtd.out", self.log_path):
            with contextlib.suppress(FileNotFoundError):
                texts.append(f"--- {path}:\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    def _write_config(self) -> None:
        for directory in LIBVIRT_DIRS:
            self.private(directory).mkdir(parents=True, exist_ok=True)
        daemon: dict[str, str | int] = {
            "auth_unix_ro": "none",
            "auth_unix_rw": "none",
            "unix_sock_group": "root",
            "unix_sock_ro_perms": "0700",
            "unix_sock_rw_perms": "0700",
            "host_uuid": self.host_uuid,
            "log_outputs": f"1:file:{self.log_path}",
            "log_filters": "3:qemu_monitor 2:qemu 3:*",  # QEMU's lifecycle (not its QMP traffic); else warnings
        }
        qemu: dict[str, str | int] = {
            "user": "root",
            "group": "root",
            "dynamic_ownership": 0,
            "remember_owner": 0,
            "security_driver": "none",
            "stdio_handler": "file",  # QEMU's output in var/log/libvirt/qemu/NAME.log, without virtlogd
            # Not the host's cgroups; and no per-domain mount namespace, so QEMU stays in the daemon's.
            "cgroup_controllers": "[]",
            "namespaces": "[]",
        }
        if self.listen_address is not None:
            daemon |= {"listen_tcp": 1, "listen_tls": 0, "auth_tcp": "none", "tcp_port": str(self.tcp_port)}
            daemon["listen_addr"] = self.listen_address
            qemu |= {"migration_host": self.listen_address, "migration_address": self.listen_address}
        self.private("/etc/libvirt/libvirtd.conf").write_text(_conf(daemon))
        self.private("/etc/libvirt/qemu.conf").write_text(_conf(qemu))

    @contextlib.contextmanager
    def _capabilities_lock(self, deadline: float) -> Iterator[None]:
        if self.capabilities_cache is None:
            yield
            return
        with open(self.capabilities_cache / ".lock", "w") as lock:
            while True:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise LibvirtdError(f"{self.capabilities_cache} stayed locked by another daemon") from None
                    time.sleep(0.1)
            yield

    def _wait_until_answering(self, deadline: float) -> None:
        assert self._process is not None
        while True:
            if self._process.poll() is not None:
                raise LibvirtdError(f"libvirtd exited with status {self._process.returncode}:\n{self.log_tail()}")
            # It accepts connections before its drivers are ready, and answers once they are.
            if (
                self.socket_path.exists()
                and _bounded(lambda: self.connect().close(), deadline - time.monotonic()) is None
            ):
                return
            if time.monotonic() > deadline:
                raise LibvirtdError(f"libvirtd did not answer on {self.uri} in time:\n{self.log_tail()}")
            time.sleep(0.05)

    def _probe_emulator(self, deadline: float) -> None:
        """Have libvirt probe the QEMU the domains will use now (it would at the first domain),
        under the cache's lock, and fail here, clearly, if libvirt cannot use that QEMU."""
        emulator = self.emulator
        if emulator is None:
            return

        def probe() -> None:
            connection = self.connect()
            try:
                connection.getDomainCapabilities(emulator, "x86_64", None, "qemu", 0)
            finally:
                connection.close()

        error = _bounded(probe, deadline - time.monotonic())
        if error is not None:
            raise LibvirtdError(
                f"libvirt cannot use the QEMU {emulator} (DEVELOPERS.md lists known causes): {error}\n{self.log_tail()}"
            )

    def _destroy_domains(self) -> None:
        connection = self.connect()
        try:
            for domain in connection.listAllDomains():
                if domain.isActive():
                    domain.destroy()
        finally:
            connection.close()


def _conf(values: dict[str, str | int]) -> str:
    """libvirt's config syntax: strings quoted, numbers and lists (already written out) not."""
    lines = (
        f"{key} = {value}" if not isinstance(value, str) or value.startswith("[") else f'{key} = "{value}"'
        for key, value in values.items()
    )
    return "".join(f"{line}\n" for line in lines)


def _require_qemu_account() -> None:
    try:
        pwd.getpwnam("libvirt-qemu")
        grp.getgrnam("libvirt-qemu")
    except KeyError:
        raise LibvirtdError(
            "libvirt's QEMU driver needs the user and group libvirt-qemu (even with QEMU as root): "
            "run ./run.sh setup, or: groupadd --system libvirt-qemu && "
            "useradd --system -g libvirt-qemu -s /usr/sbin/nologin -M libvirt-qemu"
        ) from None


def _bounded(call: Callable[[], object], timeout: float) -> BaseException | None:
    """Run ``call`` in a thread for at most ``timeout`` seconds (libvirt's calls have no timeout of
    their own): None if it returned, else what it raised, or ``TimeoutError`` if it still runs."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except Exception as error:
            outcome.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(max(timeout, 0.1))
    return outcome[0] if outcome else TimeoutError(f"no answer in {timeout:.1f} s")


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _private_namespace(pid: int) -> str | None:
    """The mount namespace of ``pid`` if it is not ours: a daemon not yet in its own has none."""
    namespace = _mount_namespace(pid)
    return None if namespace == _mount_namespace(os.getpid()) else namespace


def _processes_in(namespace: str) -> list[int]:
    """The live processes in the mount namespace: nobody else enters a daemon's, so the daemon's."""
    pids = (int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit())
    return [pid for pid in pids if _mount_namespace(pid) == namespace and not _is_zombie(pid)]


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


def _kill_all(pids: list[int], namespace: str) -> list[int]:
    """SIGKILL those of ``pids`` still in ``namespace`` (a recycled pid is not), then wait for them."""
    for pid in pids:
        if _mount_namespace(pid) == namespace:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (left := [pid for pid in pids if _mount_namespace(pid) == namespace and not _is_zombie(pid)]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.05)
    return left
