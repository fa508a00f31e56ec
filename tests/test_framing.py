from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vmctl.qmp.framing import KEEP_BYTES, LineFramer, Oversized

line_bodies = st.binary(max_size=300).map(lambda b: b.replace(b"\n", b" "))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for point in [*points, len(data)]:
        pieces.append(data[last:point])
        last = point
    return [p for p in pieces if p]


@given(st.lists(line_bodies, max_size=20), st.lists(st.integers(min_value=0), max_size=30))
def test_any_chunking_yields_the_same_lines(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(body + b"\n" for body in bodies)
    framer = LineFramer(max_size=1000)
    out: list[bytes | Oversized] = []
    for piece in split(stream, cuts):
        out += framer.feed(piece)
    assert out == [body + b"\n" for body in bodies]
    assert framer.buffered == 0


@given(
    st.lists(st.tuples(st.booleans(), line_bodies), max_size=12),
    st.lists(st.integers(min_value=0), max_size=30),
    st.integers(min_value=2, max_value=120),
)
def test_oversized_lines_become_markers_and_memory_stays_bounded(
    lines: list[tuple[bool, bytes]], cuts: list[int], max_size: int
) -> None:
    bodies = [(body * (max_size // max(1, len(body)) + 2) if big and body else body) for big, body in lines]
    stream = b"".join(body + b"\n" for body in bodies)
    framer = LineFramer(max_size=max_size)
    out: list[bytes | Oversized] = []
    pieces = split(stream, cuts)
    for piece in pieces:
        out += framer.feed(piece)
        # Never more than the limit plus one chunk is held, however long the message.
        assert len(framer._buf) <= max_size + max(len(p) for p in pieces)
    assert len(out) == len(bodies)
    for body, item in zip(bodies, out, strict=True):
        whole = body + b"\n"
        if len(whole) > max_size:
            assert isinstance(item, Oversized)
            assert item.size == len(whole)
            assert whole.startswith(item.head) and whole.endswith(item.tail)
            assert len(item.head) <= KEEP_BYTES and len(item.tail) <= KEEP_BYTES
        else:
            assert item == whole


def test_huge_message_keeps_only_its_ends() -> None:
    framer = LineFramer(max_size=100)
    assert framer.feed(b'{"return": "' + b"x" * 50) == []
    for _ in range(1000):
        assert framer.feed(b"y" * 10_000) == []
    assert framer.buffered > 10_000_000 - 1
    (marker,) = framer.feed(b'", "id": "vmctl-7"}\r\n{"event": "STOP"}\r\n')[:1]
    assert isinstance(marker, Oversized)
    assert marker.head.startswith(b'{"return"')
    assert marker.tail.endswith(b'"id": "vmctl-7"}\r\n')
