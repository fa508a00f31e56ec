"""A busy guest for migration tests and benchmarks: it dirties memory at a known rate, and proves
afterwards that the data it was rewriting came through whole.

The guest copies a file of random bytes over another in tmpfs (guest RAM), again and again:
each copy rewrites ``size`` bytes of memory, and ``pause`` seconds between copies set how busy
it is. The host keeps the file's checksum; after a migration both files must still match it.

``cp`` gives the copy new pages each time (tmpfs frees a truncated file's), so no two passes of a
migration see the same page twice. ``in_place=True`` is the other kind of guest, a database's:
the same pages rewritten, each time with a few bytes changed (the copy alternates between the
file and a variant of it with every zero byte made 1, about 16 bytes in each 4 KiB page), which
is what XBZRLE compression is for."""

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

    def __init__(
        self, *, directory: str, size: int, pause: float, checksum: str, variant_checksum: str | None = None
    ) -> None:
        self.directory = directory
        self.size = size
        self.pause = pause
        self.checksum = checksum
        #: ``in_place``: the checksum of the variant the copy alternates with.
        self.variant_checksum = variant_checksum
        self._started = time.monotonic()

    @classmethod
    def start(
        cls,
        shell: GuestShell,
        *,
        size_mib: int = 16,
        pause: float = 0.0,
        directory: str = "/tmp/vmctl-dirty",
        in_place: bool = False,
    ) -> MemoryDirtier:
        """Write the random file, note its checksum, and start copying it in the background;
        returns once the first copy is done."""
        d = shlex.quote(directory)
        size = size_mib * 1024 * 1024
        shell.run(f"rm -rf {d} && mkdir -p {d} && head -c {size} /dev/urandom > {d}/a", check=True, timeout=60)
        checksum = shell.run(f"sha256sum < {d}/a", check=True).output.split()[0]
        variant_checksum = None
        nap = f"sleep {pause:g}; " if pause > 0 else ""
        copy = f"cp {d}/a {d}/b; n=$((n+1)); echo $n > {d}/count; {nap}"
        if in_place:
            shell.run(f"tr '\\000' '\\001' < {d}/a > {d}/c && cp {d}/a {d}/b", check=True, timeout=60)
            variant_checksum = shell.run(f"sha256sum < {d}/c", check=True).output.split()[0]
            if variant_checksum == checksum:
                raise WorkloadCorrupted("the variant file is the file itself: tr changed nothing")
            copy = "".join(
                f"dd if={d}/{source} of={d}/b bs=1M conv=notrunc 2>/dev/null; n=$((n+1)); echo $n > {d}/count; {nap}"
                for source in ("c", "a")
            )
        loop = f"n=0; while [ ! -e {d}/stop ]; do {copy}done; touch {d}/stopped"
        shell.run(f"( {loop} ) </dev/null >/dev/null 2>&1 &", check=True)
        shell.poll(f"cat {d}/count 2>/dev/null", timeout=60)
        return cls(directory=directory, size=size, pause=pause, checksum=checksum, variant_checksum=variant_checksum)

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
        files = ("a", "b") if self.variant_checksum is None else ("a", "b", "c")
        listing = "; ".join(f"sha256sum < {d}/{name}" for name in files)
        sums = shell.run(listing, check=True, timeout=timeout).output.split()
        found = [word for word in sums if word != "-"]
        if self.variant_checksum is None:
            expected = [[self.checksum, self.checksum]]
        else:  # the copy stopped after either file
            expected = [[self.checksum, b, self.variant_checksum] for b in (self.checksum, self.variant_checksum)]
        if found not in expected:
            raise WorkloadCorrupted(f"the guest's files changed: expected one of {expected}, found {found}")
        return self.copies(shell)


def panic_lines(console_text: str) -> list[str]:
    """The lines of a guest's console that show its kernel broke."""
    return [line for line in console_text.splitlines() if any(marker in line for marker in PANIC_MARKERS)]
