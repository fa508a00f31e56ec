"""The ``vmctl`` command line: the demo, a QMP shell, an event tail (on vmctl's socket or through
libvirt), a VM's status; and the operator's tools (``ls``, ``top``, ``screenshot``, ``agent``),
which reach each VM on its tools monitor, beside the control plane.

This module holds the arguments and which handler each subcommand runs; the handlers live in
the modules of this package named after them (``ls`` in ``listing``, ``qmp`` and ``events`` in
``monitor``, ``screenshot`` and ``agent`` in ``tools``)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import structlog

from vmctl.cli.listing import run_ls
from vmctl.cli.migrate import run_migrate
from vmctl.cli.monitor import open_monitor, run_events, run_qmp
from vmctl.cli.status import run_status
from vmctl.cli.tools import run_agent, run_screenshot
from vmctl.errors import VmctlError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # The CLI is an application, so it (unlike the library) decides how logs look.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if args.verbose else 40))
    try:
        if args.command == "demo":
            from vmctl.cli.demo import run_demo  # it brings vmctl.testing's guest builder: only for the demo

            return run_demo(sys.stdout, cache_dir=args.cache_dir)
        if args.command == "qmp":
            return run_qmp(open_monitor(args.socket, libvirt=args.libvirt, virsh=args.virsh), args.qmp_command,
                           args.arguments)  # fmt: skip
        if args.command == "events":
            return run_events(open_monitor(args.socket, libvirt=args.libvirt, virsh=args.virsh))
        if args.command == "status":
            return run_status(args.run_dir, query=args.query)
        if args.command == "ls":
            return run_ls(args.run_root, as_json=args.json)
        if args.command == "top":
            from vmctl.cli.top import run_top  # it brings curses: only for top

            return run_top(args.run_root, interval=args.interval)
        if args.command == "screenshot":
            return run_screenshot(args.run_dir, args.output)
        if args.command == "migrate":
            return run_migrate(args.source, args.target, timeout=args.timeout, finish_within=args.finish_within,
                               postcopy=args.postcopy)  # fmt: skip
        if args.command == "agent":
            return run_agent(args.run_dir, args.action, args.argv, timeout=args.timeout)
    except KeyboardInterrupt:
        return 130
    except VmctlError as exc:
        print(f"vmctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vmctl", description="Run QEMU virtual machines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="show vmctl's own log lines")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="boot two tiny guests: hotplug, events, live migration")
    demo.add_argument("--cache-dir", type=Path, default=None, help="where the test guest is built and kept")
    qmp = commands.add_parser("qmp", help="an interactive QMP shell, or one command")
    qmp.add_argument("socket", help="the QMP unix socket (a VM's run_dir/qmp.sock), or with --libvirt a domain")
    qmp.add_argument("qmp_command", nargs="?", help="run this command and exit")
    qmp.add_argument("arguments", nargs="?", help="its arguments as a JSON object")
    events = commands.add_parser("events", help="print QMP events as JSON lines until interrupted")
    events.add_argument("socket", help="the QMP unix socket, or with --libvirt a domain")
    for through_libvirt in (qmp, events):
        through_libvirt.add_argument("--libvirt", metavar="URI", help="the domain's QMP through libvirtd at URI")
        through_libvirt.add_argument("--virsh", action="store_true", help="with --libvirt: through the virsh command")
    status = commands.add_parser("status", help="what a run directory's VM is doing")
    status.add_argument("run_dir", type=Path)
    status.add_argument("--query", action="store_true", help="also ask QEMU (needs its monitor to be free)")
    listing = commands.add_parser("ls", help="every VM whose run dir is under RUN_ROOT: state, pid, vCPUs, memory")
    listing.add_argument("run_root", type=Path, nargs="?", default=Path("."))
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    top = commands.add_parser("top", help="a live view of every VM under RUN_ROOT: CPU, disk and network (q quits)")
    top.add_argument("run_root", type=Path, nargs="?", default=Path("."))
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    screenshot = commands.add_parser("screenshot", help="the VM's screen as a PNG (a VM launched with vga=True)")
    screenshot.add_argument("run_dir", type=Path)
    screenshot.add_argument("output", type=Path)
    agent = commands.add_parser("agent", help="the guest agent: exec -- CMD..., ping, info, interfaces, thaw")
    agent.add_argument("run_dir", type=Path)
    agent.add_argument("action", choices=["exec", "ping", "info", "interfaces", "fsfreeze-status", "thaw"])
    agent.add_argument("argv", nargs="*", help="exec: the command and its arguments (after --)")
    agent.add_argument("--timeout", type=float, default=30.0)
    migrate = commands.add_parser("migrate", help="live-migrate the VM of SRC_RUN_DIR into a new QEMU in DST_RUN_DIR")
    migrate.add_argument("source", type=Path, metavar="SRC_RUN_DIR")
    migrate.add_argument("target", type=Path, metavar="DST_RUN_DIR")
    migrate.add_argument("--timeout", type=float, default=600.0, help="give up (and cancel) after this many seconds")
    migrate.add_argument("--finish-within", type=float, default=None, help="the convergence policy's deadline")
    migrate.add_argument("--postcopy", action="store_true", help="switch to postcopy once the first pass is done")
    return parser
