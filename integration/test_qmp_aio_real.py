"""The asyncio face against a real QEMU (``-machine none``), and the README's example run as written."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.conftest import REPO, QemuProcess
from vmctl.errors import CommandNotFound, CommandTimeout, ConnectionLost
from vmctl.qmp import Monitor, aio, connect


@pytest.fixture
def qemu_with_socket(tmp_path: Path) -> Iterator[tuple[QemuProcess, str]]:
    path = str(tmp_path / "qmp.sock")
    qemu = QemuProcess(tmp_path, "-qmp", f"unix:{path},server=on,wait=off")
    try:
        yield qemu, path
    finally:
        qemu.stop()


def _fdset_opaques(qmp: Monitor) -> list[str]:
    return [fd.get("opaque", "") for fdset in qmp.execute("query-fdsets") for fd in fdset["fds"]]


def test_the_readme_async_example_runs_against_real_qemu(
    qemu_with_socket: tuple[QemuProcess, str], tmp_path: Path
) -> None:
    qemu, path = qemu_with_socket
    readme = (REPO / "README.md").read_text()
    section = readme.split("## The asyncio face", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    image = tmp_path / "data.qcow2"
    image.write_bytes(b"\0" * 4096)
    source = code.group(1).replace("/run/vm1/qmp.sock", path).replace("/images/data.qcow2", str(image))
    exec(compile(source, "README.md", "exec"), {"__name__": "readme"})
    with connect(qemu.socket, timeout=10) as check:
        assert _fdset_opaques(check) == ["data"]
        fd = check.execute("query-fdsets")[0]["fds"][0]["fd"]
        assert os.readlink(f"/proc/{qemu.pid}/fd/{fd}") == str(image)
        assert check.execute("query-status")["status"] == "running"


def test_async_execute_events_and_errors_on_real_qemu(qemu: QemuProcess) -> None:
    async def main() -> None:
        async with await aio.connect(qemu.socket, name="real", timeout=10) as qmp:
            assert qmp.version.major >= 7 and await qmp.supports("add-fd")
            assert (await qmp.schema()).has_argument("migrate", "uri")
            with pytest.raises(CommandNotFound):
                await qmp.execute("no-such-command")
            async with qmp.events("STOP", "RESUME") as events:
                await qmp.execute("stop")
                assert (await events.get(timeout=5)).name == "STOP"
                await qmp.execute("cont")
                assert (await events.get(timeout=5)).name == "RESUME"
            statuses = await asyncio.gather(*(qmp.execute("query-status") for _ in range(64)))
            assert all(s["status"] == "running" for s in statuses)

    asyncio.run(main())


def test_async_fd_command_timed_out_waiting_for_the_slot_never_reaches_qemu(qemu: QemuProcess, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.write_bytes(b"1")
    two.write_bytes(b"2")

    async def main() -> None:
        async with await aio.connect(qemu.socket, timeout=10) as qmp:
            await qmp.execute("query-status")
            qemu.signal(signal.SIGSTOP)
            try:
                with open(one, "rb") as first, open(two, "rb") as second:
                    with pytest.raises(CommandTimeout):
                        await qmp.execute("add-fd", {"opaque": "one"}, fds=[first], timeout=0.3)
                    with pytest.raises(CommandTimeout):
                        await qmp.execute("add-fd", {"opaque": "two"}, fds=[second], timeout=0.3)
                    assert qmp.fds_held == 1
            finally:
                qemu.signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while qmp.late_replies and time.monotonic() < deadline:
                await qmp.execute("query-status")
            fdsets = await qmp.execute("query-fdsets")
            assert [fd["opaque"] for fdset in fdsets for fd in fdset["fds"]] == ["one"]
            held = fdsets[0]["fds"][0]["fd"]
            assert os.readlink(f"/proc/{qemu.pid}/fd/{held}") == str(one)
            assert qmp.fds_held == 0

    asyncio.run(main())


def test_async_waiters_fail_at_once_when_qemu_is_killed(qemu: QemuProcess) -> None:
    async def main() -> None:
        qmp = await aio.connect(qemu.socket, timeout=10)
        qemu.signal(signal.SIGSTOP)  # nothing will answer
        pending = [asyncio.create_task(qmp.execute("query-status", timeout=30)) for _ in range(3)]
        await asyncio.sleep(0.1)
        killed = time.monotonic()
        qemu.signal(signal.SIGKILL)
        results = await asyncio.gather(*pending, return_exceptions=True)
        assert time.monotonic() - killed < 1.0
        assert all(isinstance(r, ConnectionLost) for r in results)
        await qmp.close()

    asyncio.run(main())
