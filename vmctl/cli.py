"""The ``vmctl`` command line."""

from __future__ import annotations

import argparse
import sys

import structlog


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vmctl", description="Run QEMU virtual machines.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="boot QEMU and show vmctl driving it, with progress")
    args = parser.parse_args(argv)
    # The CLI is an application, so it (unlike the library) chooses how logs look: quiet by default.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))
    if args.command == "demo":
        from vmctl.demo import run_qmp_demo

        return run_qmp_demo(sys.stdout)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
