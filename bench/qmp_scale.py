"""Scale: many idle monitors in one process: threads, memory per monitor, idle CPU, both faces.

    .venv/bin/python bench/qmp_scale.py [--qemus 20] [--per-qemu 50] [--idle 10]

Starts ``--qemus`` QEMUs (``-machine none``), each with ``--per-qemu`` QMP sockets, and connects one
monitor to every socket: first ``vmctl.qmp.aio`` monitors from one event loop, then threaded
``vmctl.qmp.Monitor``s (served while idle by the process's one reactor thread). For each it
measures the process's threads, its RSS growth per monitor, and its CPU while all monitors sit
idle; finally every monitor answers a ``query-status`` (they are alive) and all close.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import structlog

from vmctl.qmp import aio, connect
from vmctl.vm.process import qemu_binary


def status_field(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


async def run(paths: list[str], idle: float) -> dict[str, float]:
    gc.collect()
    rss_before = status_field("VmRSS")
    monitors: list[aio.AsyncMonitor] = []
    for start in range(0, len(paths), 100):
        monitors += await asyncio.gather(*(aio.connect(p, timeout=30) for p in paths[start : start + 100]))
    gc.collect()
    rss_after = status_field("VmRSS")
    threads = status_field("Threads")
    cpu_before, wall_before = time.process_time(), time.monotonic()
    await asyncio.sleep(idle)
    idle_cpu = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
    started = time.perf_counter()
    replies = await asyncio.gather(*(m.execute("query-status") for m in monitors))
    round_trip = time.perf_counter() - started
    assert all("status" in r for r in replies)
    await asyncio.gather(*(m.close() for m in monitors))
    return {
        "monitors": len(monitors),
        "threads": threads,
        "python_threads": threading.active_count(),
        "rss_per_monitor_kib": (rss_after - rss_before) / len(monitors),
        "idle_cpu_percent": idle_cpu * 100,
        "query_all_ms": round_trip * 1000,
    }


def run_threaded(paths: list[str], idle: float) -> dict[str, float]:
    gc.collect()
    rss_before = status_field("VmRSS")
    monitors = [connect(p, timeout=30) for p in paths]
    gc.collect()
    rss_after = status_field("VmRSS")
    threads = status_field("Threads")
    cpu_before, wall_before = time.process_time(), time.monotonic()
    time.sleep(idle)
    idle_cpu = (time.process_time() - cpu_before) / (time.monotonic() - wall_before)
    started = time.perf_counter()
    replies = [m.execute("query-status") for m in monitors]
    round_trip = time.perf_counter() - started
    assert all("status" in r for r in replies)
    for m in monitors:
        m.close()
    return {
        "monitors": len(monitors),
        "threads": threads,
        "python_threads": threading.active_count(),
        "rss_per_monitor_kib": (rss_after - rss_before) / len(monitors),
        "idle_cpu_percent": idle_cpu * 100,
        "query_all_ms": round_trip * 1000,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qemus", type=int, default=20)
    parser.add_argument("--per-qemu", type=int, default=50)
    parser.add_argument("--idle", type=float, default=10.0)
    parser.add_argument("--face", choices=("aio", "threaded"), help="one face only (default: each in its own process)")
    args = parser.parse_args()
    if args.face is None:  # each face in a fresh process, so that neither reuses the other's freed memory
        common = ["--qemus", str(args.qemus), "--per-qemu", str(args.per_qemu), "--idle", str(args.idle)]
        for face in ("aio", "threaded"):
            subprocess.run([sys.executable, __file__, *common, "--face", face], check=True)
        return 0
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    qemu = qemu_binary()
    if qemu is None:
        print("qemu-system-x86_64 is required", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.qemus * args.per_qemu + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(wanted, soft)), hard))
    workdir = Path(tempfile.mkdtemp(prefix="vmctl-scale-"))
    workdir.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    processes: list[subprocess.Popen[bytes]] = []
    paths: list[str] = []
    try:
        for q in range(args.qemus):
            command = [qemu, "-machine", "none", "-nodefaults", "-display", "none"]
            for m in range(args.per_qemu):
                path = str(workdir / f"q{q}-m{m}.sock")
                paths.append(path)
                command += ["-qmp", f"unix:{path},server=on,wait=off"]
            processes.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
        figures = asyncio.run(run(paths, args.idle)) if args.face == "aio" else run_threaded(paths, args.idle)
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    what = "vmctl.qmp.aio monitors on one event loop" if args.face == "aio" else "threaded vmctl.qmp.Monitors"
    thread_goal = "1" if args.face == "aio" else "<= 4"
    print(f"\n{figures['monitors']:.0f} idle {what} ({args.qemus} QEMUs)\n")
    print(f"threads in the process        {figures['threads']:.0f}   (goal: {thread_goal})")
    print(f"RSS per monitor               {figures['rss_per_monitor_kib']:.1f} KiB   (goal: <= 32 KiB)")
    print(f"CPU while idle ({args.idle:g} s)        {figures['idle_cpu_percent']:.2f} % of a core   (goal: < 1 %)")
    print(f"query-status on all           {figures['query_all_ms']:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
