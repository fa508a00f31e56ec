"""What XBZRLE does for a guest rewriting its pages in place, on raw QMP (the facts behind the
convergence policy's compression step, vmctl.ops.convergence).

    .venv/bin/python bench/xbzrle_probe.py [--qemu PATH ...]

The guest (256 MiB, TCG) rewrites a 16 MiB tmpfs file in place with a few bytes of each page
changed (``MemoryDirtier(in_place=True)``); the link is 16 MiB/s. For each QEMU:
- ``grown``: XBZRLE on with a 4 KiB cache, grown to 64 MiB at the third pass (what a policy that
  turned compression on when needed would do), for 45 s: is the bigger cache used?
- ``from the start``: XBZRLE on with a 64 MiB cache before ``migrate``: does it complete, and does
  the guest on the target (resumed with ``cont``) still answer with its files whole?
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog
from convergence import MIB, REPO, Bench, check, reap
from rawqmp import RawQMP


def migrate(bench: Bench, qemu: str, *, start_cache: int, grown_cache: int | None, seconds: float) -> dict[str, Any]:
    source, target, dirtier = bench.busy_pair(qemu, in_place=True)
    try:
        src, dst = RawQMP(str(source.run_dir / "raw.sock")), RawQMP(str(target.run_dir / "raw.sock"))
        for monitor in (src, dst):
            monitor.call("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
        src.call("migrate-set-capabilities", {"capabilities": [{"capability": "xbzrle", "state": True}]})
        src.call("migrate-set-parameters", {"max-bandwidth": 16 * MIB, "xbzrle-cache-size": start_cache})
        uri = f"unix:{target.run_dir}/migrate.sock"
        dst.call("migrate-incoming", {"uri": uri})
        started = time.monotonic()
        src.call("migrate", {"uri": uri})
        grown = False
        info: dict[str, Any] = {}
        while time.monotonic() - started < seconds:
            info = src.call("query-migrate")
            if info["status"] in ("completed", "failed"):
                break
            if grown_cache and not grown and info.get("ram", {}).get("dirty-sync-count", 0) >= 3:
                src.call("migrate-set-parameters", {"xbzrle-cache-size": grown_cache})
                grown = True
            time.sleep(0.5)
        total = time.monotonic() - started
        cache = info.get("xbzrle-cache", {})
        if info["status"] == "completed":
            dst.call("cont")  # raw QMP: the target waits to be told
            side = target
        else:
            src.call("migrate_cancel")
            side = source
        src.close()
        dst.close()
        return {
            "status": info["status"],
            "total_s": total,
            "downtime_ms": info.get("downtime"),
            "cache_size": cache.get("cache-size"),
            "cache_miss_rate": cache.get("cache-miss-rate"),
            "xbzrle_pages": cache.get("pages"),
            "guest": check(side, dirtier),
        }
    finally:
        reap(source, target)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--qemu", action="append")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    qemus = args.qemu or [
        q for q in (shutil.which("qemu-system-x86_64"), str(REPO / ".cache/qemu-10.0/qemu-system-x86_64")) if q
    ]
    work = Path(tempfile.mkdtemp(prefix="vmctl-bench-"))
    work.chmod(0o711)
    bench = Bench(argparse.Namespace(memory=256, file_mib=16, link_mib=16), work)
    for qemu in qemus:
        print(f"\n{qemu}")
        runs = {
            "grown": migrate(bench, qemu, start_cache=4096, grown_cache=64 * MIB, seconds=45),
            "from the start": migrate(bench, qemu, start_cache=64 * MIB, grown_cache=None, seconds=45),
        }
        for name, r in runs.items():
            rate = "-" if r["cache_miss_rate"] is None else f"{r['cache_miss_rate']:.2f}"
            print(
                f"{name:15} {r['status']:10} {r['total_s']:5.1f} s  downtime {r['downtime_ms']} ms  "
                f"cache {r['cache_size']}  miss rate {rate}  xbzrle pages {r['xbzrle_pages']}  guest: {r['guest']}"
            )
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
