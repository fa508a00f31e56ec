"""Event wake-up: how long from QEMU emitting an event to ``get()`` returning it, both faces.

    .venv/bin/python bench/event_latency.py [--samples N]

One QEMU (``-machine none``) with two monitors: vmctl's (the one measured) and a raw socket that
triggers the events (``stop``/``cont``, whose STOP/RESUME every monitor receives). Two cases:
"after a command": the vmctl caller has just run a command (the read side was its own) when the
event comes; "idle": nothing has been sent for 20 ms (the background reader holds the read side,
in the threaded face). Latency is the event's own QEMU timestamp (wall clock, microseconds)
to the wall clock when ``get()`` returned, so it includes QEMU writing it and the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import structlog

from vmctl.qmp import aio, connect
from vmctl.vm.process import qemu_binary


class Trigger:
    """A raw monitor that sends ``stop``/``cont`` without waiting, and reads its replies later."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(path)
        self.reader = self.sock.makefile("rb")
        self.reader.readline()
        self.sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        self.reader.readline()
        self.stopped = False

    def toggle(self) -> None:
        self.sock.sendall(b'{"execute": "%s", "id": 1}\n' % (b"cont" if self.stopped else b"stop"))
        self.stopped = not self.stopped

    def collect_reply(self) -> None:
        while "return" not in json.loads(self.reader.readline()):
            pass

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


def sync_samples(path: str, trigger: Trigger, samples: int, idle: float) -> list[float]:
    latencies = []
    with connect(path, timeout=10) as qmp:
        for _ in range(samples):
            with qmp.events("STOP", "RESUME") as events:
                qmp.execute("query-status")
                if idle:
                    time.sleep(idle)
                trigger.toggle()
                event = events.get(timeout=5)
                latencies.append(time.time() - event.timestamp)
            trigger.collect_reply()
    return latencies


def async_samples(path: str, trigger: Trigger, samples: int, idle: float) -> list[float]:
    async def main() -> list[float]:
        latencies = []
        async with await aio.connect(path, timeout=10) as qmp:
            for _ in range(samples):
                async with qmp.events("STOP", "RESUME") as events:
                    await qmp.execute("query-status")
                    if idle:
                        await asyncio.sleep(idle)
                    trigger.toggle()
                    event = await events.get(timeout=5)
                    latencies.append(time.time() - event.timestamp)
                trigger.collect_reply()  # blocks the loop, but only between samples
        return latencies

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=500)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    qemu = qemu_binary()
    if qemu is None:
        print("qemu-system-x86_64 is required", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    workdir.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    ours, theirs = str(workdir / "qmp.sock"), str(workdir / "trigger.sock")
    command = [qemu, "-machine", "none", "-nodefaults", "-display", "none"]
    command += ["-qmp", f"unix:{ours},server=on,wait=off", "-qmp", f"unix:{theirs},server=on,wait=off"]
    process = subprocess.Popen(command, stdin=subprocess.DEVNULL)
    results: dict[str, list[float]] = {}
    try:
        connect(ours, timeout=10).close()  # wait for QEMU to listen
        trigger = Trigger(theirs)
        for idle, case in ((0.0, "after a command"), (0.02, "idle")):
            samples = args.samples if not idle else max(50, args.samples // 5)
            results[f"threaded, {case}"] = sync_samples(ours, trigger, samples, idle)
            results[f"asyncio, {case}"] = async_samples(ours, trigger, samples, idle)
        trigger.close()
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nevent emitted by QEMU -> get() returned, in ms ({args.samples} samples after a command)\n")
    print(f"{'face, case':28} {'median':>8} {'p99':>8} {'max':>8}")
    for name, values in results.items():
        ms = sorted(v * 1000 for v in values)
        p99 = ms[min(len(ms) - 1, round(len(ms) * 0.99))]
        print(f"{name:28} {statistics.median(ms):8.3f} {p99:8.3f} {ms[-1]:8.3f}")
    print("\ngoal: median <= 2 ms, p99 <= 5 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
