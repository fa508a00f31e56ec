from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from typing import Any

import pytest

from vmctl.errors import (
    CommandNotFound,
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    DeviceNotFound,
    GenericError,
    InvalidArgument,
    MessageTooLarge,
    ProtocolError,
    StateError,
    VmctlError,
)
from vmctl.qmp import Monitor, TimeoutPolicy, connect
from vmctl.testing import FakeCall, FakeQEMU


def test_execute_returns_qemus_value(monitor: Monitor, fake: FakeQEMU) -> None:
    assert monitor.execute("query-status") == {"status": "running", "singlestep": False, "running": True}
    assert monitor.capabilities == ("oob",)
    assert fake.negotiated_capabilities == ["oob"]
    assert str(monitor.version) == "7.2.0"


def test_no_oob_when_not_offered() -> None:
    with FakeQEMU(capabilities=()) as fake, connect(fake.address, timeout=5) as mon:
        assert mon.capabilities == ()
        assert fake.negotiated_capabilities == []
        assert mon.execute("query-status")["running"] is True


def test_errors_are_mapped_from_qemus_class(monitor: Monitor, fake: FakeQEMU) -> None:
    with pytest.raises(CommandNotFound, match="has not been found"):
        monitor.execute("no-such-command")
    fake.on("device_del", error=("DeviceNotFound", "Device 'disk9' not found"))
    with pytest.raises(DeviceNotFound) as info:
        monitor.execute("device_del", {"id": "disk9"})
    assert info.value.error_class == "DeviceNotFound"
    assert info.value.desc == "Device 'disk9' not found"
    assert isinstance(info.value, VmctlError)
    fake.on("weird", error=("SomethingNew", "new class"))
    with pytest.raises(Exception) as unknown:
        monitor.execute("weird")
    assert type(unknown.value).__name__ == "CommandError"
    # The monitor is fine after errors.
    assert monitor.execute("query-status")["running"]


def test_pipelined_threads_get_their_own_replies(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("echo", lambda call: call.arguments["n"])
    results: dict[int, list[Any]] = {}

    def worker(thread: int) -> None:
        results[thread] = [monitor.execute("echo", {"n": thread * 1000 + i}) for i in range(200)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for thread in range(8):
        assert results[thread] == [thread * 1000 + i for i in range(200)]


def test_out_of_order_replies_reach_the_right_callers(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("slow", lambda call: "slow", delay=0.3)
    fake.on("fast", lambda call: "fast")
    slow_result: list[Any] = []
    slow = threading.Thread(target=lambda: slow_result.append(monitor.execute("slow")))
    slow.start()
    time.sleep(0.05)
    assert monitor.execute("fast") == "fast"
    slow.join(5)
    assert slow_result == ["slow"]


def test_timeout_says_outcome_unknown_and_late_reply_is_discarded(monitor: Monitor, fake: FakeQEMU) -> None:
    release, answered = threading.Event(), threading.Event()

    def slow(call: FakeCall) -> str:  # answers once the test lets it (or gives up after 10 s)
        release.wait(10)
        answered.set()
        return "late"

    fake.on("slow", slow)
    try:
        with pytest.raises(CommandTimeout, match="outcome is unknown") as info:
            monitor.execute("slow", timeout=0.1)
        assert not answered.is_set()  # the caller's own clock ended it, before any reply
    finally:
        release.set()
    assert isinstance(info.value, TimeoutError)
    # The late reply goes out before the fake even reads the next command, so it reaches the
    # monitor first: dropped, not taken for this command's.
    assert monitor.late_replies == 1
    assert monitor.execute("query-status")["running"]
    assert monitor.late_replies == 0


def test_frozen_qemu_times_out_then_recovers(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.freeze()
    with pytest.raises(CommandTimeout):
        monitor.execute("query-status", timeout=0.2)
    fake.thaw()
    assert monitor.execute("query-status", timeout=5)["running"]


def test_default_timeouts_come_from_the_policy(fake: FakeQEMU) -> None:
    fake.on("slow", lambda call: 1, delay=1.0)
    policy = TimeoutPolicy().with_rules({"slow": 0.1})
    with connect(fake.address, timeout=5, timeouts=policy) as mon, pytest.raises(CommandTimeout, match=r"within 0.1s"):
        mon.execute("slow")


@pytest.mark.parametrize("timeout", [0, -1, "1"])
def test_bad_timeouts_are_rejected(monitor: Monitor, timeout: Any) -> None:
    with pytest.raises(InvalidArgument):
        monitor.execute("query-status", timeout=timeout)


def test_connection_loss_fails_pending_and_later_calls_before_their_timeouts(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("hang", fault="no_reply")
    errors: list[BaseException] = []

    def waiter() -> None:
        try:
            monitor.execute("hang", timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=waiter, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while len(fake.calls_of("hang")) < 3:  # all three are pending in the fake
        assert time.monotonic() < deadline, fake.calls
        time.sleep(0.005)
    fake.disconnect()
    # The loss ends the waits, not their 30 s timeouts (how fast is a figure for bench/, not a test).
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert len(errors) == 3 and all(isinstance(e, ConnectionLost) for e in errors)
    assert all("outcome is unknown" in str(e) for e in errors)  # each had been sent
    # A later call fails at once: had it been sent and waited for, it would end in a CommandTimeout.
    with pytest.raises(ConnectionLost):
        monitor.execute("query-status", timeout=30)
    assert not monitor.is_connected


def test_close_mid_reply_is_a_protocol_error(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("query-status", fault="close_mid_reply")
    with pytest.raises(ProtocolError, match="middle of a message"):
        monitor.execute("query-status", timeout=5)
    with pytest.raises(ConnectionLost):
        monitor.execute("query-version")


def test_garbage_fails_the_connection_clearly(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("query-status", fault="garbage")
    with pytest.raises(ProtocolError, match="not JSON"):
        monitor.execute("query-status", timeout=5)
    with pytest.raises(ConnectionLost, match="not JSON"):
        monitor.execute("query-version")


def test_oversized_reply_fails_only_its_command(fake: FakeQEMU) -> None:
    fake.on("huge", fault="oversized", oversized_bytes=200_000)
    fake.on("echo", lambda call: call.arguments["n"], delay=0.05)
    with connect(fake.address, timeout=5, max_message_size=64 * 1024) as mon:
        result: list[Any] = []
        other = threading.Thread(target=lambda: result.append(mon.execute("echo", {"n": 5})))
        other.start()
        with pytest.raises(MessageTooLarge, match="over the 65536-byte limit") as info:
            mon.execute("huge")
        assert info.value.size > 200_000
        other.join(5)
        assert result == [5]
        assert mon.execute("query-status")["running"]


def test_fds_travel_with_their_command(monitor: Monitor, fake: FakeQEMU) -> None:
    with tempfile.TemporaryFile() as image:
        image.write(b"hello")
        image.flush()
        monitor.execute("query-status")
        reply = monitor.execute("add-fd", {"opaque": "disk1"}, fds=[image])
    assert reply["fdset-id"] == 0
    (call,) = fake.calls_of("add-fd")
    assert len(call.fds) == 1
    fdset_fd = fake.fdsets[0][0][1]
    assert os.pread(fdset_fd, 5, 0) == b"hello"
    assert monitor.execute("query-fdsets") == [{"fdset-id": 0, "fds": [{"fd": reply["fd"], "opaque": "disk1"}]}]
    read_end, write_end = os.pipe()
    try:
        monitor.execute("getfd", {"fdname": "tap0"}, fds=[write_end])
    finally:
        os.close(read_end)
        os.close(write_end)
    assert "tap0" in fake.named_fds
    monitor.execute("closefd", {"fdname": "tap0"})
    with pytest.raises(GenericError):
        monitor.execute("closefd", {"fdname": "tap0"})


def test_bad_fds_are_rejected_before_sending(monitor: Monitor, fake: FakeQEMU) -> None:
    with pytest.raises(InvalidArgument):
        monitor.execute("add-fd", fds=[-1])
    with pytest.raises(InvalidArgument):
        monitor.execute("add-fd", fds=["3"])  # type: ignore[list-item]
    assert fake.calls_of("add-fd") == []


def test_human_monitor_command(monitor: Monitor) -> None:
    assert monitor.human("info status") == "fake: info status\r\n"
    with pytest.raises(InvalidArgument):
        monitor.human("  ")


def test_supports_and_schema_are_cached(monitor: Monitor, fake: FakeQEMU) -> None:
    assert monitor.supports("add-fd")
    assert not monitor.supports("blockdev-teleport")
    assert len(fake.calls_of("query-commands")) == 1
    assert monitor.schema.has_argument("device_add", "driver")
    assert not monitor.schema.has_argument("device_add", "teleport")
    assert monitor.schema is monitor.schema
    assert len(fake.calls_of("query-qmp-schema")) == 1


def test_close_is_idempotent_and_later_calls_fail_clearly(fake: FakeQEMU) -> None:
    mon = connect(fake.address, timeout=5)
    mon.close()
    mon.close()
    with pytest.raises(StateError, match="closed"):
        mon.execute("query-status")
    with pytest.raises(StateError):
        mon.events("STOP")


def test_close_fails_pending_commands(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("hang", fault="no_reply")
    errors: list[BaseException | None] = []
    thread = threading.Thread(target=lambda: errors.append(_catch(lambda: monitor.execute("hang", timeout=30))))
    thread.start()
    time.sleep(0.1)
    monitor.close()
    thread.join(5)
    assert isinstance(errors[0], ConnectionLost)


def _catch(fn: Any) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def test_connect_retries_until_the_socket_appears() -> None:
    fake = FakeQEMU()
    timer = threading.Timer(0.3, fake.serve)
    timer.start()
    try:
        started = time.monotonic()
        with connect(fake.address, timeout=5) as mon:
            assert mon.execute("query-status")["running"]
        assert time.monotonic() - started >= 0.25
    finally:
        timer.join()
        fake.close()


def test_connect_gives_up_at_the_deadline(tmp_path: Any) -> None:
    started = time.monotonic()
    with pytest.raises(ConnectError, match="cannot connect"):
        connect(str(tmp_path / "nothing.sock"), timeout=0.3)
    assert time.monotonic() - started < 2


def test_connect_to_a_silent_server_times_out(tmp_path: Any) -> None:
    path = str(tmp_path / "silent.sock")
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(path)
        server.listen(1)
        started = time.monotonic()
        with pytest.raises(ConnectError, match="greeting"):
            connect(path, timeout=0.3)
        assert time.monotonic() - started < 2


def test_connect_rejects_a_bad_greeting() -> None:
    with (
        FakeQEMU(greeting=b"hello there\r\n") as fake,
        pytest.raises(ConnectError, match=r"invalid QMP greeting.*not JSON"),
    ):
        connect(fake.address, timeout=2)


@pytest.mark.parametrize("address", [42, ("host",), "x" * 200])
def test_connect_rejects_bad_addresses(address: Any) -> None:
    with pytest.raises(InvalidArgument):
        connect(address, timeout=1)


def test_connect_over_an_existing_socket() -> None:
    with FakeQEMU() as fake, connect(fake.client_socket(), timeout=5, name="pair") as mon:
        assert mon.name == "pair"
        assert mon.execute("query-status")["running"]


def test_commands_before_negotiation_are_impossible(fake: FakeQEMU) -> None:
    with connect(fake.address, timeout=5) as mon:
        assert mon.execute("query-status")
    first = fake.calls[0]
    assert isinstance(first, FakeCall) and first.command == "qmp_capabilities"


def test_concurrent_fd_passing_keeps_each_fd_with_its_command(monitor: Monitor, fake: FakeQEMU) -> None:
    failures: list[BaseException] = []

    def worker(thread: int) -> None:
        try:
            for i in range(20):
                with tempfile.TemporaryFile() as f:
                    f.write(f"{thread}-{i}".encode())
                    f.flush()
                    monitor.execute("query-status")
                    monitor.execute("add-fd", {"fdset-id": thread * 100 + i}, fds=[f])
                    monitor.execute("query-status")
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not failures
    assert len(fake.fdsets) == 160
    for fdset_id, [(_, fd)] in fake.fdsets.items():
        assert os.pread(fd, 16, 0).decode() == f"{fdset_id // 100}-{fdset_id % 100}"
