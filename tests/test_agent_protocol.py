"""The guest agent's protocol core (sans I/O) and its blocking client against a scripted agent."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmctl.agent.client import AgentClient
from vmctl.agent.guest import GuestAgent
from vmctl.agent.protocol import NEED_DATA, AgentProtocol, AgentReply, AgentState, Synced
from vmctl.errors import AgentCommandError, AgentError, AgentTimeout, AgentUnavailable, InvalidArgument, StateError
from vmctl.model.agent import FreezeStatus


def sync_token(sent: bytes) -> int:
    assert sent.startswith(b"\xff")
    return int(json.loads(sent[1:])["arguments"]["id"])


def synced() -> AgentProtocol:
    protocol = AgentProtocol()
    token = sync_token(protocol.start_sync())
    protocol.receive_data(b'\xff{"return": %d}\n' % token)
    assert protocol.next_event() == Synced()
    return protocol


# Anything the stream may hold before the answer: old replies, half lines, the agent's parse
# error for our own 0xFF. JSON text never holds 0xFF, so neither does this.
stale = st.binary(max_size=300).map(lambda b: b.replace(b"\xff", b""))


@given(before=stale, chunk=st.integers(min_value=1, max_value=64))
def test_sync_ignores_whatever_came_before_the_agents_delimiter(before: bytes, chunk: int) -> None:
    protocol = AgentProtocol()
    token = sync_token(protocol.start_sync())
    stream = before + b'\n\xff{"return": %d}\n' % (token + 1)  # an older sync's answer
    stream += b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}\n'
    stream += b'\xff{"return": %d}\n' % token
    for start in range(0, len(stream), chunk):
        protocol.receive_data(stream[start : start + chunk])
    assert protocol.next_event() == Synced()
    assert protocol.next_event() is NEED_DATA
    assert protocol.state is AgentState.READY


def test_a_token_without_the_delimiter_before_it_is_not_the_answer() -> None:
    protocol = AgentProtocol()
    token = sync_token(protocol.start_sync())
    protocol.receive_data(b'{"return": %d}\n' % token)
    assert protocol.next_event() is NEED_DATA
    assert protocol.state is AgentState.SYNCING


@given(chunk=st.integers(min_value=1, max_value=40))
def test_a_reply_is_matched_by_its_id_and_stale_ones_are_dropped(chunk: int) -> None:
    protocol = synced()
    sent = json.loads(protocol.send_command("guest-info"))
    stream = b'{"return": {"old": true}}\n{"return": 1, "id": "vmctl-agent-0"}\n'
    stream += json.dumps({"return": {"version": "7.2"}, "id": sent["id"]}).encode() + b"\n"
    for start in range(0, len(stream), chunk):
        protocol.receive_data(stream[start : start + chunk])
    assert protocol.next_event() == AgentReply(command="guest-info", value={"version": "7.2"})
    assert protocol.stale_replies == 2
    assert protocol.state is AgentState.READY


def test_an_error_reply_is_a_typed_agent_command_error() -> None:
    protocol = synced()
    sent = json.loads(protocol.send_command("guest-exec", {"path": "nope"}))
    error = {"class": "GenericError", "desc": "Failed to execute child process"}
    protocol.receive_data(json.dumps({"error": error, "id": sent["id"]}).encode() + b"\n")
    reply = protocol.next_event()
    assert isinstance(reply, AgentReply) and isinstance(reply.error, AgentCommandError)
    assert (reply.error.error_class, reply.error.desc) == ("GenericError", "Failed to execute child process")


def test_an_oversized_reply_fails_its_command_only() -> None:
    protocol = AgentProtocol(max_message_size=1024)
    token = sync_token(protocol.start_sync())
    protocol.receive_data(b'\xff{"return": %d}\n' % token)
    assert protocol.next_event() == Synced()
    sent = json.loads(protocol.send_command("guest-exec-status", {"pid": 1}))
    protocol.receive_data(b'{"return": {"out-data": "' + b"A" * 4000 + b'"}, "id": "' + sent["id"].encode() + b'"}\n')
    reply = protocol.next_event()
    assert isinstance(reply, AgentReply) and isinstance(reply.error, AgentError)
    assert "over the 1024-byte limit" in str(reply.error)
    assert protocol.state is AgentState.READY


def test_commands_wait_for_the_sync_and_bad_input_is_refused_before_anything_is_sent() -> None:
    protocol = AgentProtocol()
    with pytest.raises(StateError):
        protocol.send_command("guest-ping")
    protocol = synced()
    with pytest.raises(InvalidArgument):
        protocol.send_command("guest-exec", {"path": float("nan")})
    with pytest.raises(InvalidArgument):
        protocol.send_command("")
    assert protocol.state is AgentState.READY


class ScriptedAgent:
    """A unix socket server that answers like qemu-ga (0xFF + token for a sync), with ``answer``
    deciding the rest; ``None`` sends nothing (a hung agent)."""

    def __init__(self, path: Path, answer: Callable[[dict[str, Any]], Any]) -> None:
        self.path = path
        self.answer = answer
        self.connections = 0
        self.commands: list[str] = []
        self._server = socket.socket(socket.AF_UNIX)
        self._server.bind(str(path))
        self._server.listen(1)
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                buffer = b""
                while True:
                    data = conn.recv(65536)
                    if not data:
                        break
                    buffer += data.replace(b"\xff", b"")
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        request = json.loads(line)
                        self.commands.append(request["execute"])
                        if request["execute"] == "guest-sync-delimited":
                            conn.sendall(b'\xff{"return": %d}\n' % request["arguments"]["id"])
                            continue
                        value = self.answer(request)
                        if value is not None:
                            conn.sendall(json.dumps({**value, "id": request.get("id")}).encode() + b"\n")

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def agent_socket(tmp_path: Path) -> Iterator[Callable[[Callable[[dict[str, Any]], Any]], ScriptedAgent]]:
    agents: list[ScriptedAgent] = []

    def start(answer: Callable[[dict[str, Any]], Any]) -> ScriptedAgent:
        agents.append(ScriptedAgent(tmp_path / f"agent{len(agents)}.sock", answer))
        return agents[-1]

    yield start
    for agent in agents:
        agent.close()


def test_each_call_connects_synchronises_and_returns_the_agents_value(agent_socket: Any) -> None:
    agent = agent_socket(lambda request: {"return": "frozen"})
    guest = GuestAgent(AgentClient(agent.path, name="vm1"))
    assert guest.fsfreeze_status() is FreezeStatus.FROZEN
    assert guest.fsfreeze_status() is FreezeStatus.FROZEN
    assert agent.connections == 2
    assert agent.commands == ["guest-sync-delimited", "guest-fsfreeze-status"] * 2


def test_a_silent_agent_is_an_agent_timeout_within_the_timeout(agent_socket: Any) -> None:
    agent = agent_socket(lambda request: None)
    client = AgentClient(agent.path, name="vm1")
    with pytest.raises(AgentTimeout, match="did not answer guest-ping"):
        client.execute("guest-ping", timeout=0.3)


def test_a_closed_port_is_unavailable_before_connecting(agent_socket: Any) -> None:
    agent = agent_socket(lambda request: {"return": {}})
    client = AgentClient(agent.path, name="vm1", port_open=lambda: False)
    with pytest.raises(AgentUnavailable, match="has not opened the agent's port"):
        client.execute("guest-ping", timeout=30)
    assert agent.connections == 0


def test_a_port_closing_while_a_command_waits_ends_the_wait_at_once(agent_socket: Any) -> None:
    agent = agent_socket(lambda request: None)
    closed_at = time.monotonic() + 0.3
    client = AgentClient(agent.path, name="vm1", port_open=lambda: time.monotonic() < closed_at)
    with pytest.raises(AgentUnavailable, match="closed the agent's port while guest-ping was pending"):
        client.execute("guest-ping", timeout=60)


def test_no_socket_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(AgentUnavailable, match="does not answer"):
        AgentClient(tmp_path / "none.sock", name="vm1").execute("guest-ping")


def test_frozen_thaws_when_the_body_raises(agent_socket: Any) -> None:
    agent = agent_socket(lambda request: {"return": 2})
    guest = GuestAgent(AgentClient(agent.path, name="vm1"))
    with pytest.raises(KeyError), guest.frozen() as count:
        assert count == 2
        raise KeyError("body")
    assert [c for c in agent.commands if c != "guest-sync-delimited"] == [
        "guest-fsfreeze-freeze",
        "guest-fsfreeze-thaw",
    ]


def test_a_freeze_that_timed_out_is_thawed_all_the_same(agent_socket: Any) -> None:
    agent = agent_socket(lambda request: None if request["execute"] == "guest-fsfreeze-freeze" else {"return": 1})
    guest = GuestAgent(AgentClient(agent.path, name="vm1", timeout=2))
    with pytest.raises(AgentTimeout), guest.frozen(timeout=0.3):
        pytest.fail("the body must not run")
    assert agent.commands[-1] == "guest-fsfreeze-thaw"


def test_shutdown_is_sent_and_an_error_within_the_grace_is_raised(agent_socket: Any) -> None:
    failing = agent_socket(lambda request: {"error": {"class": "GenericError", "desc": "child process has failed"}})
    with pytest.raises(AgentCommandError, match="child process has failed"):
        GuestAgent(AgentClient(failing.path, name="vm1")).shutdown()
    silent = agent_socket(lambda request: None)  # qemu-ga answers a shutdown that works with nothing
    GuestAgent(AgentClient(silent.path, name="vm1")).shutdown("reboot", timeout=0.5)
    assert silent.commands[-1] == "guest-shutdown"


def test_exec_polls_until_the_command_exits_and_decodes_its_output(agent_socket: Any) -> None:
    polls = []

    def answer(request: dict[str, Any]) -> Any:
        if request["execute"] == "guest-exec":
            assert request["arguments"] == {"path": "cat", "arg": [], "capture-output": True, "input-data": "aGk="}
            return {"return": {"pid": 42}}
        polls.append(request)
        if len(polls) < 3:
            return {"return": {"exited": False}}
        return {"return": {"exited": True, "exitcode": 0, "out-data": "aGk="}}

    agent = agent_socket(answer)
    result = GuestAgent(AgentClient(agent.path, name="vm1")).exec(["cat"], input=b"hi")
    assert (result.exit_code, result.stdout, result.stderr) == (0, b"hi", b"")
    assert agent.connections == 1  # a short command ends on the connection it began on


@pytest.mark.parametrize("argv", ["ls -l", [], [b"ls"], ["ls", 3]])
def test_exec_refuses_bad_argv_before_anything_is_sent(agent_socket: Any, argv: Any) -> None:
    agent = agent_socket(lambda request: {"return": {}})
    with pytest.raises(InvalidArgument):
        GuestAgent(AgentClient(agent.path, name="vm1")).exec(argv)
    assert agent.connections == 0


def test_socket_paths_too_long_for_unix_sockets_are_refused(tmp_path: Path) -> None:
    long = tmp_path / ("x" * 120)
    with pytest.raises(InvalidArgument):
        AgentClient(long, name="vm1").execute("guest-ping")
    assert not os.path.exists(long)
