"""The threaded face under timeouts, load and odd input: the rules the core owns, seen through it."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest

from vmctl.errors import CommandTimeout, ConnectionLost, EventMatchError, InvalidArgument, ProtocolError
from vmctl.qmp import ConnectionState, Monitor, connect
from vmctl.qmp.messages import Event
from vmctl.qmp.monitor import Monitor as MonitorClass
from vmctl.qmp.protocol import QMPProtocol
from vmctl.qmp.stream import MemoryStream
from vmctl.qmp.timeouts import TimeoutPolicy, deadline
from vmctl.testing import FakeQEMU


def test_an_fd_command_that_times_out_waiting_for_the_fd_slot_is_never_sent(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("add-fd", delay=0.6)  # QEMU answers the first one late: the fd slot stays taken
    with tempfile.TemporaryFile() as one, tempfile.TemporaryFile() as two:
        one.write(b"one")
        one.flush()
        with pytest.raises(CommandTimeout):
            monitor.execute("add-fd", {"opaque": "one"}, fds=[one], timeout=0.1)
        with pytest.raises(CommandTimeout):
            monitor.execute("add-fd", {"opaque": "two"}, fds=[two], timeout=0.1)
        assert monitor.fds_held == 1  # the sent one's duplicate only
    with tempfile.TemporaryFile():  # likely takes the closed files' numbers
        deadline = time.monotonic() + 5
        while monitor.late_replies and time.monotonic() < deadline:
            monitor.execute("query-status")
    assert [c.arguments["opaque"] for c in fake.calls_of("add-fd")] == ["one"]
    [(_, held)] = fake.fdsets[0]
    assert os.pread(held, 3, 0) == b"one"
    assert monitor.fds_held == 0


def test_the_fd_slot_frees_on_the_late_reply_and_the_next_fd_command_goes(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("add-fd", delay=0.3)
    with tempfile.TemporaryFile() as one, tempfile.TemporaryFile() as three:
        three.write(b"three")
        three.flush()
        with pytest.raises(CommandTimeout):
            monitor.execute("add-fd", {"opaque": "one"}, fds=[one], timeout=0.05)
        # Waits for the slot (the late reply), then goes with its own file.
        assert monitor.execute("add-fd", {"opaque": "three"}, fds=[three], timeout=5)["fdset-id"] == 1
    [(_, held)] = fake.fdsets[1]
    assert os.pread(held, 5, 0) == b"three"


def test_a_match_that_raises_ends_its_subscription_and_the_reader_carries_on(monitor: Monitor, fake: FakeQEMU) -> None:
    def broken(event: Event) -> bool:
        raise RuntimeError("user bug")

    with monitor.events("STOP", match=broken) as bad, monitor.events("STOP") as good:
        monitor.execute("stop")
        assert good.get(timeout=5).name == "STOP"
        with pytest.raises(EventMatchError) as info:
            bad.get(timeout=5)
        assert isinstance(info.value.__cause__, RuntimeError)
    assert monitor.execute("query-status", timeout=5)["status"] == "paused"
    assert monitor.is_connected


def test_an_on_event_match_that_raises_leaves_the_other_callbacks_running(monitor: Monitor, fake: FakeQEMU) -> None:
    seen: list[str] = []
    got = threading.Event()

    def broken(event: Event) -> bool:
        raise RuntimeError("user bug")

    def record(event: Event) -> None:
        seen.append(event.name)
        got.set()

    monitor.on_event(lambda event: seen.append("never"), "STOP", match=broken)
    monitor.on_event(record, "STOP")
    monitor.execute("stop")
    assert got.wait(5)
    assert seen == ["STOP"]


def test_one_callers_short_deadline_does_not_fail_anothers_send(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("echo", lambda call: len(call.arguments["pad"]))
    fake.freeze()  # QEMU stops reading: the socket buffers fill
    results: dict[str, Any] = {}

    def call(key: str, pad: int, timeout: float) -> None:
        try:
            results[key] = monitor.execute("echo", {"pad": "x" * pad}, timeout=timeout)
        except BaseException as exc:
            results[key] = exc

    short = threading.Thread(target=call, args=("short", 4 * 2**20, 0.2))
    short.start()
    time.sleep(0.05)
    patient = threading.Thread(target=call, args=("patient", 10, 20))
    patient.start()
    short.join(5)
    time.sleep(0.2)
    fake.thaw()
    patient.join(10)
    assert isinstance(results["short"], CommandTimeout)
    assert results["patient"] == 10
    assert monitor.execute("query-status")["running"]
    # The short caller's bytes were all sent in the end: QEMU ran it, its reply was discarded.
    assert [len(c.arguments["pad"]) for c in fake.calls_of("echo")] == [4 * 2**20, 10]


@pytest.mark.parametrize("timeout", [float("inf"), float("-inf"), float("nan"), -1, 0, True])
def test_a_non_finite_or_non_positive_timeout_is_refused_before_sending(
    monitor: Monitor, fake: FakeQEMU, timeout: Any
) -> None:
    with pytest.raises(InvalidArgument, match="finite"):
        monitor.execute("device_del", {"id": "x"}, timeout=timeout)
    assert fake.calls_of("device_del") == []
    assert monitor.execute("query-status")["running"]


def test_a_huge_finite_timeout_is_honoured(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("slow", lambda call: "done", delay=0.1)
    assert monitor.execute("slow", timeout=1e20) == "done"
    with monitor.events("STOP") as stopped:
        monitor.execute("stop", timeout=1e300)
        assert stopped.get(timeout=1e20).name == "STOP"


class _Interrupted(Exception):
    pass


@pytest.fixture
def alarm() -> Iterator[None]:
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise _Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_send_interrupted_midway_fails_the_connection_for_every_caller(
    monitor: Monitor, fake: FakeQEMU, alarm: None
) -> None:
    fake.on("hang", fault="no_reply")
    other: list[BaseException | None] = []
    waiter = threading.Thread(target=lambda: other.append(_raised(lambda: monitor.execute("hang", timeout=20))))
    waiter.start()
    time.sleep(0.05)
    fake.freeze()
    signal.setitimer(signal.ITIMER_REAL, 0.3)  # fires while the big command is half written
    with pytest.raises(_Interrupted):
        monitor.execute("echo", {"pad": "x" * 8 * 2**20}, timeout=20)
    waiter.join(5)
    assert isinstance(other[0], ConnectionLost)
    with pytest.raises(ConnectionLost, match="interrupted"):
        monitor.execute("query-status")
    fake.thaw()
    assert fake.calls_of("echo") == []  # QEMU never parsed half a command as one


def test_a_too_deeply_nested_reply_fails_only_its_command(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("qom-get", fault="deeply_nested")
    with pytest.raises(ProtocolError, match="nested too deeply"):
        monitor.execute("qom-get", {"path": "/", "property": "x"}, timeout=10)
    assert monitor.execute("query-status")["running"]


def test_an_event_right_after_a_command_is_read_by_the_thread_waiting_for_it(fake: FakeQEMU) -> None:
    # The reply and the event go out together; the caller reads the reply and hands the pump back.
    # The event must then be read by whoever waits for it (here: this thread, in get()).
    def trigger(call: Any) -> None:
        threading.Timer(0.002, fake.emit_event, ("LATER",)).start()

    fake.on("trigger", trigger)
    readers: list[str] = []

    def note_reader(event: Event) -> bool:
        readers.append(threading.current_thread().name)
        return True

    with connect(fake.address, timeout=5) as mon:
        for _ in range(5):
            with mon.events("LATER", match=note_reader) as later:
                mon.execute("trigger")
                assert later.get(timeout=5).name == "LATER"
    assert threading.current_thread().name in readers


def test_the_memory_stream_pair_drives_the_threaded_face() -> None:
    ours, theirs = MemoryStream.pair()
    served = threading.Event()

    def qemu() -> None:
        theirs.send(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}}, "capabilities": []}}\n')
        buffer = b""
        while not served.is_set():
            try:
                data = theirs.recv(65536)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                command_id = line.split(b'"id":"')[1].split(b'"')[0]
                theirs.send(b'{"return": {"ok": true}, "id": "' + command_id + b'"}\n')

    server = threading.Thread(target=qemu, daemon=True)
    server.start()
    monitor = MonitorClass(ours, QMPProtocol(name="memory"))
    try:
        monitor._handshake(5)
        assert monitor.connection_state is ConnectionState.RUNNING and str(monitor.version) == "10.0.0"
        assert monitor.execute("query-status") == {"ok": True}
    finally:
        served.set()
        monitor.close()
        server.join(5)
        theirs.close()


def _raised(fn: Any) -> BaseException | None:
    try:
        fn()
    except BaseException as exc:
        return exc
    return None


def test_the_waiter_consumes_every_wake_up_so_a_later_one_never_double_releases() -> None:
    from vmctl.qmp.waiter import Waiter as _Waiter

    monitor_lock = threading.Lock()
    waiter = _Waiter()
    waiter.wake()
    waiter.wait(monitor_lock, 0.001)  # woken before it had a semaphore: returns at once
    waiter.wait(monitor_lock, 0.001)  # arms its semaphore, times out
    waiter.wake()
    waiter.wait(monitor_lock, 1.0)  # consumes the wake-up
    waiter.wake()  # once raised "release unlocked lock": the previous wake-up was never consumed
    started = time.monotonic()
    waiter.wait(monitor_lock, 1.0)
    assert time.monotonic() - started < 0.5


def test_a_deadline_is_the_clock_plus_the_timeout_and_a_huge_timeout_stays_a_finite_time_ahead() -> None:
    assert deadline(2.5, now=10.0) == 12.5
    far = deadline(1e300, now=10.0)
    assert far == 10.0 + 1e9 and far - 10.0 > 0  # the clock's digits are kept: a wait can count down


def test_the_timeout_policy_gives_the_callers_timeout_when_given_else_the_commands_kind() -> None:
    policy = TimeoutPolicy(default=30.0, rules={"query-*": 10.0})
    assert policy.for_command("query-status") == 10.0
    assert policy.for_command("query-status", 2) == 2.0
    assert policy.for_command("device_add") == 30.0
    for invalid in (0, -1, float("inf"), float("nan"), True):
        with pytest.raises(InvalidArgument, match="timeout"):
            policy.for_command("query-status", invalid)
