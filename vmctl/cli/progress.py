"""A migration's progress as one line: a bar, the RAM sent, the rate, the pass and the ETA.

On a terminal the line is redrawn in place; otherwise (a log, a pipe) a line is written when
the percentage moves by ``step`` or more, so a script's output stays short.
"""

from __future__ import annotations

from typing import TextIO

from vmctl.model.migration import MigrationProgress, MigrationResult

WIDTH = 30
MIB = 1024 * 1024


def line(progress: MigrationProgress) -> str:
    done = fraction(progress)
    filled = int(done * WIDTH)
    eta = f"ETA {progress.eta_s:.0f}s" if progress.eta_s is not None else "ETA -"
    return (
        f"[{'#' * filled}{'.' * (WIDTH - filled)}] {done * 100:3.0f}%  "
        f"{(progress.total - progress.remaining) // MIB}/{progress.total // MIB} MiB  "
        f"{progress.mbps / 8:.1f} MB/s  pass {progress.passes}  {eta}  {progress.status}"
    )


def fraction(progress: MigrationProgress) -> float:
    """How much of the guest's RAM is across (this pass): 0..1."""
    if progress.total <= 0:
        return 0.0
    return min(1.0, max(0.0, (progress.total - progress.remaining) / progress.total))


class ProgressBar:
    def __init__(self, out: TextIO, *, step: float = 0.1) -> None:
        self.out = out
        self.live = out.isatty()
        self.step = step
        self._shown = -1.0

    def update(self, progress: MigrationProgress) -> None:
        text = line(progress)
        if self.live:
            self.out.write("\r\x1b[K" + text)
        elif fraction(progress) - self._shown >= self.step or self._shown < 0:
            self._shown = fraction(progress)
            self.out.write(text + "\n")
        else:
            return
        self.out.flush()

    def finish(self, result: MigrationResult) -> None:
        bar = f"[{'#' * WIDTH}] 100%"
        summary = (
            f"{bar}  {result.transferred // MIB} MiB sent in {result.total_time_ms / 1000:.1f}s, "
            f"downtime {result.downtime_ms} ms{', postcopy' if result.postcopy else ''}  {result.status}"
        )
        self.out.write(("\r\x1b[K" if self.live else "") + summary + "\n")
        self.out.flush()
