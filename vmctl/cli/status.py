"""``vmctl status``: what a run directory's VM is, from its state file, whether its QEMU still
runs, and (asked for) what QEMU says it is doing."""

from __future__ import annotations

import json
from pathlib import Path

from vmctl.errors import StaleState
from vmctl.qmp import connect
from vmctl.vm.process import QemuProcess
from vmctl.vm.statefile import read_record


def run_status(run_dir: Path, *, query: bool) -> int:
    """Print the VM's status as JSON; exit 3 if its QEMU is gone."""
    state = read_record(run_dir)
    try:
        QemuProcess.adopt(state.pid, state.start_time).close()
        alive = True
    except StaleState:
        alive = False
    report: dict[str, object] = {
        "name": state.spec.name,
        "pid": state.pid,
        "alive": alive,
        "qmp_socket": state.qmp_socket,
        "disks": [d.id for d in state.inventory.disks],
        "nics": [n.id for n in state.inventory.nics],
    }
    if query and alive:
        with connect(state.qmp_socket, name="cli", timeout=5) as monitor:
            report["status"] = monitor.execute("query-status")["status"]
    print(json.dumps(report, indent=2))
    return 0 if alive else 3
