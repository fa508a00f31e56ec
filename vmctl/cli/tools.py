"""``vmctl screenshot`` and ``vmctl agent``: the operator's tools that reach a VM on its tools
monitor (the second QMP monitor vmctl adds at launch), so they work while a control plane holds
the first."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vmctl.agent.client import AgentClient
from vmctl.agent.guest import GuestAgent
from vmctl.cli.listing import tools_monitor
from vmctl.errors import InvalidArgument
from vmctl.logs import get_logger
from vmctl.model.names import AGENT_CHARDEV, AGENT_SOCKET
from vmctl.ops.chardevs import frontend_open
from vmctl.ops.screen import screendump
from vmctl.vm.statefile import read_record

log = get_logger(__name__)


def run_screenshot(run_dir: Path, output: Path) -> int:
    """Write the VM's screen to ``output`` (PNG) and print its path."""
    if not read_record(run_dir).spec.vga:
        raise InvalidArgument(f"{run_dir}: this VM has no display (launch it with VMSpec(vga=True))")
    with tools_monitor(run_dir) as monitor:
        print(screendump(monitor, log, output))
    return 0


def run_agent(run_dir: Path, action: str, argv: list[str], *, timeout: float) -> int:
    """One guest agent call; ``exec`` passes on the command's output and exit code."""
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
