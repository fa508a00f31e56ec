"""An optional JSON-lines record of QMP traffic, secrets redacted and quiet traffic left out."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any


class Transcript:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        # Line-buffered so a crash loses at most the line being written.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, direction: str, message: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 6), "dir": direction, **message}, default=repr)
        with self._lock:
            if not self._file.closed:
                self._file.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._file.close()
