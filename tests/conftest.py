"""Fixtures shared by the test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from rct_dist.data import shards


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory) -> Path:
    """scikit-learn's digits as shards of 100 (train: 901 images of classes 0-4, test: 896 of 5-9)."""
    out = tmp_path_factory.mktemp("digits")
    shards.make_shards("digits", out, shard_size=100, workers=1)
    return out
