"""QMP throughput: vmctl against a raw socket and against qemu.qmp, one QEMU, one run.

    .venv/bin/python bench/qmp_throughput.py [--ops N] [--rounds R]

Sequential: one caller issuing ``query-status`` back to back. Concurrent: 8 threads (vmctl's
threaded face), 8 asyncio tasks (vmctl's asyncio face, qemu.qmp async), and for the raw socket
one thread pipelining batches of 8.
Rounds are interleaved so that drift in the machine affects every client alike; the best
round of each is reported. Logging is filtered at INFO, as in production.
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
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog
from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

from vmctl.qmp import aio, connect
from vmctl.vm.process import qemu_binary

CONCURRENCY = 8


def raw_sequential(path: str, ops: int) -> float:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reader.readline()
        started = time.perf_counter()
        for n in range(ops):
            sock.sendall(b'{"execute": "query-status", "id": %d}\n' % n)
            reply = json.loads(reader.readline())
            assert reply["id"] == n
        elapsed = time.perf_counter() - started
        reader.close()
    return ops / elapsed


def raw_pipelined(path: str, ops: int) -> float:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        reader = sock.makefile("rb")
        reader.readline()
        sock.sendall(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n')
        reader.readline()
        batches = ops // CONCURRENCY
        started = time.perf_counter()
        for batch in range(batches):
            base = batch * CONCURRENCY
            sock.sendall(b"".join(b'{"execute": "query-status", "id": %d}\n' % (base + k) for k in range(CONCURRENCY)))
            for _ in range(CONCURRENCY):
                json.loads(reader.readline())
        elapsed = time.perf_counter() - started
        reader.close()
    return batches * CONCURRENCY / elapsed


def vmctl_sequential(path: str, ops: int) -> float:
    with connect(path, timeout=10) as qmp:
        execute = qmp.execute
        started = time.perf_counter()
        for _ in range(ops):
            execute("query-status")
        return ops / (time.perf_counter() - started)


def vmctl_concurrent(path: str, ops: int) -> float:
    per_thread = ops // CONCURRENCY
    with connect(path, timeout=10) as qmp:

        def worker() -> None:
            for _ in range(per_thread):
                qmp.execute("query-status")

        threads = [threading.Thread(target=worker) for _ in range(CONCURRENCY)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return per_thread * CONCURRENCY / (time.perf_counter() - started)


def vmctl_async_run(path: str, ops: int, tasks: int) -> float:
    async def main() -> float:
        qmp = await aio.connect(path, timeout=10)
        per_task = ops // tasks
        execute = qmp.execute

        async def worker() -> None:
            for _ in range(per_task):
                await execute("query-status")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        elapsed = time.perf_counter() - started
        await qmp.close()
        return per_task * tasks / elapsed

    return asyncio.run(main())


def legacy_sequential(path: str, ops: int) -> float:
    client = QEMUMonitorProtocol(path)
    client.connect()
    try:
        started = time.perf_counter()
        for _ in range(ops):
            client.cmd("query-status")
        return ops / (time.perf_counter() - started)
    finally:
        client.close()


def async_run(path: str, ops: int, tasks: int) -> float:
    async def main() -> float:
        client = QMPClient("bench")
        await client.connect(path)
        per_task = ops // tasks

        async def worker() -> None:
            for _ in range(per_task):
                await client.execute("query-status")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(tasks)))
        elapsed = time.perf_counter() - started
        await client.disconnect()
        return per_task * tasks / elapsed

    return asyncio.run(main())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    logging.getLogger("qemu").setLevel(logging.WARNING)
    qemu = qemu_binary()
    if qemu is None:
        print("qemu-system-x86_64 is required", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    workdir.chmod(0o711)  # QEMU's unprivileged user goes through to its run dir
    path = str(workdir / "qmp.sock")
    process = subprocess.Popen(
        [qemu, "-machine", "none", "-nodefaults", "-display", "none", "-qmp", f"unix:{path},server=on,wait=off"],
        stdin=subprocess.DEVNULL,
    )
    try:
        connect(path, timeout=10).close()  # wait for QEMU to listen
        cases: dict[str, Callable[[], float]] = {
            "raw socket, sequential": lambda: raw_sequential(path, args.ops),
            "vmctl, sequential": lambda: vmctl_sequential(path, args.ops),
            "qemu.qmp legacy, sequential": lambda: legacy_sequential(path, args.ops),
            "vmctl async, sequential": lambda: vmctl_async_run(path, args.ops, 1),
            "qemu.qmp async, sequential": lambda: async_run(path, args.ops, 1),
            "raw socket, pipelined x8": lambda: raw_pipelined(path, args.ops),
            "vmctl, 8 threads": lambda: vmctl_concurrent(path, args.ops),
            "vmctl async, 8 tasks": lambda: vmctl_async_run(path, args.ops, CONCURRENCY),
            "qemu.qmp async, 8 tasks": lambda: async_run(path, args.ops, CONCURRENCY),
        }
        results: dict[str, list[float]] = {name: [] for name in cases}
        for case in cases.values():  # warm-up: first connections, imports, CPU frequency
            case()
        for round_number in range(args.rounds):
            for name, case in cases.items():
                results[name].append(case())
            print(f"round {round_number + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(workdir, ignore_errors=True)

    best = {name: max(values) for name, values in results.items()}
    print(f"\nquery-status, {args.ops} ops per run, best of {args.rounds} interleaved rounds\n")
    print(f"{'client':32} {'ops/s':>9} {'median':>9}")
    for name, values in results.items():
        print(f"{name:32} {best[name]:9.0f} {statistics.median(values):9.0f}")
    print()
    legacy = best["qemu.qmp legacy, sequential"]
    ratios = [
        ("vmctl seq / raw seq", best["vmctl, sequential"] / best["raw socket, sequential"], 0.95),
        ("vmctl seq / qemu.qmp legacy", best["vmctl, sequential"] / legacy, 1.5),
        ("vmctl 8 threads / raw pipelined", best["vmctl, 8 threads"] / best["raw socket, pipelined x8"], 1.0),
        ("vmctl 8 threads / qemu.qmp legacy", best["vmctl, 8 threads"] / legacy, 1.5),
        (
            "vmctl async seq / qemu.qmp async seq",
            best["vmctl async, sequential"] / best["qemu.qmp async, sequential"],
            1.3,
        ),
        ("vmctl async 8 / qemu.qmp async 8", best["vmctl async, 8 tasks"] / best["qemu.qmp async, 8 tasks"], 1.1),
        ("vmctl async seq / raw seq", best["vmctl async, sequential"] / best["raw socket, sequential"], None),
    ]
    for label, ratio, goal in ratios:
        verdict = "" if goal is None else (f"  goal >= {goal:.2f}: " + ("met" if ratio >= goal else "MISSED"))
        print(f"{label:36} {ratio:6.2f}x{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
