"""The ``vmctl`` command line: the demo, a QMP shell, an event tail (on vmctl's socket or through
libvirt) and a VM's status."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

import structlog

from vmctl.errors import InvalidArgument, StaleState, VmctlError
from vmctl.qmp import Event, QMPMonitor, connect


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)
    # The CLI is an application, so it (unlike the library) decides how logs look.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if args.verbose else 40))
    try:
        if args.command == "demo":
            from vmctl.demo import run_demo

            return run_demo(sys.stdout, cache_dir=args.cache_dir)
        if args.command == "qmp":
            return _qmp(_monitor(args), args.qmp_command, args.arguments)
        if args.command == "events":
            return _events(_monitor(args))
        if args.command == "status":
            return _status(args.run_dir, query=args.query)
    except KeyboardInterrupt:
        return 130
    except VmctlError as exc:
        print(f"vmctl: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 2


def _monitor(args: argparse.Namespace) -> QMPMonitor:
    if args.libvirt is None:
        if args.virsh:
            raise InvalidArgument("--virsh needs --libvirt URI")
        return connect(args.socket, name="cli", timeout=5)
    from vmctl.libvirt import LibvirtMonitor, VirshMonitor

    if args.virsh:
        return VirshMonitor(args.libvirt, args.socket)
    return LibvirtMonitor.open(args.libvirt, args.socket)


def _qmp(monitor: QMPMonitor, command: str | None, arguments: str | None) -> int:
    from vmctl import qmpshell

    try:
        if command is None:
            return qmpshell.interactive(monitor)
        parsed = json.loads(arguments) if arguments else {}
        if not isinstance(parsed, dict):
            raise InvalidArgument("the arguments must be a JSON object")
        return qmpshell.run_one(monitor, command, parsed, sys.stdout)
    finally:
        monitor.close()


def _events(monitor: QMPMonitor) -> int:
    try:
        gone = threading.Event()

        def show(event: Event) -> None:
            line = {"event": event.name, "data": dict(event.data), "timestamp": event.timestamp}
            print(json.dumps(line), flush=True)

        monitor.on_event(show)
        monitor.on_disconnect(lambda error: gone.set())
        gone.wait()
    finally:
        monitor.close()
    return 0


def _status(run_dir: Path, *, query: bool) -> int:
    from vmctl.vm.process import QemuProcess
    from vmctl.vm.statefile import read_record

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


if __name__ == "__main__":
    sys.exit(main())
