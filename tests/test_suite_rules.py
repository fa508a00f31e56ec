"""The suite's own rules (the repository's conftest.py), run on a throwaway suite in a subprocess."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_suite(tmp_path: Path, tests: str) -> subprocess.CompletedProcess[str]:
    shutil.copy(REPO / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers = versioned: behaviour depends on the QEMU version\n")
    (tmp_path / "test_throwaway.py").write_text("import pytest\n\n" + tests)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    "skip",
    [
        "@pytest.mark.skip()\ndef test_x():\n    pass\n",
        "def test_x():\n    pytest.skip()\n",
        "def test_x():\n    pytest.skip('')\n",
    ],
    ids=["marker", "call", "empty-string"],
)
def test_a_skip_without_a_reason_fails_the_run(tmp_path: Path, skip: str) -> None:
    result = run_suite(tmp_path, skip)
    assert result.returncode == 1, result.stdout
    assert "skipped without a reason" in result.stdout


def test_a_skip_with_a_reason_stays_a_skip_and_shows_it(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "def test_x():\n    pytest.skip('no tap device here')\n")
    assert result.returncode == 0, result.stdout
    assert "no tap device here" in result.stdout
    assert "1 skipped" in result.stdout


def test_an_expected_failure_is_not_taken_for_a_skip(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "@pytest.mark.xfail(reason='known')\ndef test_x():\n    assert False\n")
    assert result.returncode == 0, result.stdout
    assert "1 xfailed" in result.stdout


def test_a_versioned_marker_without_its_reason_is_refused_at_collection(tmp_path: Path) -> None:
    result = run_suite(tmp_path, "@pytest.mark.versioned()\ndef test_x():\n    pass\n")
    assert result.returncode == 4, result.stdout + result.stderr
    assert "needs the reason" in result.stdout + result.stderr
