"""`rct-dist demo` on Omniglot (when the data is beside the project), shortened. The digits fallback,
the README's main job, runs on 2 processes in tests/test_launch.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rct_dist.demo import RUNS, find_omniglot, run_demo

OMNIGLOT = Path(os.environ.get("RCT_DIST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def check_rows(rows) -> None:
    assert [name for name, _, _ in rows] == [name for name, _, _ in RUNS]
    for name, recall, seconds in rows:
        assert 0.0 < recall[1] <= recall[8] <= 1.0, name
        assert seconds > 0


@pytest.mark.skipif(find_omniglot(str(OMNIGLOT)) is None, reason="Omniglot data not found beside the project")
def test_demo_on_omniglot(tmp_path):
    rows = run_demo(data=str(OMNIGLOT), out=str(tmp_path), dataset="omniglot", classes=10, epochs=1,
                    say=lambda _: None)
    check_rows(rows)
