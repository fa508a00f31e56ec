"""Whether a VM's QEMU is alive, and everything that changes it: one state, one transition function,
one escalation routine, and the watch that notices an exit (the pidfd, on the process's one
reactor thread) or a lost monitor, classified on the shared callback thread.

``Life`` moves only forward: RUNNING, then STOPPING once vmctl asked QEMU to go (its exit is then
expected), then EXITED or CRASHED; DETACHED when vmctl stops watching and QEMU runs on.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from vmctl.errors import AbnormalExit, AgentError, AgentUnavailable, CommandError, QMPError, StateError, WaitTimeout
from vmctl.model.status import DiskIOError, ExitStatus, ResetEvent, ShutdownEvent, ShutdownMethod, ShutdownResult
from vmctl.qmp import Event, Monitor
from vmctl.qmp.callbacks import callback_thread
from vmctl.qmp.reactor import reactor
from vmctl.vm.logtail import tail
from vmctl.vm.process import QemuProcess

# A guest-side reset this soon after another one is the firmware finishing that reset.
_RESET_FOLLOW_UP: Final = 1.0
# How long the watcher lets the reader take in what QEMU said before it died (a SHUTDOWN event).
_LAST_WORDS: Final = 0.05


class Life(enum.Enum):
    RUNNING = "running"  # QEMU runs and vmctl watches it
    STOPPING = "stopping"  # vmctl asked QEMU to go (shutdown, kill, migrated away): an expected exit
    EXITED = "exited"  # QEMU is gone as expected (asked to, or the guest powered off)
    CRASHED = "crashed"  # QEMU (or its monitor) went without being asked
    DETACHED = "detached"  # vmctl stopped watching; QEMU may run on (``VM.attach`` again)


TRANSITIONS: Final[Mapping[Life, frozenset[Life]]] = MappingProxyType(
    {
        Life.RUNNING: frozenset({Life.STOPPING, Life.EXITED, Life.CRASHED, Life.DETACHED}),
        Life.STOPPING: frozenset({Life.EXITED, Life.DETACHED}),
        Life.EXITED: frozenset({Life.DETACHED}),
        Life.CRASHED: frozenset({Life.DETACHED}),
        Life.DETACHED: frozenset(),
    }
)

#: The steps ``escalate`` may take, in the order it takes them.
STEPS: Final = (ShutdownMethod.POWERDOWN, ShutdownMethod.QUIT, ShutdownMethod.TERMINATE, ShutdownMethod.KILL)


class Lifecycle:
    """A VM's life: its state, exit status or crash, resets, and the callbacks on them."""

    def __init__(self, *, name: str, process: QemuProcess, qmp: Monitor, log_path: Path, log: Any) -> None:
        self.name = name
        self._process = process
        self._qmp = qmp
        self._log_path = log_path
        self._log = log
        self._lock = threading.Lock()
        self._state = Life.RUNNING
        self._ended = threading.Event()  # EXITED or CRASHED reached
        self.exit_status: ExitStatus | None = None
        self.crash: AbnormalExit | None = None
        self._expected_resets = 0
        self.resets: collections.deque[ResetEvent] = collections.deque(maxlen=100)
        self._callbacks: dict[str, tuple[Callable[[Any], Any], ...]] = {
            "unexpected_reset": (),
            "shutdown": (),
            "panic": (),
            "io_error": (),
            "crash": (),
        }
        self._callbacks_thread = callback_thread()
        self._reactor = reactor()
        qmp.on_event(self._on_reset, "RESET")
        qmp.on_event(self._on_shutdown, "SHUTDOWN")
        qmp.on_event(self._on_panic, "GUEST_PANICKED")
        qmp.on_event(self._on_io_error, "BLOCK_IO_ERROR")
        qmp.on_disconnect(self._on_monitor_gone)
        self._reactor.register(process.fileno(), self._on_pidfd)

    # -- the state -----------------------------------------------------------------------

    @property
    def state(self) -> Life:
        return self._state

    def transition(self, new: Life) -> bool:
        """Move to ``new`` if that is a step forward from here; False (no change) otherwise."""
        with self._lock:
            if new not in TRANSITIONS[self._state]:
                return False
            self._state = new
        self._log.debug("vm.life", state=new.value)
        return True

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def process_running(self) -> bool:
        """Whether QEMU's process is still there (it may be, after its monitor was lost)."""
        return self._process.poll() is None

    @property
    def has_exited(self) -> bool:
        """Whether it ended: QEMU exited, or crashed (a lost monitor counts, QEMU may linger)."""
        return self._ended.is_set()

    def wait(self, timeout: float) -> ExitStatus:
        """Wait for QEMU to exit. ``AbnormalExit`` if it crashed, ``WaitTimeout`` if it still runs."""
        if not self._ended.wait(timeout):
            raise WaitTimeout(f"{self.name}: QEMU still runs after {timeout:g}s")
        if self.crash is not None:
            raise self.crash
        assert self.exit_status is not None
        return self.exit_status

    def detach(self) -> None:
        """Stop watching (QEMU is left as it is); idempotent."""
        if not self.transition(Life.DETACHED):
            return
        self._reactor.unregister(self._process.fileno())

    # -- ending it, escalating -----------------------------------------------------------

    def escalate(
        self,
        steps: Sequence[ShutdownMethod],
        *,
        powerdown_timeout: float = 0.0,
        step_timeout: float = 5.0,
        agent_shutdown: Callable[..., None] | None = None,
    ) -> ShutdownResult:
        """Make QEMU go, trying ``steps`` in order (each bounded), and say how it ended.

        AGENT asks the guest agent (``agent_shutdown``) and POWERDOWN presses the ACPI button;
        each waits ``powerdown_timeout`` for the guest. QUIT asks QEMU; TERMINATE and KILL send
        SIGTERM and SIGKILL. Every step's exit is expected."""
        if self._state is Life.DETACHED:
            raise StateError(f"{self.name}: this VM object is detached (closed); VM.attach() it again")
        started = time.monotonic()
        if self._process.poll() is not None:
            return self._ended_by(ShutdownMethod.ALREADY_EXITED, started)
        self.transition(Life.STOPPING)
        for method in steps:
            if method is ShutdownMethod.AGENT:
                ask_agent = functools.partial(agent_shutdown or _no_agent, timeout=step_timeout)
                gone = self._powerdown(ask_agent, "agent", powerdown_timeout, step_timeout)
            elif method is ShutdownMethod.POWERDOWN:
                press = functools.partial(self._qmp.execute, "system_powerdown", timeout=step_timeout)
                gone = self._powerdown(press, "acpi", powerdown_timeout, step_timeout)
            elif method is ShutdownMethod.QUIT:
                with contextlib.suppress(QMPError):
                    self._qmp.execute("quit", timeout=step_timeout)
                gone = self._process.wait(step_timeout) is not None
            else:
                self._process.send_signal(signal.SIGTERM if method is ShutdownMethod.TERMINATE else signal.SIGKILL)
                gone = self._process.wait(step_timeout) is not None
            if gone:
                return self._ended_by(method, started)
        raise WaitTimeout(f"{self.name}: QEMU (pid {self._process.pid}) survived {steps[-1].value}")

    def _powerdown(self, request: Callable[[], None], what: str, timeout: float, step_timeout: float) -> bool:
        """Ask the guest to power off (``request``: the ACPI button, or the guest agent); True if
        it did within ``timeout`` (QEMU then exits, or with ``-no-shutdown`` is quit here)."""
        try:
            with self._qmp.events("SHUTDOWN") as shutdown_events:
                request()
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if self._process.wait(0.05) is not None:
                        return True
                    if shutdown_events.get_nowait() is not None:
                        break
                else:
                    self._log.info("vm.powerdown_ignored", by=what, timeout=timeout)
                    return False
        except (QMPError, AgentError) as exc:
            self._log.info("vm.powerdown_failed", by=what, error=str(exc))
            return self._process.poll() is not None
        # The guest powered off but QEMU stays (-no-shutdown): finish with quit.
        with contextlib.suppress(QMPError):
            self._qmp.execute("quit", timeout=step_timeout)
        return self._process.wait(step_timeout) is not None

    def _ended_by(self, method: ShutdownMethod, started: float) -> ShutdownResult:
        status = self._process.poll()
        assert status is not None
        self._ended.wait(1.0)  # let the watcher classify the exit first
        self._log.info("vm.stopped", method=method.value, exit=str(status))
        return ShutdownResult(method=method, exit=status, seconds=time.monotonic() - started)

    # -- resets --------------------------------------------------------------------------

    @contextlib.contextmanager
    def expected_reset(self) -> Iterator[None]:
        """Around a ``system_reset``: its RESET is expected (registered first: it may beat the reply)."""
        with self._lock:
            self._expected_resets += 1
        try:
            yield
        except CommandError:
            with self._lock:
                self._expected_resets -= 1
            raise

    # -- callbacks -----------------------------------------------------------------------

    def register(self, kind: str, callback: Callable[[Any], Any]) -> Callable[[], None]:
        with self._lock:
            self._callbacks[kind] = (*self._callbacks[kind], callback)

        def unregister() -> None:
            with self._lock:
                self._callbacks[kind] = tuple(c for c in self._callbacks[kind] if c is not callback)

        return unregister

    def _notify(self, kind: str, value: Any) -> None:
        for callback in self._callbacks[kind]:
            try:
                callback(value)
            except Exception:
                self._log.exception("vm.callback_failed", kind=kind)

    def _on_reset(self, event: Event) -> None:
        guest = bool(event.data.get("guest", True))
        previous = self.resets[-1] if self.resets else None
        if guest and previous is not None and event.timestamp - previous.timestamp < _RESET_FOLLOW_UP:
            # SeaBIOS answers a reset with a hard reset of its own a few milliseconds later:
            # that is the tail of the reset just classified, not a new one.
            self._log.debug("vm.reset_follow_up", reason=event.data.get("reason"))
            return
        with self._lock:
            expected = not guest and self._expected_resets > 0
            if expected:
                self._expected_resets -= 1
        reset = ResetEvent(
            expected=expected, guest=guest, reason=str(event.data.get("reason", "")), timestamp=event.timestamp
        )
        self.resets.append(reset)
        if not expected:
            self._log.warning("vm.unexpected_reset", guest=guest, reason=reset.reason)
            self._notify("unexpected_reset", reset)

    def _on_shutdown(self, event: Event) -> None:
        shutdown = ShutdownEvent(
            guest=bool(event.data.get("guest", False)),
            reason=str(event.data.get("reason", "")),
            timestamp=event.timestamp,
        )
        self._log.info("vm.shutdown_event", guest=shutdown.guest, reason=shutdown.reason)
        self._notify("shutdown", shutdown)

    def _on_panic(self, event: Event) -> None:
        self._log.error("vm.guest_panicked", info=dict(event.data))
        self._notify("panic", event)

    def _on_io_error(self, event: Event) -> None:
        error = DiskIOError.from_event(event.data, event.timestamp)
        self._log.error(
            "vm.disk_io_error", disk=error.disk_id, operation=error.operation, action=error.action,
            nospace=error.nospace, reason=error.reason,
        )  # fmt: skip
        self._notify("io_error", error)

    def _on_monitor_gone(self, error: QMPError | None) -> None:
        # On the callback thread: the monitor is gone, but is QEMU? (It may take a moment to exit.)
        if error is None:
            return
        if self._state is Life.DETACHED or self._ended.is_set():
            return
        if self._process.wait(0.1) is None and not self._expected():
            self._crashed("QEMU's monitor connection was lost while QEMU still runs", None)
            self._ended.set()

    # -- the watcher ---------------------------------------------------------------------

    def _expected(self) -> bool:
        """Whether an exit now is no crash: vmctl asked for it, or the guest shut down cleanly
        (the last lifecycle event was a SHUTDOWN, not followed by a RESUME)."""
        if self._state is Life.STOPPING:
            return True
        lifecycle = self._qmp.recent_events("SHUTDOWN", "RESUME")
        return bool(lifecycle) and lifecycle[-1].name == "SHUTDOWN"

    def _on_pidfd(self, events: int) -> None:
        # On the reactor thread: QEMU exited. Classifying may wait a little: not here.
        self._reactor.unregister(self._process.fileno())
        self._callbacks_thread.submit(self._on_exit)

    def _on_exit(self) -> None:
        """QEMU exited: an expected exit, or a crash (on the callback thread)."""
        if self._state is Life.DETACHED or self._ended.is_set():
            return
        status = self._process.poll()
        if status is None:
            return
        # Let the reader take in what QEMU said before it died (a SHUTDOWN event): it is done
        # once it has seen the connection close.
        deadline = time.monotonic() + _LAST_WORDS
        while self._qmp.is_connected and time.monotonic() < deadline:
            time.sleep(0.002)
        self.exit_status = status
        if self._expected():
            self.transition(Life.EXITED)
            self._log.info("vm.exited", exit=str(status))
        else:
            self._crashed(f"QEMU exited unexpectedly: {status}", status)
        self._ended.set()

    def _crashed(self, message: str, status: ExitStatus | None) -> None:
        crash = AbnormalExit(
            f"{self.name}: {message}",
            exit_code=status.code if status else None,
            signal=status.signal if status else None,
            log_tail=tail(self._log_path),
        )
        self.crash = crash
        self.transition(Life.CRASHED)
        self._log.error("vm.crashed", reason=message)
        self._notify("crash", crash)


def _no_agent(*, timeout: float) -> None:
    raise AgentUnavailable("this VM has no guest agent")
