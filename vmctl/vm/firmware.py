"""UEFI firmware for a VM: the code image read-only, the variable store a file of the VM's own.

As libvirt keeps NVRAM, each VM has its copy of the variable store in its run dir, made from
OVMF's template at first launch and kept across launches; a spec naming ``uefi_vars`` (a
migration target's, made from its source's store) gets a fresh copy of that file instead.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from vmctl.errors import FirmwareNotFound
from vmctl.model import VMSpec
from vmctl.model.names import UEFI_VARS_FILE
from vmctl.vm.passing import own_file


def prepare_firmware(spec: VMSpec, run_dir: Path) -> None:
    """Check the firmware images and make the VM's variable store; nothing to do for BIOS."""
    if spec.firmware != "uefi":
        return
    if not Path(spec.uefi_code).is_file():
        raise FirmwareNotFound(f"UEFI firmware {spec.uefi_code} is not installed (apt-get install ovmf)")
    store = run_dir / UEFI_VARS_FILE
    if spec.uefi_vars is None and store.is_file() and not store.is_symlink():
        return  # the VM's own NVRAM, from an earlier launch (checked again as it is opened for QEMU)
    template = Path(spec.uefi_vars_template)
    if not template.is_file():
        raise FirmwareNotFound(f"UEFI variable store {template} does not exist (apt-get install ovmf)")
    if template.resolve() == store.resolve():
        return
    partial = store.with_name(store.name + ".new")
    with open(template, "rb") as source, os.fdopen(own_file(str(partial)), "wb") as copy:
        shutil.copyfileobj(source, copy)
    os.replace(partial, store)
