"""The end of QEMU's log, for errors that should say what QEMU said."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

_LOG_TAIL_LINES: Final = 30
_LOG_TAIL_BYTES: Final = 16384


def tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as log_file:
            log_file.seek(0, os.SEEK_END)
            size = log_file.tell()
            log_file.seek(max(0, size - _LOG_TAIL_BYTES))
            text = log_file.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])
