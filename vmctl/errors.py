"""The one error tree of vmctl: everything it raises on purpose is a ``VmctlError``.

::

    VmctlError
    +-- InvalidArgument (also a ValueError)   bad input; nothing was sent or changed
    |   +-- SpecError                          a VM spec or one of its values is invalid
    |   +-- DeviceExists, UnknownDevice        (also DeviceErrors)
    +-- QMPError                               talking QMP
    |   +-- ConnectError                       the monitor could not be reached, or the handshake failed
    |   +-- ConnectionLost                     QEMU went away (or the monitor was closed)
    |   +-- ProtocolError                      QEMU sent something that is not QMP
    |   +-- StateError                         the call is not allowed in the monitor's connection state
    |   +-- MessageTooLarge                    a reply over the size limit (the command ran)
    |   +-- CommandTimeout (also TimeoutError) no reply in time; the outcome is unknown
    |   +-- OutcomeUnknown                     a late reply, and QEMU could not be asked what it did
    |   +-- EventTimeout (also TimeoutError)   no matching event in time
    |   +-- EventMatchError                    a subscription's match predicate raised
    |   +-- CommandError                       QEMU's own error reply, by class:
    |       +-- GenericError, CommandNotFound, DeviceNotActive, DeviceNotFound, KVMMissingCap
    +-- LaunchError                            QEMU did not start (with its log)
    +-- StaleState                             a run directory describes a VM that is gone
    +-- WaitTimeout (also TimeoutError)        the VM did not reach a state in time
    +-- AbnormalExit                           QEMU crashed, was killed from outside, or lost its monitor
    +-- DeviceError                            a device operation failed
    |   +-- HotplugError                       did not complete; ``remaining`` says what is left
    |   +-- NoHotplugSlot                      every PCIe root port is taken
    |   +-- BalloonUnavailable                 the VM has no balloon device
    +-- BlockJobError                          a block job failed (QEMU's message)
    +-- SnapshotError                          a snapshot failed; ``remaining`` says what is left, if anything
    +-- MigrationError                         a migration failed or was cancelled; the error says where the guest is
    +-- AgentError                             talking to the QEMU guest agent inside the guest
        +-- AgentUnavailable                   no agent answers: none configured, not running, or it went away
        +-- AgentTimeout (also TimeoutError)   the agent did not answer (or a guest command not end) in time
        +-- AgentCommandError                  the agent's own error reply (``error_class``, ``desc``)
"""

from __future__ import annotations

from typing import Any


class VmctlError(Exception):
    """Root of every error vmctl raises on purpose."""


class InvalidArgument(VmctlError, ValueError):
    """The caller passed something vmctl cannot use; nothing was sent or changed."""


class QMPError(VmctlError):
    """Something went wrong talking QMP."""


class ConnectError(QMPError):
    """The monitor could not be reached or the QMP handshake failed."""


class ConnectionLost(QMPError):
    """The connection to QEMU is gone (QEMU exited, the socket closed, or the monitor was closed)."""


class ProtocolError(QMPError):
    """QEMU sent something that is not QMP; the connection cannot be trusted any more."""


class OutcomeUnknown(QMPError):
    """A command's reply came too late and QEMU could not be asked whether it took effect:
    nothing is undone (an undo could break what it did); the journal settles it later."""


class StateError(QMPError):
    """The call is not allowed in the monitor's current state."""


class MessageTooLarge(QMPError):
    """A reply was larger than the configured maximum; the command ran but its reply was discarded."""

    def __init__(self, message: str, *, command: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.command = command
        self.size = size
        self.limit = limit


class CommandError(QMPError):
    """QEMU answered the command with an error."""

    def __init__(self, *, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"{command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class GenericError(CommandError):
    pass


class CommandNotFound(CommandError):
    pass


class DeviceNotActive(CommandError):
    pass


class DeviceNotFound(CommandError):
    pass


class KVMMissingCap(CommandError):
    pass


_ERROR_CLASSES: dict[str, type[CommandError]] = {
    "GenericError": GenericError,
    "CommandNotFound": CommandNotFound,
    "DeviceNotActive": DeviceNotActive,
    "DeviceNotFound": DeviceNotFound,
    "KVMMissingCap": KVMMissingCap,
}


def command_error(command: str, error: Any) -> CommandError:
    """Map QEMU's ``{"class": ..., "desc": ...}`` error object to its typed exception."""
    if isinstance(error, dict):
        error_class = str(error.get("class", "GenericError"))
        desc = str(error.get("desc", "(no description)"))
    else:
        error_class, desc = "GenericError", repr(error)
    cls = _ERROR_CLASSES.get(error_class, CommandError)
    return cls(command=command, error_class=error_class, desc=desc)


class CommandTimeout(QMPError, TimeoutError):
    """No reply in time. The command may or may not have run: its outcome is unknown."""

    def __init__(self, *, command: str, timeout: float) -> None:
        super().__init__(
            f"{command}: no reply within {timeout:g}s; the outcome is unknown "
            "(QEMU may still run it; a late reply will be discarded)"
        )
        self.command = command
        self.timeout = timeout


class OperationTimeout(QMPError, TimeoutError):
    """An operation's ``timeout=`` ran out between its commands: the next one was not sent, and
    what the operation had done is undone (or named as left over)."""

    def __init__(self, *, step: str, timeout: float) -> None:
        super().__init__(f"{step}: not sent, the operation's timeout of {timeout:g}s ran out before it")
        self.step = step
        self.timeout = timeout


class EventTimeout(QMPError, TimeoutError):
    """The awaited event did not arrive in time."""


class EventMatchError(QMPError):
    """A subscription's ``match`` predicate raised; its exception is the ``__cause__``.

    The subscription is ended; the connection and every other subscriber carry on."""


class SpecError(InvalidArgument):
    """A VM spec is invalid; nothing was started."""


class LaunchError(VmctlError):
    """QEMU did not start; ``log`` holds what QEMU said."""

    def __init__(self, message: str, *, log: str = "") -> None:
        super().__init__(f"{message}\n{log}".rstrip() if log else message)
        self.log = log


class PoolExhausted(LaunchError):
    """Every uid of the pool is held by a live VM; nothing was started."""

    def __init__(self, message: str) -> None:
        super().__init__(message)


class StaleState(VmctlError):
    """The run directory describes a VM that is gone (or whose pid now belongs to another process)."""


class WaitTimeout(VmctlError, TimeoutError):
    """The VM did not reach the awaited state in time; it is left as it is."""


class AbnormalExit(VmctlError):
    """QEMU exited without a guest or host shutdown: a crash, a kill from outside, or a lost monitor."""

    def __init__(self, message: str, *, exit_code: int | None, signal: int | None, log_tail: str) -> None:
        details = []
        if exit_code is not None:
            details.append(f"exit code {exit_code}")
        if signal is not None:
            details.append(f"signal {signal}")
        text = f"{message} ({', '.join(details)})" if details else message
        super().__init__(f"{text}\n--- end of QEMU's log ---\n{log_tail}".rstrip() if log_tail else text)
        self.exit_code = exit_code
        self.signal = signal
        self.log_tail = log_tail


class DeviceError(VmctlError):
    """A device operation failed."""


class DeviceExists(DeviceError, InvalidArgument):
    """A device with that id is already there."""


class UnknownDevice(DeviceError, InvalidArgument):
    """No device with that id."""


class HotplugError(DeviceError):
    """A hotplug or unplug did not complete. ``remaining`` lists what is still in QEMU (empty when
    everything was rolled back); an unplug can be retried to finish the job."""

    def __init__(self, message: str, *, remaining: tuple[str, ...] = ()) -> None:
        if remaining:
            message += f"; still present: {', '.join(remaining)}"
        super().__init__(message)
        self.remaining = remaining


class NoHotplugSlot(DeviceError):
    """Every PCIe root port of a q35 VM is in use: nothing was sent (``VMSpec.hotplug_slots``)."""


class FirmwareNotFound(LaunchError):
    """The firmware images a spec asks for are not installed (UEFI: Debian's ``ovmf``)."""


class BalloonUnavailable(DeviceError):
    """The VM has no balloon device (``VMSpec(balloon=True)``)."""


class BlockJobError(VmctlError):
    """A block job failed; ``qemu_error`` is QEMU's message."""

    def __init__(self, message: str, *, job_id: str, qemu_error: str) -> None:
        super().__init__(f"{message}: {qemu_error}" if qemu_error else message)
        self.job_id = job_id
        self.qemu_error = qemu_error


class SnapshotError(VmctlError):
    """The snapshot failed: no disk changed and nothing was left behind, unless ``remaining``
    names what is left (an undo failed, or the connection to QEMU was lost mid-way: then the
    next attach settles whether the disks switched)."""

    def __init__(self, message: str, *, remaining: tuple[str, ...] = ()) -> None:
        if remaining:
            message += f"; still present: {', '.join(remaining)}"
        super().__init__(message)
        self.remaining = remaining


class MigrationError(VmctlError):
    """The migration failed or was cancelled; the source keeps running with its devices and data."""

    def __init__(self, message: str, *, status: str, error_desc: str = "") -> None:
        super().__init__(f"{message}: {error_desc}" if error_desc else message)
        self.status = status
        self.error_desc = error_desc


class AgentError(VmctlError):
    """Talking to the QEMU guest agent failed."""


class AgentUnavailable(AgentError):
    """No agent answers: the VM has none, the guest has not started it, or it went away."""


class AgentTimeout(AgentError, TimeoutError):
    """The agent did not answer in time (it may be hung), or a guest command did not end in time."""


class AgentCommandError(AgentError):
    """The agent answered with an error: ``error_class`` and ``desc`` are its own."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"guest agent: {command} failed: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc
