from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmctl.errors import InvalidArgument, ProtocolError, StateError
from vmctl.qmp.codec import NEED_DATA, Phase, QMPCodec
from vmctl.qmp.messages import ErrorReply, Event, Greeting, Negotiated, OversizedMessage, Reply, UndecodableMessage

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n'
)


def drain(proto: QMPCodec) -> list[Any]:
    out = []
    while (message := proto.next_event()) is not NEED_DATA:
        out.append(message)
    return out


def ready_protocol(**kwargs: Any) -> QMPCodec:
    proto = QMPCodec(**kwargs)
    proto.receive_data(GREETING)
    [greeting] = drain(proto)
    assert isinstance(greeting, Greeting)
    negotiation = json.loads(proto.start_negotiation())
    proto.receive_data(json.dumps({"return": {}, "id": negotiation["id"]}).encode() + b"\r\n")
    assert drain(proto) == [Negotiated(capabilities=("oob",))]
    return proto


def test_negotiation_enables_oob_when_offered() -> None:
    proto = QMPCodec()
    assert proto.next_event() is NEED_DATA
    proto.receive_data(GREETING[:10])
    assert proto.next_event() is NEED_DATA
    proto.receive_data(GREETING[10:])
    [greeting] = drain(proto)
    assert isinstance(greeting, Greeting)
    assert str(greeting.version) == "7.2.0" and greeting.capabilities == ("oob",)
    message = json.loads(proto.start_negotiation())
    assert message["execute"] == "qmp_capabilities"
    assert message["arguments"] == {"enable": ["oob"]}
    assert proto.phase is Phase.NEGOTIATING


def test_negotiation_without_oob_when_not_wanted() -> None:
    proto = QMPCodec(oob=False)
    proto.receive_data(GREETING)
    drain(proto)
    message = json.loads(proto.start_negotiation())
    assert "arguments" not in message
    assert proto.capabilities == ()


def test_a_reply_meant_for_an_earlier_client_is_dropped_during_negotiation() -> None:
    # A control plane killed with a command under way: QEMU hands its reply to the next client.
    proto = QMPCodec()
    proto.receive_data(b'{"return": {}, "id": "vmctl-0a1b2c-121"}\r\n' + GREETING)
    [greeting] = drain(proto)
    assert isinstance(greeting, Greeting)
    ours = json.loads(proto.start_negotiation())["id"]
    assert ours.startswith("vmctl-") and ours != "vmctl-0a1b2c-121"
    proto.receive_data(b'{"error": {"class": "GenericError", "desc": "x"}, "id": "vmctl-0a1b2c-122"}\r\n')
    proto.receive_data(json.dumps({"return": {}, "id": ours}).encode() + b"\r\n")
    drain(proto)
    assert proto.phase is Phase.READY and proto.stale_replies == 2


def test_commands_before_negotiation_are_refused() -> None:
    proto = QMPCodec()
    with pytest.raises(StateError, match="awaiting-greeting"):
        proto.send_command("query-status")
    with pytest.raises(StateError):
        proto.start_negotiation()


def test_replies_errors_and_events_are_typed() -> None:
    proto = ready_protocol()
    id1, data1 = proto.send_command("query-status")
    id2, data2 = proto.send_command("device_del", {"id": "disk1"})
    assert json.loads(data1) == {"execute": "query-status", "id": id1}
    assert json.loads(data2) == {"execute": "device_del", "arguments": {"id": "disk1"}, "id": id2}
    assert id1 != id2
    proto.receive_data(
        b'{"timestamp": {"seconds": 10, "microseconds": 500000}, "event": "STOP"}\r\n'
        + json.dumps({"return": {"status": "running"}, "id": id1}).encode()
        + b"\r\n"
        + json.dumps({"error": {"class": "DeviceNotFound", "desc": "no"}, "id": id2}).encode()
        + b"\r\n"
    )
    assert drain(proto) == [
        Event(name="STOP", data={}, timestamp=10.5),
        Reply(id=id1, value={"status": "running"}),
        ErrorReply(id=id2, error={"class": "DeviceNotFound", "desc": "no"}),
    ]


def test_oob_commands_need_the_capability() -> None:
    proto = ready_protocol()
    _, data = proto.send_command("migrate-pause", oob=True)
    assert json.loads(data)["exec-oob"] == "migrate-pause"
    plain = QMPCodec(oob=False)
    plain.receive_data(GREETING)
    drain(plain)
    negotiation = json.loads(plain.start_negotiation())
    plain.receive_data(json.dumps({"return": {}, "id": negotiation["id"]}).encode() + b"\n")
    with pytest.raises(InvalidArgument, match="out-of-band"):
        plain.send_command("migrate-pause", oob=True)


@pytest.mark.parametrize(
    ("command", "arguments"),
    [("", None), ("query-status", {"x": object()}), ("query-status", ["not", "a", "mapping"])],
)
def test_bad_commands_are_invalid_arguments(command: str, arguments: Any) -> None:
    proto = ready_protocol()
    with pytest.raises(InvalidArgument):
        proto.send_command(command, arguments)


def test_names_that_need_escaping_are_still_valid_json() -> None:
    proto = ready_protocol()
    _, data = proto.send_command('we"ird')
    assert json.loads(data)["execute"] == 'we"ird'


@pytest.mark.parametrize(
    "garbage",
    [b"not json\r\n", b"[1, 2]\r\n", b'{"what": 1}\r\n', b'{"return": {}}\r\n', GREETING],
)
def test_garbage_is_a_protocol_error(garbage: bytes) -> None:
    proto = ready_protocol()
    with pytest.raises(ProtocolError):
        proto.receive_data(garbage)


def test_truncated_stream_is_a_protocol_error() -> None:
    proto = ready_protocol()
    proto.receive_data(b'{"return": {}, "id": "vm')
    with pytest.raises(ProtocolError, match="middle of a message"):
        proto.receive_data(b"")


def test_clean_eof_is_no_error() -> None:
    proto = ready_protocol()
    proto.receive_data(b"")
    assert drain(proto) == []


@pytest.mark.parametrize("id_first", [True, False])
def test_too_deeply_nested_reply_is_undecodable_and_attributed(id_first: bool) -> None:
    proto = ready_protocol()
    command_id, _ = proto.send_command("qom-get")
    deep = "[" * 200_000 + "]" * 200_000
    line = f'{{"id": "{command_id}", "return": {deep}}}' if id_first else f'{{"return": {deep}, "id": "{command_id}"}}'
    proto.receive_data(line.encode() + b"\r\n")
    [message] = drain(proto)
    assert isinstance(message, UndecodableMessage) and message.id == command_id
    assert "nested too deeply" in message.why


def test_refused_negotiation_is_a_protocol_error() -> None:
    proto = QMPCodec()
    proto.receive_data(GREETING)
    drain(proto)
    negotiation = json.loads(proto.start_negotiation())
    with pytest.raises(ProtocolError, match="refused"):
        proto.receive_data(
            json.dumps({"error": {"class": "GenericError", "desc": "x"}, "id": negotiation["id"]}).encode() + b"\n"
        )


def test_max_message_size_has_a_floor() -> None:
    with pytest.raises(InvalidArgument):
        QMPCodec(max_message_size=10)


@given(
    st.integers(min_value=2000, max_value=20000),
    st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=8),
    st.booleans(),
)
def test_oversized_reply_is_attributed_to_its_command(size: int, chunk_sizes: list[int], id_first: bool) -> None:
    proto = ready_protocol(max_message_size=1024)
    command_id, _ = proto.send_command("query-qmp-schema")
    other_id, _ = proto.send_command("query-status")
    body = {"return": "x" * size}
    message = {"id": command_id, **body} if id_first else {**body, "id": command_id}
    stream = json.dumps(message).encode() + b"\r\n" + json.dumps({"return": {}, "id": other_id}).encode() + b"\r\n"
    position, index = 0, 0
    while position < len(stream):
        step = chunk_sizes[index % len(chunk_sizes)]
        proto.receive_data(stream[position : position + step])
        position += step
        index += 1
    oversized, reply = drain(proto)
    assert oversized == OversizedMessage(
        id=command_id, is_event=False, size=len(stream) - len(stream.split(b"\n", 1)[1])
    )
    assert reply == Reply(id=other_id, value={})


def test_oversized_event_is_recognised() -> None:
    proto = ready_protocol(max_message_size=1024)
    proto.receive_data(b'{"event": "BIG", "data": {"x": "' + b"y" * 5000 + b'"}}\r\n')
    [message] = drain(proto)
    assert isinstance(message, OversizedMessage) and message.is_event and message.id is None


@given(st.lists(st.sampled_from(["reply", "error", "event"]), max_size=15), st.lists(st.integers(1, 40), min_size=1))
def test_message_sequence_survives_any_chunking(kinds: list[str], chunk_sizes: list[int]) -> None:
    proto = ready_protocol()
    expected: list[Any] = []
    stream = b""
    for n, kind in enumerate(kinds):
        if kind == "event":
            stream += json.dumps(
                {"event": f"E{n}", "data": {"n": n}, "timestamp": {"seconds": n, "microseconds": 0}}
            ).encode()
            expected.append(Event(name=f"E{n}", data={"n": n}, timestamp=float(n)))
        else:
            command_id, _ = proto.send_command("x")
            if kind == "reply":
                stream += json.dumps({"return": [n], "id": command_id}).encode()
                expected.append(Reply(id=command_id, value=[n]))
            else:
                stream += json.dumps({"error": {"class": "GenericError", "desc": str(n)}, "id": command_id}).encode()
                expected.append(ErrorReply(id=command_id, error={"class": "GenericError", "desc": str(n)}))
        stream += b"\r\n"
    got: list[Any] = []
    position, index = 0, 0
    while position < len(stream):
        step = chunk_sizes[index % len(chunk_sizes)]
        proto.receive_data(stream[position : position + step])
        got += drain(proto)
        position += step
        index += 1
    assert got == expected


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_hang_or_crash(data: bytes) -> None:
    proto = ready_protocol()
    try:
        proto.receive_data(data)
        drain(proto)
        proto.receive_data(b"")
    except (ProtocolError, StateError):
        pass
