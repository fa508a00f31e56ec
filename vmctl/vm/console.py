"""The serial console: kept in a QEMU ringbuf chardev and read over QMP, or (libvirt) in a file."""

from __future__ import annotations

import codecs
import threading
import time
from pathlib import Path

from vmctl.errors import InvalidArgument, WaitTimeout
from vmctl.qmp import QMPMonitor

_READ_CHUNK = 64 * 1024
_KEEP = 1024 * 1024  # how much console text wait_for can search


class Console:
    """Text the guest printed on its first serial port. ``ringbuf-read`` stays out of the logs."""

    def __init__(self, qmp: QMPMonitor, chardev: str) -> None:
        self._qmp = qmp
        self._chardev = chardev
        self._start()

    def _start(self) -> None:
        self._seen = ""
        self._total = 0  # characters read since the console was opened
        self._lock = threading.Lock()

    def read(self) -> str:
        """What the guest printed since the last read (QEMU's ringbuf keeps the last 1 MiB)."""
        with self._lock:
            return self._fetch()

    def _read_new(self) -> str:
        pieces = []
        while True:
            data = self._qmp.execute("ringbuf-read", {"device": self._chardev, "size": _READ_CHUNK, "format": "utf8"})
            if not data:
                break
            pieces.append(str(data))
        return "".join(pieces)

    def _fetch(self) -> str:
        text = self._read_new()
        self._seen = (self._seen + text)[-_KEEP:]
        self._total += len(text)
        return text

    @property
    def history(self) -> str:
        """The console text read so far (the last 1 MiB)."""
        return self._seen

    @property
    def position(self) -> int:
        """How many characters have been read so far: pass it as ``since`` to wait for new output only."""
        return self._total

    def wait_for(self, text: str, *, timeout: float, since: int = 0) -> str:
        """Wait until ``text`` appears in the output read after position ``since``; returns that output."""
        if not text:
            raise InvalidArgument("wait_for needs some text to wait for")
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            with self._lock:
                self._fetch()
                window = self._seen[max(0, since - (self._total - len(self._seen))) :]
                if text in window:
                    return window
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                tail = self._seen[-500:]
                raise WaitTimeout(f"{text!r} did not appear on the console within {timeout:g}s; last output:\n{tail}")
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, 0.1)


class LogConsole(Console):
    """The console of a guest whose first serial port QEMU writes to a file (libvirt's domains)."""

    def __init__(self, path: Path) -> None:  # the text's state only: no ringbuf behind it
        self._start()
        self._path = path
        self._offset = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _read_new(self) -> str:
        try:
            with open(self._path, "rb") as log:
                log.seek(self._offset)
                data = log.read()
        except FileNotFoundError:  # QEMU has not started writing it yet
            return ""
        self._offset += len(data)
        return self._decoder.decode(data)
