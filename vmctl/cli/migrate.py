"""``vmctl migrate``: move the VM of one run dir into a new QEMU in another, with a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

from vmctl.cli.progress import ProgressBar
from vmctl.errors import InvalidArgument
from vmctl.vm import VM


def run_migrate(
    source_dir: Path, target_dir: Path, *, timeout: float, finish_within: float | None, postcopy: bool
) -> int:
    """Attach the source (no control plane may hold it: QEMU serves one client per monitor),
    start the target from the source's devices as they are now, move the guest, and leave both
    detached: the target runs on, the source's QEMU quits after handing over."""
    if target_dir.exists() and any(target_dir.iterdir()):
        raise InvalidArgument(f"{target_dir} is not empty: the target's run dir must be new")
    source = VM.attach(source_dir)
    target = None
    try:
        target = VM.launch_incoming(source.migration_target_spec(), run_dir=target_dir, inventory=source.inventory)
        bar = ProgressBar(sys.stdout)
        print(f"migrating {source.name}: {source_dir} -> {target_dir}")
        result = source.migrate(target, finish_within=finish_within, postcopy=postcopy).wait(
            timeout, on_progress=bar.update
        )
        bar.finish(result)
    except BaseException:
        if target is not None and not target.has_exited:
            target.kill()  # the guest is still on the source (a failed migration says so)
        raise
    finally:
        source.close()
        if target is not None:
            target.close()
    return 0
