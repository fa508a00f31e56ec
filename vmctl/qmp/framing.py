"""Split QMP's newline-delimited byte stream into messages, with a hard size limit.

An oversized message is not kept: only its head and tail survive (enough to find the ``id``
of the command it answers), so a huge reply costs bounded memory and fails only that command.
"""

from __future__ import annotations

import attrs

#: How much of an oversized message is kept at each end to identify it.
KEEP_BYTES = 4096


@attrs.frozen(slots=True, kw_only=True)
class Oversized:
    """A message that exceeded the limit; ``size`` counts its bytes, newline included."""

    size: int
    head: bytes
    tail: bytes


class LineFramer:
    """Feed it bytes; it returns the complete lines (newline included) and ``Oversized`` markers."""

    __slots__ = ("_buf", "_max_size", "_skip_head", "_skip_size", "_skip_tail")

    def __init__(self, max_size: int) -> None:
        if max_size < 2:
            raise ValueError("max_size must allow at least one byte and a newline")
        self._buf = bytearray()
        self._max_size = max_size
        self._skip_size = -1  # >= 0 while discarding the rest of an oversized message
        self._skip_head = b""
        self._skip_tail = b""

    @property
    def buffered(self) -> int:
        """Bytes of an unfinished message held (or skipped) so far."""
        return len(self._buf) if self._skip_size < 0 else self._skip_size

    def feed(self, data: bytes) -> list[bytes | Oversized]:
        out: list[bytes | Oversized] = []
        if self._skip_size >= 0:
            data = self._skip(data, out)
            if not data:
                return out
        buf = self._buf
        # Fast path: one whole message in one chunk, nothing buffered (the common reply).
        if not buf and data.find(b"\n") == len(data) - 1 and len(data) <= self._max_size:
            out.append(data)
            return out
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            end += 1
            if end - start > self._max_size:
                out.append(
                    Oversized(
                        size=end - start,
                        head=bytes(buf[start : min(end, start + KEEP_BYTES)]),
                        tail=bytes(buf[max(start, end - KEEP_BYTES) : end]),
                    )
                )
            else:
                out.append(bytes(buf[start:end]))
            start = end
        del buf[:start]
        if len(buf) > self._max_size:
            # Start discarding: keep only the ends, never the whole message.
            self._skip_size = len(buf)
            self._skip_head = bytes(buf[:KEEP_BYTES])
            self._skip_tail = bytes(buf[-KEEP_BYTES:])
            buf.clear()
        return out

    def _skip(self, data: bytes, out: list[bytes | Oversized]) -> bytes:
        end = data.find(b"\n")
        piece = data if end < 0 else data[: end + 1]
        self._skip_size += len(piece)
        self._skip_tail = (self._skip_tail + piece)[-KEEP_BYTES:]
        if end < 0:
            return b""
        out.append(Oversized(size=self._skip_size, head=self._skip_head, tail=self._skip_tail))
        self._skip_size = -1
        self._skip_head = self._skip_tail = b""
        return data[end + 1 :]
