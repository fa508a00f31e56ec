"""The ``vmctl`` command line: the demo, a QMP shell, an event tail (on vmctl's socket or through
libvirt), a VM's status; and the operator's tools (``ls``, ``top``, ``screenshot``, ``agent``),
which reach each VM on its tools monitor, beside the control plane."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import threading
from pathlib import Path

import attrs
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
    args = parser.parse_args(argv)
    # The CLI is an application, so it (unlike the library) decides how logs look.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if args.verbose else 40))
    try:
        if args.command == "demo":
            from vmctl.cli.demo import run_demo

            return run_demo(sys.stdout, cache_dir=args.cache_dir)
        if args.command == "qmp":
            return _qmp(_monitor(args), args.qmp_command, args.arguments)
        if args.command == "events":
            return _events(_monitor(args))
        if args.command == "status":
            return _status(args.run_dir, query=args.query)
        if args.command == "ls":
            return _ls(args.run_root, as_json=args.json)
        if args.command == "top":
            from vmctl.cli.top import run_top

            return run_top(args.run_root, interval=args.interval)
        if args.command == "screenshot":
            return _screenshot(args.run_dir, args.output)
        if args.command == "migrate":
            return _migrate(args.source, args.target, timeout=args.timeout, finish_within=args.finish_within,
                            postcopy=args.postcopy)  # fmt: skip
        if args.command == "agent":
            return _agent(args.run_dir, args.action, args.argv, timeout=args.timeout)
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
    from vmctl.cli import qmpshell

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


def _ls(root: Path, *, as_json: bool) -> int:
    from vmctl.cli.listing import rows, table

    listed = rows(root)
    if as_json:
        for row in listed:
            fields = {**attrs.asdict(row), "run_dir": str(row.run_dir), "disks": list(row.disks)}
            print(json.dumps(fields))
    elif listed:
        print(table(listed))
    else:
        print(f"no VM under {root}", file=sys.stderr)
    return 0


def _migrate(source_dir: Path, target_dir: Path, *, timeout: float, finish_within: float | None, postcopy: bool) -> int:
    """Attach the source (no control plane may hold it: QEMU serves one client per monitor),
    start the target from the source's devices as they are now, move the guest, and leave both
    detached: the target runs on, the source's QEMU quits after handing over."""
    from vmctl import VM
    from vmctl.cli.progress import ProgressBar

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


def _screenshot(run_dir: Path, output: Path) -> int:
    from vmctl.cli.listing import tools_monitor
    from vmctl.ops.screen import screendump
    from vmctl.vm.statefile import read_record

    if not read_record(run_dir).spec.vga:
        raise InvalidArgument(f"{run_dir}: this VM has no display (launch it with VMSpec(vga=True))")
    with tools_monitor(run_dir) as monitor:
        print(screendump(monitor, structlog.get_logger("vmctl.cli"), output))
    return 0


def _agent(run_dir: Path, action: str, argv: list[str], *, timeout: float) -> int:
    from vmctl.agent.client import AgentClient
    from vmctl.agent.guest import GuestAgent
    from vmctl.cli.listing import tools_monitor
    from vmctl.model.names import AGENT_CHARDEV, AGENT_SOCKET
    from vmctl.ops.chardevs import frontend_open
    from vmctl.vm.statefile import read_record

    record = read_record(run_dir)
    if not record.spec.guest_agent:
        raise InvalidArgument(f"{run_dir}: this VM has no guest agent (launch it with VMSpec(guest_agent=True))")
    if (action == "exec") != bool(argv):
        raise InvalidArgument("exec takes a command after --, and only exec does")
    with tools_monitor(run_dir) as monitor:
        client = AgentClient(
            run_dir / AGENT_SOCKET, name=record.spec.name, port_open=lambda: frontend_open(monitor, AGENT_CHARDEV)
        )
        guest = GuestAgent(client)
        if action == "exec":
            result = guest.exec(argv, timeout=timeout)
            sys.stdout.buffer.write(result.stdout)
            sys.stderr.buffer.write(result.stderr)
            sys.stdout.flush()
            return result.exit_code if result.exit_code is not None else 128 + (result.signal or 0)
        if action == "ping":
            guest.ping(timeout=timeout)
            print("ok")
        elif action == "info":
            info = guest.info(timeout=timeout)
            print(json.dumps({"version": info.version, "commands": list(info.commands)}, indent=2))
        elif action == "interfaces":
            for interface in guest.network_interfaces(timeout=timeout):
                addresses = " ".join(f"{a.address}/{a.prefix}" for a in interface.addresses)
                print(f"{interface.name:16} {interface.mac or '-':18} {addresses}".rstrip())
        elif action == "fsfreeze-status":
            print(guest.fsfreeze_status(timeout=timeout).value)
        else:
            print(f"thawed {guest.thaw(timeout=timeout)} filesystems")
    return 0
