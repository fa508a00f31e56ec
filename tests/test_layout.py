"""The layers point down only: model <- qmp <- ops <- vm (and libvirt beside it) <- cli/testing, no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "vmctl"

# What each room may import from vmctl (besides itself, vmctl.errors, the one error tree, and vmctl.logs).
ALLOWED = {
    "model": set(),
    "qmp": {"model"},
    "agent": {"model", "qmp"},  # the guest agent's protocol and client: beside the QMP transport
    "ops": {"model", "qmp"},
    "vm": {"model", "qmp", "ops", "agent"},
    "libvirt": {"model", "qmp", "ops", "vm", "agent"},  # the same VM API, on libvirt: beside vm, not under it
    # The API both VMs satisfy: declared above them, owned by neither (its console is vm's shared part).
    "domain": {"model", "qmp", "ops", "vm"},
    # The vmctl command, on top: it may use every room below; the demo boots vmctl.testing's guest.
    "cli": {"model", "qmp", "agent", "ops", "vm", "libvirt", "testing", "domain"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def vmctl_imports(path: Path) -> set[str]:
    """Every vmctl module ``path`` imports, at any level (TYPE_CHECKING blocks included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vmctl"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("vmctl")}
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_each_layer_imports_only_the_layers_below_it(layer: str) -> None:
    wrong = []
    room_path = PACKAGE / layer
    for path in sorted(room_path.rglob("*.py")) if room_path.is_dir() else [room_path.with_suffix(".py")]:
        for imported in vmctl_imports(path):
            target = room(imported)
            if target not in (layer, "errors", "logs", None) and target not in ALLOWED[layer]:
                wrong.append(f"{module_name(path)} imports {imported}")
    assert wrong == []


def test_there_is_no_import_cycle_between_modules() -> None:
    graph = {module_name(p): vmctl_imports(p) for p in PACKAGE.rglob("*.py")}
    modules = set(graph)
    edges = {m: {i for i in imports if i in modules and i != m} for m, imports in graph.items()}
    # A package's __init__ importing its own submodules is not a cycle of ideas: drop those edges.
    for module, targets in edges.items():
        edges[module] = {t for t in targets if not t.startswith(module + ".")}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(module: str, stack: list[str]) -> bool:
        state[module] = 1
        for target in sorted(edges[module]):
            if state.get(target) == 1:
                cycle.extend([*stack, module, target])
                return True
            if target not in state and visit(target, [*stack, module]):
                return True
        state[module] = 2
        return False

    for module in sorted(edges):
        if module not in state and visit(module, []):
            break
    assert cycle == []
