"""``vmctl.Domain`` is what both VMs are: mypy (part of CI) checks the assignments below."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from vmctl import VM, Domain
from vmctl.libvirt import LibvirtVM


def both_are_domains(vm: VM, libvirt_vm: LibvirtVM) -> tuple[Domain, Domain]:
    return vm, libvirt_vm


def parameters(function: Callable[..., Any]) -> tuple[list[str], set[str]]:
    """Its parameters a caller may name: in order as they may be passed by position, and keyword-only."""
    found = inspect.signature(function).parameters.values()
    named = [p.name for p in found if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    return named, {p.name for p in found if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_each_method_of_the_domain_protocol_takes_its_parameters_on_both_vms() -> None:
    members = [name for name, value in vars(Domain).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert {"hotplug_disk", "shutdown", "migrate", "snapshot_disks"} <= set(members)
    for name in members:
        named, keywords = parameters(getattr(Domain, name))
        for cls in (VM, LibvirtVM):
            if name in vars(cls):  # VM hands most of its methods over from its parts at __init__
                has_named, has_keywords = parameters(getattr(cls, name))
                assert has_named[: len(named)] == named, (cls, name)
                assert keywords <= has_keywords | set(has_named), (cls, name)
