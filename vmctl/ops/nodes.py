"""QEMU's block nodes, asked once per call: by node name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmctl.ops.queries import ask
from vmctl.qmp import QMPMonitor


def block_nodes(qmp: QMPMonitor) -> dict[str, Mapping[str, Any]]:
    """Every named block node (``query-named-block-nodes``, flat), by node name."""
    return {str(n.get("node-name")): n for n in ask(qmp, "query-named-block-nodes", {"flat": True})}
