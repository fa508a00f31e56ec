"""The rules every relayed monitor (libvirtd, virsh) shares, on a go-between scripted in Python."""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence

import pytest

from vmctl.errors import (
    CommandNotFound,
    CommandTimeout,
    ConnectionLost,
    EventMatchError,
    EventTimeout,
    InvalidArgument,
    ProtocolError,
)
from vmctl.libvirt.relay import RelayedMonitor, event_from_relay
from vmctl.qmp import Event, QMPMonitor


class ScriptedRelay(RelayedMonitor):
    def __init__(self, *, max_fds: int = 0) -> None:
        super().__init__("vm1", max_fds=max_fds)
        self.sent: list[dict[str, object]] = []
        self.replies: dict[str, str] = {}
        self.hold = threading.Event()
        self.closed_relay = 0

    def _relay(self, message: str, fds: Sequence[int], timeout: float) -> str:
        command = json.loads(message)
        self.sent.append(command)
        if command["execute"] == "slow":
            self.hold.wait(5)
        return self.replies.get(str(command["execute"]), '{"return": {}}')

    def _close_relay(self) -> None:
        self.closed_relay += 1


def stop_event() -> Event:
    return event_from_relay("STOP", 1700000000, 250000, None)


def test_a_relayed_monitor_is_a_qmp_monitor_for_ops() -> None:
    monitor: QMPMonitor = ScriptedRelay()
    assert monitor.is_connected
    monitor.close()


def test_execute_sends_the_command_and_its_arguments_as_one_json_message_and_returns_the_return_value() -> None:
    relay = ScriptedRelay()
    relay.replies["query-status"] = '{"return": {"status": "running"}, "id": "libvirt-7"}'
    assert relay.execute("query-status") == {"status": "running"}
    relay.execute("stop", {"force": True})
    assert relay.sent == [{"execute": "query-status"}, {"execute": "stop", "arguments": {"force": True}}]


def test_human_sends_the_command_line_as_human_monitor_command_and_returns_its_text() -> None:
    relay = ScriptedRelay()
    relay.replies["human-monitor-command"] = '{"return": "VM status: running\\r\\n"}'
    assert relay.human("info status") == "VM status: running\r\n"
    assert relay.sent == [{"execute": "human-monitor-command", "arguments": {"command-line": "info status"}}]
    with pytest.raises(InvalidArgument, match="HMP"):
        relay.human(" ")


def test_qemus_error_reply_raises_the_same_typed_error_as_on_vmctls_own_socket() -> None:
    relay = ScriptedRelay()
    relay.replies["nope"] = '{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}'
    with pytest.raises(CommandNotFound, match="nope"):
        relay.execute("nope")


def test_a_reply_that_is_not_a_qmp_reply_is_a_protocol_error() -> None:
    relay = ScriptedRelay()
    relay.replies["a"] = "not json"
    relay.replies["b"] = "[1]"
    relay.replies["c"] = '{"id": 1}'
    for command in ("a", "b", "c"):
        with pytest.raises(ProtocolError):
            relay.execute(command)


def test_a_go_between_that_does_not_answer_gives_command_timeout_within_the_timeout() -> None:
    relay = ScriptedRelay()
    with pytest.raises(CommandTimeout, match="slow"):
        relay.execute("slow", timeout=0.05)
    relay.hold.set()
    assert relay.execute("query-status") == {}  # the monitor goes on


def test_out_of_band_commands_and_too_many_fds_are_refused_before_anything_is_sent() -> None:
    relay = ScriptedRelay(max_fds=1)
    with pytest.raises(InvalidArgument, match="out-of-band"):
        relay.execute("migrate-pause", oob=True)
    with pytest.raises(InvalidArgument, match="at most 1"):
        relay.execute("add-fd", fds=[0, 1])
    with pytest.raises(InvalidArgument, match="JSON"):
        relay.execute("x", {"bad": object()})
    assert relay.sent == []


def test_subscriptions_get_matching_events_and_a_match_that_raises_ends_only_its_own() -> None:
    relay = ScriptedRelay()

    def broken(event: Event) -> bool:
        raise RuntimeError("boom")

    with relay.events("STOP") as stops, relay.events(match=broken) as bad, relay.events("RESUME") as resumes:
        relay._deliver(stop_event())
        assert stops.get(1.0).timestamp == pytest.approx(1700000000.25)
        with pytest.raises(EventMatchError):
            bad.get(1.0)
        with pytest.raises(EventTimeout):
            resumes.get(0.01)


def test_event_callbacks_run_on_vmctls_callback_thread_not_on_the_delivering_thread() -> None:
    relay = ScriptedRelay()
    seen: list[str] = []
    done = threading.Event()

    def callback(event: Event) -> None:
        seen.append(threading.current_thread().name)
        done.set()

    relay.on_event(callback, "STOP")
    relay._deliver(stop_event())
    assert done.wait(5)
    assert seen == ["vmctl-callbacks"]
    relay.close()


def test_losing_the_go_between_fails_waiters_and_later_commands_with_connection_lost() -> None:
    relay = ScriptedRelay()
    notices: list[object] = []
    gone = threading.Event()

    def noticed(error: object) -> None:
        notices.append(error)
        gone.set()

    relay.on_disconnect(noticed)
    with relay.events("STOP") as stops:
        relay._lost(ConnectionLost("libvirtd went away"))
        with pytest.raises(ConnectionLost, match="went away"):
            stops.get(1.0)
    with pytest.raises(ConnectionLost):
        relay.execute("query-status")
    assert gone.wait(5)
    assert len(notices) == 1
    assert not relay.is_connected


def test_close_is_idempotent_releases_the_go_between_once_and_refuses_later_commands() -> None:
    relay = ScriptedRelay()
    with relay.events("STOP") as stops:
        relay.close()
        relay.close()
        with pytest.raises(ConnectionLost):
            stops.get(1.0)
    assert relay.closed_relay == 1
    with pytest.raises(ConnectionLost, match="closed"):
        relay.execute("query-status")


def test_version_and_supports_are_asked_once() -> None:
    relay = ScriptedRelay()
    relay.replies["query-version"] = json.dumps(
        {"return": {"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}}
    )
    relay.replies["query-commands"] = '{"return": [{"name": "query-status"}]}'
    assert (relay.version.major, relay.version.minor) == (10, 0)
    assert relay.supports("query-status")
    assert not relay.supports("nope")
    relay.version  # noqa: B018
    assert [c["execute"] for c in relay.sent] == ["query-version", "query-commands"]


def test_event_from_relay_reads_the_data_json_and_an_empty_detail() -> None:
    event = event_from_relay("DEVICE_DELETED", 5, 10, '{"device": "ua-d1", "path": "/x"}')
    assert event.data == {"device": "ua-d1", "path": "/x"}
    assert event_from_relay("STOP", 5, 0, None).data == {}
