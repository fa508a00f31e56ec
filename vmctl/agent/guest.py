"""The guest agent as a VM offers it: typed calls over ``AgentClient`` (``vm.agent``)."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Final, Literal

from vmctl.agent.client import AgentClient
from vmctl.errors import AgentError, AgentTimeout, InvalidArgument
from vmctl.logs import get_logger
from vmctl.model.agent import AgentInfo, ExecResult, FreezeStatus, GuestInterface
from vmctl.qmp import timeouts
from vmctl.qmp.timeouts import check_timeout

log = get_logger(__name__)

ShutdownMode = Literal["powerdown", "reboot", "halt"]
#: How long a freeze may take (it flushes every filesystem first).
FREEZE_TIMEOUT: Final = 30.0
_POLL_FIRST, _POLL_MAX = 0.01, 0.2
#: How long exec polls on the connection it started the command on.
_HELD = 0.5


class GuestAgent:
    """The QEMU guest agent in one VM. Every call is bounded by its ``timeout`` (the client's
    default when None); an absent agent is ``AgentUnavailable``, a silent one ``AgentTimeout``."""

    def __init__(self, client: AgentClient) -> None:
        self.client = client
        self._log = log.bind(vm=client.name)

    def ping(self, *, timeout: float | None = None) -> None:
        self.client.execute("guest-ping", timeout=timeout)

    def answers(self, *, timeout: float = 1.0) -> bool:
        """Whether the agent answers a ping within ``timeout`` (never raises an ``AgentError``)."""
        try:
            self.ping(timeout=timeout)
        except AgentError:
            return False
        return True

    def info(self, *, timeout: float | None = None) -> AgentInfo:
        return AgentInfo.from_qmp(self.client.execute("guest-info", timeout=timeout))

    def exec(
        self,
        argv: Sequence[str],
        *,
        input: bytes | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> ExecResult:
        """Run ``argv`` in the guest (the first word is looked up on the agent's PATH) and wait
        for it to end, at most ``timeout`` seconds; its output comes back whole (up to 16 MiB each)."""
        if isinstance(argv, (str, bytes)) or not argv or not all(isinstance(a, str) for a in argv):
            raise InvalidArgument(f"exec takes a non-empty list of strings, not {argv!r}")
        if input is not None and not isinstance(input, bytes):
            raise InvalidArgument(f"exec's input must be bytes, not {type(input).__name__}")
        seconds = check_timeout(timeout)
        deadline = timeouts.deadline(seconds)
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if input is not None:
            arguments["input-data"] = base64.b64encode(input).decode()
        if env is not None:
            arguments["env"] = [f"{key}={value}" for key, value in env.items()]
        # A short command ends while its connection is still open; a long one is polled on new
        # connections, so other calls (and other clients) get their turn in between.
        with self.client.session(seconds) as session:
            pid = int(session.execute("guest-exec", arguments)["pid"])
            held = min(deadline, time.monotonic() + _HELD)
            status = _poll(lambda: session.execute("guest-exec-status", {"pid": pid}), held)
        ended = AgentTimeout(f"{self.client.name}: {argv[0]} (guest pid {pid}) did not end within {seconds:g}s")
        if not status.get("exited"):
            try:
                status = _poll(lambda: self._status(pid, deadline), deadline)
            except AgentTimeout as exc:  # the time ran out in a poll: that is the command's timeout
                raise ended from exc
        if not status.get("exited"):
            raise ended
        result = ExecResult.from_qmp(status)
        self._log.debug("agent.exec", argv=argv[0], pid=pid, exit_code=result.exit_code, signal=result.signal)
        return result

    def _status(self, pid: int, deadline: float) -> Any:
        return self.client.execute("guest-exec-status", {"pid": pid}, timeout=max(0.001, deadline - time.monotonic()))

    # -- freezing --------------------------------------------------------------------------

    def fsfreeze_status(self, *, timeout: float | None = None) -> FreezeStatus:
        return FreezeStatus(self.client.execute("guest-fsfreeze-status", timeout=timeout))

    def fsfreeze(self, *, timeout: float = FREEZE_TIMEOUT) -> int:
        """Flush and freeze the guest's filesystems; returns how many. Pair with ``thaw`` (or use
        ``frozen``): until then every write in the guest waits."""
        count = int(self.client.execute("guest-fsfreeze-freeze", timeout=timeout))
        self._log.info("agent.frozen", filesystems=count)
        return count

    def thaw(self, *, timeout: float | None = None) -> int:
        """Thaw the guest's filesystems; returns how many were frozen (0: none was)."""
        count = int(self.client.execute("guest-fsfreeze-thaw", timeout=timeout))
        self._log.info("agent.thawed", filesystems=count)
        return count

    @contextlib.contextmanager
    def frozen(self, *, timeout: float = FREEZE_TIMEOUT) -> Iterator[int]:
        """Frozen filesystems for the body (it gets their number); thawed after it, also when the
        body raises, and also when the freeze itself failed or timed out half-way."""
        try:
            count = self.fsfreeze(timeout=timeout)
        except AgentError:
            self._thaw_after_failure()
            raise
        try:
            yield count
        except BaseException:
            self._thaw_after_failure()
            raise
        self.thaw(timeout=timeout)

    def _thaw_after_failure(self) -> None:
        try:
            self.thaw()
        except AgentError as exc:
            self._log.error("agent.thaw_failed", error=str(exc))

    def thaw_if_frozen(self, *, timeout: float = 5.0) -> bool:
        """Thaw a guest a previous control plane left frozen; True if it was. An agent that does
        not answer is left as it is (logged): attach must not fail for it."""
        try:
            if self.fsfreeze_status(timeout=timeout) is FreezeStatus.FROZEN:
                self._log.warning("agent.found_frozen")
                self.thaw(timeout=timeout)
                return True
        except AgentError as exc:
            self._log.info("agent.not_checked", error=str(exc))
        return False

    # -- the rest --------------------------------------------------------------------------

    def network_interfaces(self, *, timeout: float | None = None) -> tuple[GuestInterface, ...]:
        return tuple(
            GuestInterface.from_qmp(i) for i in self.client.execute("guest-network-get-interfaces", timeout=timeout)
        )

    def set_time(self, time_ns: int | None = None, *, timeout: float | None = None) -> None:
        """Set the guest's clock to ``time_ns`` (nanoseconds since the epoch; the host's clock now
        by default), and its RTC from it."""
        if time_ns is None:
            time_ns = time.time_ns()
        if not isinstance(time_ns, int) or isinstance(time_ns, bool) or time_ns < 0:
            raise InvalidArgument(f"time_ns must be a non-negative int, not {time_ns!r}")
        self.client.execute("guest-set-time", {"time": time_ns}, timeout=timeout)

    def shutdown(self, mode: ShutdownMode = "powerdown", *, timeout: float | None = None) -> None:
        """Ask the guest to power down (or reboot, halt). The agent answers nothing when it works,
        so this returns when no error came back within a moment; the VM's exit is the proof."""
        if mode not in ("powerdown", "reboot", "halt"):
            raise InvalidArgument(f"shutdown mode must be powerdown, reboot or halt, not {mode!r}")
        self.client.send("guest-shutdown", {"mode": mode}, timeout=timeout)
        self._log.info("agent.shutdown_requested", mode=mode)


def _poll(ask: Callable[[], Any], stop: float) -> Any:
    """Ask for an exec's status until the command exited or ``stop`` (a monotonic time) came."""
    pause = _POLL_FIRST
    while True:
        status = ask()
        if status.get("exited") or time.monotonic() >= stop:
            return status
        time.sleep(min(pause, max(0.0, stop - time.monotonic())))
        pause = min(pause * 2, _POLL_MAX)
