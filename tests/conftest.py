from __future__ import annotations

from collections.abc import Iterator

import pytest

from vmctl.qmp import Monitor, connect
from vmctl.testing import FakeQEMU


@pytest.fixture
def fake() -> Iterator[FakeQEMU]:
    with FakeQEMU() as server:
        yield server


@pytest.fixture
def monitor(fake: FakeQEMU) -> Iterator[Monitor]:
    with connect(fake.address, name="fake", timeout=5) as mon:
        yield mon
