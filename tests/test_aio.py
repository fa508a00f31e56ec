"""The asyncio face (``vmctl.qmp.aio``) on the fake: the same rules as the threaded face, no threads."""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from vmctl.errors import (
    CommandTimeout,
    ConnectError,
    ConnectionLost,
    DeviceNotFound,
    EventMatchError,
    EventTimeout,
    InvalidArgument,
    MessageTooLarge,
    ProtocolError,
    StateError,
)
from vmctl.qmp import ConnectionState, aio
from vmctl.qmp.messages import Event
from vmctl.testing import FakeQEMU


def run(test: Callable[[aio.AsyncMonitor, FakeQEMU], Awaitable[None]], **connect: Any) -> None:
    async def main() -> None:
        with FakeQEMU() as fake:
            async with await aio.connect(fake.address, name="async", timeout=5, **connect) as qmp:
                await test(qmp, fake)

    asyncio.run(main())


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the event loop run (the monitor's reader with it) until ``condition`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout:g}s"
        await asyncio.sleep(0.005)


def test_execute_returns_qemus_value_and_errors_are_typed() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        assert (await qmp.execute("query-status"))["running"] is True
        assert qmp.capabilities == ("oob",) and str(qmp.version) == "7.2.0"
        fake.on("device_del", error=("DeviceNotFound", "Device 'disk9' not found"))
        with pytest.raises(DeviceNotFound):
            await qmp.execute("device_del", {"id": "disk9"})
        assert await qmp.human("info status") == "fake: info status\r\n"
        assert await qmp.supports("add-fd") and (await qmp.schema()).has_argument("device_add", "driver")

    run(test)


def test_concurrent_tasks_get_their_own_replies_on_one_thread() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("echo", lambda call: call.arguments["n"])
        threads_before = threading.active_count()

        async def worker(task: int) -> list[Any]:
            return [await qmp.execute("echo", {"n": task * 1000 + i}) for i in range(50)]

        results = await asyncio.gather(*(worker(t) for t in range(8)))
        assert results == [[t * 1000 + i for i in range(50)] for t in range(8)]
        assert threading.active_count() == threads_before  # no thread per connection

    run(test)


def test_timeout_says_outcome_unknown_and_the_late_reply_is_discarded() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("slow", lambda call: "late", delay=0.3)
        with pytest.raises(CommandTimeout, match="outcome is unknown"):
            await qmp.execute("slow", timeout=0.05)
        assert qmp.late_replies == 1
        await asyncio.sleep(0.4)
        assert (await qmp.execute("query-status"))["running"]
        assert qmp.late_replies == 0

    run(test)


def test_default_timeouts_come_from_the_policy() -> None:
    from vmctl.qmp import TimeoutPolicy

    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("slow", lambda call: 1, delay=1.0)
        with pytest.raises(CommandTimeout, match=r"within 0.1s"):
            await qmp.execute("slow")

    run(test, timeouts=TimeoutPolicy().with_rules({"slow": 0.1}))


@pytest.mark.parametrize("timeout", [float("inf"), float("nan"), -1, 0, True])
def test_a_bad_timeout_is_refused_before_sending(timeout: Any) -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        with pytest.raises(InvalidArgument):
            await qmp.execute("device_del", {"id": "x"}, timeout=timeout)
        assert fake.calls_of("device_del") == []
        assert await qmp.execute("query-status", timeout=1e20)

    run(test)


def test_a_cancelled_caller_is_treated_like_a_timed_out_one() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("slow", lambda call: 1, delay=0.2)
        task = asyncio.create_task(qmp.execute("slow", timeout=10))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert qmp.late_replies == 1
        await until(lambda: qmp.late_replies == 0)  # its reply came and was dropped
        assert (await qmp.execute("query-status"))["running"]

    run(test)


def test_an_fd_command_that_times_out_waiting_for_the_fd_slot_is_never_sent() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("add-fd", delay=0.4)
        with tempfile.TemporaryFile() as one, tempfile.TemporaryFile() as two:
            one.write(b"one")
            one.flush()
            with pytest.raises(CommandTimeout):
                await qmp.execute("add-fd", {"opaque": "one"}, fds=[one], timeout=0.05)
            with pytest.raises(CommandTimeout):
                await qmp.execute("add-fd", {"opaque": "two"}, fds=[two], timeout=0.05)
            assert qmp.fds_held == 1
        await until(lambda: qmp.late_replies == 0)  # the first one's reply came and was dropped
        assert qmp.fds_held == 0
        assert [c.arguments["opaque"] for c in fake.calls_of("add-fd")] == ["one"]
        [(_, held)] = fake.fdsets[0]
        assert os.pread(held, 3, 0) == b"one"

    run(test)


def test_fds_travel_with_their_command_in_one_sendmsg() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        with tempfile.TemporaryFile() as image:
            image.write(b"hello")
            image.flush()
            reply = await qmp.execute("add-fd", {"opaque": "disk1"}, fds=[image])
        assert os.pread(fake.fdsets[reply["fdset-id"]][0][1], 5, 0) == b"hello"
        with pytest.raises(InvalidArgument):
            await qmp.execute("add-fd", fds=[-1])

    run(test)


def test_events_reach_subscribers_and_a_raising_match_ends_only_its_own() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        def broken(event: Event) -> bool:
            raise RuntimeError("user bug")

        async with qmp.events("STOP", match=broken) as bad, qmp.events("STOP") as good:
            await qmp.execute("stop")
            assert (await good.get(timeout=5)).name == "STOP"
            with pytest.raises(EventMatchError):
                await bad.get(timeout=5)
            with pytest.raises(EventTimeout):
                await good.get(timeout=0.05)
        assert qmp.recent_events("STOP")
        event = asyncio.ensure_future(qmp.wait_event("RESUME", timeout=5))
        await asyncio.sleep(0)
        await qmp.execute("cont")
        assert (await event).name == "RESUME"

    run(test)


def test_callbacks_run_on_the_loop_and_one_that_raises_harms_nobody() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        seen: list[str] = []
        done = asyncio.Event()

        def broken(event: Event) -> None:
            raise RuntimeError("user bug")

        async def coroutine_callback(event: Event) -> None:
            seen.append("async " + event.name)
            done.set()

        qmp.on_event(broken, "STOP")
        qmp.on_event(lambda event: seen.append(event.name), "STOP")
        remove = qmp.on_event(coroutine_callback, "STOP")
        await qmp.execute("stop")
        await asyncio.wait_for(done.wait(), 5)
        remove()
        assert seen == ["STOP", "async STOP"]
        assert (await qmp.execute("query-status"))["status"] == "paused"

    run(test)


def test_connection_loss_fails_pending_calls_and_later_ones_at_once() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("hang", fault="no_reply")
        lost: list[BaseException | None] = []
        qmp.on_disconnect(lost.append)
        pending = [asyncio.create_task(qmp.execute("hang", timeout=30)) for _ in range(3)]
        await asyncio.sleep(0.05)
        fake.disconnect()
        started = time.monotonic()
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert time.monotonic() - started < 1
        assert all(isinstance(r, ConnectionLost) for r in results)
        with pytest.raises(ConnectionLost):
            await qmp.execute("query-status")
        assert qmp.connection_state is ConnectionState.DISCONNECTED
        await asyncio.sleep(0)
        assert len(lost) == 1 and isinstance(lost[0], ConnectionLost)

    run(test)


def test_garbage_and_deep_nesting_and_oversized_replies() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("huge", fault="oversized", oversized_bytes=2_000_000)
        fake.on("qom-get", fault="deeply_nested")
        with pytest.raises(MessageTooLarge):
            await qmp.execute("huge")
        with pytest.raises(ProtocolError, match="nested too deeply"):
            await qmp.execute("qom-get", timeout=10)
        assert (await qmp.execute("query-status"))["running"]
        fake.on("query-status", fault="garbage")
        with pytest.raises(ProtocolError, match="not JSON"):
            await qmp.execute("query-status")
        with pytest.raises(ConnectionLost, match="not JSON"):
            await qmp.execute("query-version")

    run(test, max_message_size=2**20)


def test_one_tasks_short_deadline_does_not_fail_anothers_send() -> None:
    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("echo", lambda call: len(call.arguments["pad"]))
        fake.freeze()
        short = asyncio.create_task(qmp.execute("echo", {"pad": "x" * 4 * 2**20}, timeout=0.2))
        await asyncio.sleep(0.05)
        patient = asyncio.create_task(qmp.execute("echo", {"pad": "y"}, timeout=20))
        with pytest.raises(CommandTimeout):
            await short
        fake.thaw()
        assert await patient == 1
        assert (await qmp.execute("query-status"))["running"]

    run(test)


def test_close_fails_pending_commands_and_is_idempotent() -> None:
    async def main() -> None:
        with FakeQEMU() as fake:
            fake.on("hang", fault="no_reply")
            qmp = await aio.connect(fake.address, timeout=5)
            pending = asyncio.create_task(qmp.execute("hang", timeout=30))
            await asyncio.sleep(0.05)
            await qmp.close()
            await qmp.close()
            with pytest.raises(ConnectionLost):
                await pending
            with pytest.raises(StateError, match="closed"):
                await qmp.execute("query-status")

    asyncio.run(main())


def test_connect_retries_until_the_socket_appears_and_gives_up_at_the_deadline(tmp_path: Any) -> None:
    async def main() -> None:
        fake = FakeQEMU()
        asyncio.get_running_loop().call_later(0.2, fake.serve)
        try:
            async with await aio.connect(fake.address, timeout=5) as qmp:
                assert (await qmp.execute("query-status"))["running"]
        finally:
            fake.close()
        with pytest.raises(ConnectError, match="cannot connect"):
            await aio.connect(str(tmp_path / "nothing.sock"), timeout=0.2)
        with pytest.raises(InvalidArgument):
            await aio.connect(42, timeout=1)  # type: ignore[arg-type]

    asyncio.run(main())


def test_connect_to_a_silent_server_times_out(tmp_path: Any) -> None:
    import socket

    async def main() -> None:
        path = str(tmp_path / "silent.sock")
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(path)
            server.listen(1)
            with pytest.raises(ConnectError, match="greeting"):
                await aio.connect(path, timeout=0.3)

    asyncio.run(main())


def test_the_transcript_records_both_directions_with_secrets_redacted(tmp_path: Any) -> None:
    transcript = tmp_path / "qmp.jsonl"

    async def test(qmp: aio.AsyncMonitor, fake: FakeQEMU) -> None:
        fake.on("object-add", returns={})
        await qmp.execute("object-add", {"qom-type": "secret", "id": "s", "data": "hunter2"})

    run(test, transcript=transcript)
    text = transcript.read_text()
    assert "hunter2" not in text and '"dir": "send"' in text and '"dir": "recv"' in text
