"""A busy guest for migration tests and benchmarks: it dirties memory at a known rate, and proves
afterwards that the data it was rewriting came through whole.

The guest copies a file of random bytes over another in tmpfs (guest RAM), again and again:
each copy rewrites ``size`` bytes of memory, and ``pause`` seconds between copies set how busy
it is. The host keeps the file's checksum; after a migration both files must still match it."""

from __future__ import annotations

import shlex
import time

from vmctl.errors import VmctlError
from vmctl.testing.shell import GuestShell

#: What a guest kernel prints when it breaks (on the serial console).
PANIC_MARKERS = ("Kernel panic", "Fatal exception", "BUG: ", "Oops: ", "general protection fault")


class WorkloadCorrupted(VmctlError):
    """The guest's data does not match what was written before the migration."""


class MemoryDirtier:
    """``start`` it in the guest, migrate, then ``stop_and_check`` it on whichever side runs the guest."""

    def __init__(self, *, directory: str, size: int, pause: float, checksum: str) -> None:
        self.directory = directory
        self.size = size
        self.pause = pause
        self.checksum = checksum
        self._started = time.monotonic()

    @classmethod
    def start(
        cls, shell: GuestShell, *, size_mib: int = 16, pause: float = 0.0, directory: str = "/tmp/vmctl-dirty"
    ) -> MemoryDirtier:
        """Write the random file, note its checksum, and start copying it in the background;
        returns once the first copy is done."""
        d = shlex.quote(directory)
        size = size_mib * 1024 * 1024
        shell.run(f"rm -rf {d} && mkdir -p {d} && head -c {size} /dev/urandom > {d}/a", check=True, timeout=60)
        checksum = shell.run(f"sha256sum < {d}/a", check=True).output.split()[0]
        nap = f"sleep {pause:g}; " if pause > 0 else ""
        loop = (
            f"n=0; while [ ! -e {d}/stop ]; do cp {d}/a {d}/b; n=$((n+1)); echo $n > {d}/count; {nap}done; "
            f"touch {d}/stopped"
        )
        shell.run(f"( {loop} ) </dev/null >/dev/null 2>&1 &", check=True)
        shell.poll(f"cat {d}/count 2>/dev/null", timeout=60)
        return cls(directory=directory, size=size, pause=pause, checksum=checksum)

    def copies(self, shell: GuestShell) -> int:
        """How many times the guest has rewritten the file so far."""
        return int(shell.run(f"cat {shlex.quote(self.directory)}/count", check=True).output.strip() or 0)

    def rate(self, shell: GuestShell) -> float:
        """The bytes per second the guest has rewritten since ``start`` (as measured from here)."""
        return self.copies(shell) * self.size / (time.monotonic() - self._started)

    def stop_and_check(self, shell: GuestShell, *, timeout: float = 60.0) -> int:
        """Stop the loop (after its current copy) and check both files against the checksum;
        returns the number of copies made. ``WorkloadCorrupted`` if either differs."""
        d = shlex.quote(self.directory)
        shell.run(f"touch {d}/stop", check=True)
        shell.poll(f"ls {d}/stopped 2>/dev/null", timeout=timeout)
        sums = shell.run(f"sha256sum < {d}/a; sha256sum < {d}/b", check=True, timeout=timeout).output.split()
        found = [word for word in sums if word != "-"]
        if found != [self.checksum, self.checksum]:
            raise WorkloadCorrupted(f"the guest's files changed: expected {self.checksum} twice, found {found}")
        return self.copies(shell)


def panic_lines(console_text: str) -> list[str]:
    """The lines of a guest's console that show its kernel broke."""
    return [line for line in console_text.splitlines() if any(marker in line for marker in PANIC_MARKERS)]
