"""Rules every test run keeps, unit and integration alike.

- A skip says why. A skip without a reason hides a check that did not run, so it fails the run.
- ``@pytest.mark.versioned("why")`` marks a test whose behaviour depends on the QEMU version; the
  second CI stage runs only those on the other QEMU (see README, "The test suite"). The reason is
  what differs between versions, so a marker without one is refused at collection.
"""

from __future__ import annotations

from collections.abc import Generator

import pytest

#: What pytest reports for a skip that was given no reason.
_NO_REASON = {"", "unconditional skip", "skipped", "Skipped", "Skipped:"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for marker in item.iter_markers("versioned"):
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            if not isinstance(reason, str) or not reason.strip():
                raise pytest.UsageError(f"{item.nodeid}: @pytest.mark.versioned needs the reason, what differs")


def skip_reason(report: pytest.TestReport) -> str:
    """The reason a skipped report gives (pytest keeps it as the last item of a tuple)."""
    longrepr = report.longrepr
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr or "")
    return reason.removeprefix("Skipped:").strip()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.skipped and not hasattr(report, "wasxfail") and skip_reason(report) in _NO_REASON:
        report.outcome = "failed"
        report.longrepr = f"{item.nodeid}: skipped without a reason; a skip must say why it did not run"
    return report
