"""The connection core (``vmctl.qmp.protocol``) on its own: no socket, no thread, bytes in and out."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmctl.errors import (
    CommandNotFound,
    ConnectionLost,
    EventMatchError,
    InvalidArgument,
    MessageTooLarge,
    ProtocolError,
    StateError,
)
from vmctl.qmp.events import EventBuffer, EventFilter
from vmctl.qmp.messages import Event
from vmctl.qmp.protocol import Command, ConnectionState, QMPProtocol

GREETING = (
    b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}\r\n'
)


class Woken:
    def __init__(self) -> None:
        self.count = 0

    def wake(self) -> None:
        self.count += 1


class Sink(EventBuffer):
    def _notify(self) -> None:
        pass


def written(core: QMPProtocol) -> list[tuple[bytes, tuple[int, ...]]]:
    """Everything the core wants written now, as a face would write it (whole)."""
    out = []
    while (chunk := core.data_to_send()) is not None:
        out.append(chunk)
        core.bytes_sent(len(chunk[0]))
    return out


def messages(chunks: list[tuple[bytes, tuple[int, ...]]]) -> list[dict[str, Any]]:
    return [json.loads(line) for data, _ in chunks for line in data.splitlines()]


def running_core(**kwargs: Any) -> QMPProtocol:
    core = QMPProtocol(name="core", **kwargs)
    assert connection_state(core) is ConnectionState.CONNECTING
    core.receive_data(GREETING)
    [negotiation] = messages(written(core))
    assert negotiation["execute"] == "qmp_capabilities"
    core.receive_data(json.dumps({"return": {}, "id": negotiation["id"]}).encode() + b"\r\n")
    assert connection_state(core) is ConnectionState.RUNNING
    return core


def connection_state(core: QMPProtocol) -> ConnectionState:
    return core.connection_state  # read through a call: each read is fresh for the type checker


def reply(command: Command, value: Any = None) -> bytes:
    return json.dumps({"return": value if value is not None else {}, "id": command.id}).encode() + b"\r\n"


def test_commands_are_refused_before_negotiation() -> None:
    core = QMPProtocol(name="core")
    with pytest.raises(StateError, match="connecting"):
        core.command("query-status", waker=Woken())


def test_a_reply_completes_its_command_and_wakes_it_once() -> None:
    core = running_core()
    woken = Woken()
    cmd = core.command("query-status", waker=woken)
    [sent] = messages(written(core))
    assert sent == {"execute": "query-status", "id": cmd.id}
    core.receive_data(reply(cmd, {"running": True}))
    assert cmd.done and cmd.result() == {"running": True} and woken.count == 1


def test_errors_map_to_the_error_tree() -> None:
    core = running_core()
    cmd = core.command("nope", waker=Woken())
    written(core)
    core.receive_data(json.dumps({"error": {"class": "CommandNotFound", "desc": "no"}, "id": cmd.id}).encode() + b"\n")
    with pytest.raises(CommandNotFound):
        cmd.result()


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1.0, 0, True, "5"])
def test_bad_timeouts_are_refused_before_anything_is_queued(timeout: Any) -> None:
    core = running_core()
    with pytest.raises(InvalidArgument, match="finite"):
        core.command("query-status", timeout=timeout, waker=Woken())
    assert not core.wants_write


def test_a_huge_finite_timeout_is_honoured() -> None:
    core = running_core()
    cmd = core.command("query-status", timeout=1e20, waker=Woken())
    assert cmd.timeout == 1e20 and cmd.deadline < float("inf")
    written(core)
    core.receive_data(reply(cmd))
    assert cmd.done


def test_a_command_abandoned_before_it_was_handed_out_is_never_sent() -> None:
    core = running_core()
    cmd = core.command("device_del", {"id": "x"}, waker=Woken())
    assert core.abandon(cmd)
    assert core.data_to_send() is None
    assert core.late_replies == 0


def test_a_command_abandoned_after_it_was_sent_has_its_late_reply_discarded() -> None:
    core = running_core()
    woken = Woken()
    cmd = core.command("slow", waker=woken)
    written(core)
    assert core.abandon(cmd) and core.late_replies == 1
    core.receive_data(reply(cmd))
    assert core.late_replies == 0 and woken.count == 0


def test_fds_are_duplicated_and_held_until_qemu_answers() -> None:
    core = running_core()
    with tempfile.TemporaryFile() as image:
        number = image.fileno()
        cmd = core.command("add-fd", fds=[number], waker=Woken())
        expected = os.fstat(number).st_ino
    # The caller's file is closed (its number free for reuse); what goes to QEMU is still that file.
    [(_, (dup,))] = written(core)
    assert dup != number
    assert os.fstat(dup).st_ino == expected and core.fds_held == 1
    core.receive_data(reply(cmd, {"fdset-id": 0, "fd": 5}))
    assert core.fds_held == 0
    with pytest.raises(OSError):
        os.fstat(dup)


def test_an_unpassable_fd_is_invalid_before_anything_is_queued() -> None:
    core = running_core()
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.close(read_end)
    with pytest.raises(InvalidArgument, match="cannot pass fd"):
        core.command("getfd", {"fdname": "x"}, fds=[read_end], waker=Woken())
    assert not core.wants_write and core.fds_held == 0


def test_the_fd_slot_is_held_until_the_reply_even_after_the_caller_gave_up() -> None:
    core = running_core()
    with tempfile.TemporaryFile() as one, tempfile.TemporaryFile() as two:
        first = core.command("add-fd", {"opaque": "one"}, fds=[one.fileno()], waker=Woken())
        second = core.command("add-fd", {"opaque": "two"}, fds=[two.fileno()], waker=Woken())
        plain = core.command("query-status", waker=Woken())
        chunks = written(core)
        # The first goes with its fds; the plain command may follow it; the second waits.
        assert [m["id"] for m in messages(chunks)] == [first.id, plain.id]
        assert len(chunks[0][1]) == 1
        assert core.abandon(first)  # the caller timed out: the slot stays taken
        assert written(core) == []
        assert core.abandon(second)  # timed out while waiting for the slot: never sent
        assert core.fds_held == 1  # only the sent command's duplicate
        core.receive_data(reply(first))
        assert core.fds_held == 0 and written(core) == []
        third = core.command("add-fd", {"opaque": "three"}, fds=[two.fileno()], waker=Woken())
        assert [m["arguments"]["opaque"] for m in messages(written(core))] == ["three"]
        assert not third.done


def test_a_partial_write_is_resumed_where_it_stopped_and_fds_go_once() -> None:
    core = running_core()
    with tempfile.TemporaryFile() as image:
        cmd = core.command("add-fd", {"opaque": "x" * 100}, fds=[image.fileno()], waker=Woken())
        data, fds = core.data_to_send() or (b"", ())
        assert fds
        core.bytes_sent(10)
        rest, rest_fds = core.data_to_send() or (b"", ())
        assert rest == data[10:] and rest_fds == ()
        core.bytes_sent(len(rest))
        assert core.data_to_send() is None
        core.receive_data(reply(cmd))


def test_an_interrupted_send_fails_every_caller_with_connection_lost() -> None:
    core = running_core()
    a = core.command("a", waker=Woken())
    b = core.command("b", waker=Woken())
    core.data_to_send()
    core.bytes_sent(5)
    core.send_interrupted()
    assert core.connection_state is ConnectionState.DISCONNECTED
    for cmd in (a, b):
        with pytest.raises(ConnectionLost, match="interrupted"):
            cmd.result()
    with pytest.raises(ConnectionLost):
        core.command("c", waker=Woken())


def test_an_interruption_with_nothing_in_flight_changes_nothing() -> None:
    core = running_core()
    core.send_interrupted()
    assert core.connection_state is ConnectionState.RUNNING


def test_a_too_deeply_nested_reply_fails_only_its_command() -> None:
    core = running_core()
    cmd = core.command("qom-get", waker=Woken())
    other = core.command("query-status", waker=Woken())
    written(core)
    deep = b"[" * 200_000 + b"]" * 200_000
    core.receive_data(b'{"return": ' + deep + b', "id": "' + cmd.id.encode() + b'"}\r\n' + reply(other))
    with pytest.raises(ProtocolError, match="nested too deeply"):
        cmd.result()
    assert other.result() == {} and core.connection_state is ConnectionState.RUNNING


def test_an_oversized_reply_fails_only_its_command() -> None:
    core = running_core(max_message_size=1024)
    cmd = core.command("query-qmp-schema", waker=Woken())
    written(core)
    core.receive_data(reply(cmd, ["x" * 5000]))
    with pytest.raises(MessageTooLarge):
        cmd.result()
    assert core.connection_state is ConnectionState.RUNNING


def test_garbage_fails_the_connection_and_every_waiter() -> None:
    core = running_core()
    cmd = core.command("query-status", waker=Woken())
    written(core)
    core.receive_data(b"garbage\r\n")
    assert core.connection_state is ConnectionState.DISCONNECTED
    with pytest.raises(ProtocolError, match="not JSON"):
        cmd.result()
    with pytest.raises(ConnectionLost, match="not JSON"):
        core.command("query-status", waker=Woken())


def test_the_connection_state_only_moves_forward() -> None:
    core = running_core()
    core.receive_data(b"")
    assert connection_state(core) is ConnectionState.DISCONNECTED
    core.close()
    assert connection_state(core) is ConnectionState.CLOSED
    core.fail(ConnectionLost, "again")
    assert core.connection_state is ConnectionState.CLOSED
    with pytest.raises(StateError, match="closed"):
        core.command("query-status", waker=Woken())


def test_a_match_that_raises_ends_only_its_own_subscription() -> None:
    core = running_core()

    def broken(event: Event) -> bool:
        raise ZeroDivisionError("user bug")

    bad = Sink(EventFilter(("STOP",), broken), maxsize=4, on_close=core.unsubscribe)
    good = Sink(EventFilter(("STOP",), None), maxsize=4, on_close=core.unsubscribe)
    core.subscribe(bad)
    core.subscribe(good)
    stop = b'{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 0}}\r\n'
    core.receive_data(stop + stop)
    assert len(good) == 2 and core.connection_state is ConnectionState.RUNNING
    with pytest.raises(EventMatchError) as info:
        bad._next(0, 1, 0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert bad not in core.subscriptions and good in core.subscriptions


# -- property: correlation under any interleaving ------------------------------------------

operations = st.lists(
    st.tuples(st.sampled_from(["command", "fd-command", "write", "reply", "abandon"]), st.integers(0, 50)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_every_reply_reaches_its_own_command_and_no_abandoned_unsent_command_is_sent(
    ops: list[tuple[str, int]],
) -> None:
    core = running_core()
    commands: list[Command] = []
    sent_ids: list[str] = []
    answered: set[str] = set()
    unsent_abandoned: set[str] = set()
    fd_in_flight: list[str] = []  # fd commands sent and not yet answered
    with tempfile.TemporaryFile() as image:
        for op, n in ops:
            if op in ("command", "fd-command"):
                passed = [image.fileno()] if op == "fd-command" else []
                commands.append(core.command(f"c{len(commands)}", fds=passed, waker=Woken()))
            elif op == "write":
                for data, fds in written(core):
                    ids = [json.loads(line)["id"] for line in data.splitlines()]
                    sent_ids.extend(ids)
                    if fds:
                        assert not fd_in_flight, "a second fd command went out before the first was answered"
                        fd_in_flight.append(ids[0])
            elif op == "reply":
                candidates = [i for i in sent_ids if i not in answered]
                if candidates:
                    target = candidates[n % len(candidates)]
                    answered.add(target)
                    if target in fd_in_flight:
                        fd_in_flight.remove(target)
                    core.receive_data(json.dumps({"return": target, "id": target}).encode() + b"\n")
            elif commands:
                cmd = commands[n % len(commands)]
                was_sent = cmd.sent
                if core.abandon(cmd) and not was_sent:
                    unsent_abandoned.add(cmd.id)
        for data, _ in written(core):
            sent_ids.extend(json.loads(line)["id"] for line in data.splitlines())
        assert not unsent_abandoned & set(sent_ids)
        assert len(sent_ids) == len(set(sent_ids))
        for cmd in commands:
            if cmd.id in answered and not cmd.abandoned:
                assert cmd.done and cmd.result() == cmd.id
        # Answer everything still out (fd commands go one answer at a time): nothing is held afterwards.
        unanswered = [i for i in sent_ids if i not in answered]
        while unanswered:
            for target in unanswered:
                core.receive_data(json.dumps({"return": target, "id": target}).encode() + b"\n")
            unanswered = [json.loads(line)["id"] for data, _ in written(core) for line in data.splitlines()]
        assert core.fds_held == 0 and core.late_replies == 0
        assert all(cmd.done or cmd.abandoned for cmd in commands)
