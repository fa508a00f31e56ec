from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from vmctl.errors import ConnectionLost, EventTimeout, InvalidArgument, QMPError
from vmctl.qmp import Event, Monitor, connect, data_contains
from vmctl.testing import FakeQEMU


def test_subscribe_before_the_command_catches_an_event_sent_before_the_reply(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.on("device_del", returns={}, events_before_reply=(("DEVICE_DELETED", {"device": "disk1", "path": "/x"}),))
    with monitor.events("DEVICE_DELETED", match={"device": "disk1"}) as sub:
        monitor.execute("device_del", {"id": "disk1"})
        event = sub.get(timeout=2)
    assert event.name == "DEVICE_DELETED"
    assert event.data == {"device": "disk1", "path": "/x"}
    assert event.timestamp == pytest.approx(time.time(), abs=5)


def test_match_by_subset_and_by_predicate(monitor: Monitor, fake: FakeQEMU) -> None:
    with (
        monitor.events("DEVICE_DELETED", match={"device": "disk2"}) as by_subset,
        monitor.events(match=lambda e: e.name.startswith("BLOCK_")) as by_predicate,
        monitor.events() as everything,
    ):
        fake.emit_event("DEVICE_DELETED", {"path": "/machine/peripheral/disk1/virtio-backend"})
        fake.emit_event("DEVICE_DELETED", {"device": "disk1", "path": "/p/disk1"})
        fake.emit_event("BLOCK_JOB_READY", {"device": "job0"})
        fake.emit_event("DEVICE_DELETED", {"device": "disk2", "path": "/p/disk2"})
        assert by_subset.get(2).data["device"] == "disk2"
        assert by_predicate.get(2).name == "BLOCK_JOB_READY"
        names = [everything.get(2).name for _ in range(4)]
    assert names == ["DEVICE_DELETED", "DEVICE_DELETED", "BLOCK_JOB_READY", "DEVICE_DELETED"]
    assert by_subset.get_nowait() is None


def test_nested_subset_match() -> None:
    data = {"status": "completed", "info": {"ram": {"total": 5}}}
    assert data_contains(data, {"info": {"ram": {"total": 5}}})
    assert not data_contains(data, {"info": {"ram": {"total": 6}}})
    assert not data_contains(data, {"missing": 1})
    assert not data_contains({"info": 3}, {"info": {"x": 1}})


def test_get_times_out_clearly(monitor: Monitor) -> None:
    with monitor.events("SHUTDOWN") as sub, pytest.raises(EventTimeout, match="SHUTDOWN") as info:
        sub.get(timeout=0.05)
    assert isinstance(info.value, TimeoutError)


def test_wait_event_only_sees_future_events(monitor: Monitor, fake: FakeQEMU) -> None:
    fake.emit_event("RESET", {"guest": False})
    time.sleep(0.1)
    threading.Timer(0.1, fake.emit_event, ("RESET", {"guest": True})).start()
    event = monitor.wait_event("RESET", timeout=2)
    assert event.data == {"guest": True}


def test_overflow_is_counted_not_unbounded(monitor: Monitor, fake: FakeQEMU) -> None:
    with monitor.events("TICK", maxsize=5) as sub:
        for n in range(20):
            fake.emit_event("TICK", {"n": n})
        monitor.execute("query-status")  # the events were read before this reply
        time.sleep(0.05)
        assert len(sub) == 5
        assert sub.dropped == 15
        assert [e.data["n"] for e in sub.drain()] == [0, 1, 2, 3, 4]


def test_history_is_bounded_and_queryable(fake: FakeQEMU) -> None:
    with connect(fake.address, timeout=5, event_history=10) as mon:
        for n in range(15):
            fake.emit_event("STOP" if n % 2 else "RESUME", {"n": n})
        mon.execute("query-status")
        events = mon.recent_events()
        assert [e.data["n"] for e in events] == list(range(5, 15))
        assert mon.history_evicted == 5
        stops = mon.recent_events("STOP")
        assert all(e.name == "STOP" for e in stops) and len(stops) == 5
        assert [e.data["n"] for e in mon.recent_events("STOP", match={"n": 7})] == [7]
        assert mon.recent_events(since=time.time() + 60) == []
        assert len(mon.recent_events(since=time.time() - 60)) == 10


def test_stop_and_cont_emit_events(monitor: Monitor) -> None:
    with monitor.events("STOP", "RESUME") as sub:
        monitor.execute("stop")
        monitor.execute("cont")
        assert [sub.get(2).name, sub.get(2).name] == ["STOP", "RESUME"]


def test_connection_loss_wakes_event_waiters(monitor: Monitor, fake: FakeQEMU) -> None:
    with monitor.events("SHUTDOWN") as sub:
        fake.emit_event("SHUTDOWN", {"guest": True})
        time.sleep(0.05)
        threading.Timer(0.1, fake.disconnect).start()
        assert sub.get(5).name == "SHUTDOWN"  # buffered events are still delivered first
        with pytest.raises(ConnectionLost):  # the loss woke it: not an EventTimeout at 5 s
            sub.get(5)


def test_callbacks_run_off_the_reader_and_may_call_qmp(monitor: Monitor, fake: FakeQEMU) -> None:
    seen: list[tuple[str, Any, str]] = []
    done = threading.Event()

    def on_stop(event: Event) -> None:
        # A QMP call from a callback must not deadlock the reader.
        status = monitor.execute("query-status", timeout=5)
        seen.append((event.name, status["status"], threading.current_thread().name))
        done.set()

    unregister = monitor.on_event(on_stop, "STOP")
    monitor.execute("stop")
    assert done.wait(5)
    assert seen[0][:2] == ("STOP", "paused")
    assert seen[0][2].startswith("vmctl-callbacks")
    unregister()
    done.clear()
    monitor.execute("stop")
    assert not done.wait(0.2)


def test_a_failing_callback_does_not_stop_others(monitor: Monitor, fake: FakeQEMU) -> None:
    got = threading.Event()

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    monitor.on_event(broken, "STOP")
    monitor.on_event(lambda e: got.set(), "STOP")
    fake.emit_event("STOP")
    assert got.wait(5)


def test_on_disconnect_reports_the_loss(monitor: Monitor, fake: FakeQEMU) -> None:
    reasons: list[QMPError | None] = []
    got = threading.Event()

    def on_disconnect(error: QMPError | None) -> None:
        reasons.append(error)
        got.set()

    monitor.on_disconnect(on_disconnect)
    fake.disconnect()
    # Nothing is sent or waited for here: the idle monitor's watch notices the loss by itself
    # (how soon is a figure for bench/, not a test's to time).
    assert got.wait(5)
    assert isinstance(reasons[0], ConnectionLost)


def test_bad_subscriptions_are_rejected(monitor: Monitor) -> None:
    with pytest.raises(InvalidArgument):
        monitor.events("STOP", match=42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument):
        monitor.events("")
    with pytest.raises(InvalidArgument):
        monitor.events("STOP", maxsize=0)
