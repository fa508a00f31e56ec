"""The demo is the main job end to end: it must run and say what it did."""

from __future__ import annotations

import io

from integration.conftest import REPO
from vmctl.cli.demo import run_demo


def test_the_demo_runs_end_to_end() -> None:
    out = io.StringIO()
    assert run_demo(out, cache_dir=REPO / ".cache") == 0, out.getvalue()
    text = out.getvalue()
    assert "the guest sees /dev/vd" in text
    assert "read back: 'hello from the guest\\n'" in text
    assert "/tmp/pattern: OK" in text
    assert "the carried disk reads: 'written before migration'" in text
    assert "resets seen: ['expected']" in text
    assert text.count(": powerdown in") == 2
    assert text.rstrip().endswith("demo finished")
