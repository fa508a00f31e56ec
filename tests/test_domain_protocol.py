"""``vmctl.Domain`` is what both VMs are: mypy (part of CI) checks the assignments below."""

from __future__ import annotations

import inspect

from vmctl import VM, Domain
from vmctl.libvirt import LibvirtVM


def both_are_domains(vm: VM, libvirt_vm: LibvirtVM) -> tuple[Domain, Domain]:
    return vm, libvirt_vm


def test_every_method_of_the_domain_protocol_has_the_same_parameters_on_both_vms() -> None:
    members = [name for name, value in vars(Domain).items() if inspect.isfunction(value) and not name.startswith("_")]
    assert "hotplug_disk" in members and "shutdown" in members
    for name in members:
        wanted = list(inspect.signature(getattr(Domain, name)).parameters)
        for cls in (VM, LibvirtVM):
            if name in vars(cls):  # VM hands most of its methods over from its parts at __init__
                assert list(inspect.signature(getattr(cls, name)).parameters)[: len(wanted)] == wanted, (cls, name)
