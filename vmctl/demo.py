"""``vmctl demo``: show the QMP transport working against a real QEMU, with visible progress."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import TextIO

from vmctl.errors import VmctlError
from vmctl.qmp import Event, connect


def _say(out: TextIO, text: str) -> None:
    out.write(text + "\n")
    out.flush()


def run_qmp_demo(out: TextIO = sys.stdout) -> int:
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        _say(out, "qemu-system-x86_64 not found; install it with: apt-get install qemu-system-x86")
        return 2
    ours, theirs = socket.socketpair()
    _say(out, "==> starting QEMU (-machine none) with its QMP monitor on a socketpair")
    process = subprocess.Popen(
        [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg",
         "-chardev", f"socket,id=mon0,fd={theirs.fileno()}", "-mon", "chardev=mon0,mode=control"],
        pass_fds=[theirs.fileno()],
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    theirs.close()
    printed = threading.Event()
    try:
        with connect(ours, name="demo", timeout=10) as qmp:
            _say(out, f"    connected: QEMU {qmp.version} (pid {process.pid}), capabilities {list(qmp.capabilities)}")
            status = qmp.execute("query-status")
            _say(out, f"    status: {status['status']}")
            commands = qmp.execute("query-commands")
            _say(out, f"    QEMU supports {len(commands)} QMP commands")

            def show(event: Event) -> None:
                _say(out, f"    event {event.name} {dict(event.data) or ''}".rstrip())
                printed.set()

            qmp.on_event(show)
            for command in ("stop", "cont", "stop", "cont"):
                printed.clear()
                started = time.perf_counter()
                qmp.execute(command)
                elapsed = (time.perf_counter() - started) * 1000
                state = qmp.execute("query-status")["status"]
                printed.wait(2)
                _say(out, f"==> {command}: {elapsed:.2f} ms, now {state}")
            _say(out, "==> quit")
            with qmp.events("SHUTDOWN") as shutdown:
                qmp.execute("quit")
                _say(out, f"    {shutdown.get(timeout=5).name}: QEMU is shutting down")
        process.wait(10)
        _say(out, f"==> QEMU exited with status {process.returncode}")
        return 0
    except VmctlError as exc:
        _say(out, f"demo failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        ours.close()
