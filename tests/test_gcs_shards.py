"""Shards in Google Cloud Storage (`gs://`), against fsouza's fake-gcs-server (the GCS JSON API, started by
this module on 127.0.0.1 with a free port, see object_store.py) through gcsfs, as a user's run would read
them: `make_shards` uploads the digits splits into a bucket, and a loader over `gs://` yields exactly what
the same loader over the local shards yields. A missing object or bucket fails in one line naming it.
The emulator is found through STORAGE_EMULATOR_HOST, with no Google credentials in the environment."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from object_store import FakeGCS
from rct_dist.data.loader import CacheSettings, make_loader
from rct_dist.data.shard_cache import ShardCache, ShardSpec
from rct_dist.data.shards import make_shards
from rct_dist.data.splits import load_index
from rct_dist.data.stores import MissingObject, RemoteStore

BUCKET = "rct-digits"
ROOT = f"gs://{BUCKET}/digits"


def _clear_gcsfs_cache() -> None:
    # gcsfs caches filesystem instances by their arguments, not by the environment (the emulator's address).
    gcsfs = sys.modules.get("gcsfs")
    if gcsfs is not None:
        gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The module's emulator with its variables applied (and every other Google variable removed), and the
    digits shards made straight into its bucket. Yields (server, make_shards' summary)."""
    with pytest.MonkeyPatch.context() as monkeypatch, FakeGCS(tmp_path_factory.mktemp("fake-gcs")) as server:
        for name in [k for k in os.environ if k.startswith(("GOOGLE_", "CLOUDSDK_", "GCE_", "STORAGE_EMULATOR"))]:
            monkeypatch.delenv(name)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        _clear_gcsfs_cache()
        server.make_bucket(BUCKET)
        summary = make_shards("digits", ROOT, shard_size=100, workers=1, stage=tmp_path_factory.mktemp("stage"))
        yield server, summary
        _clear_gcsfs_cache()


def test_make_shards_into_gcs_is_read_like_the_local_copy(gcs, digits_shards, tmp_path):
    server, summary = gcs
    assert {s: v["status"] for s, v in summary["splits"].items()} == {"train": "uploaded", "test": "uploaded"}
    local = json.loads((digits_shards / "train" / "index.json").read_text())
    # The emulator holds the index (read back through its own API, not gcsfs) and every shard.
    uploaded = json.loads(server.get_object(BUCKET, "digits/train/index.json"))
    assert uploaded["shards"] == local["shards"] and uploaded["shard_sha256"] == local["shard_sha256"]
    for name in local["shards"]:
        assert server.get_object(BUCKET, f"digits/train/{name}") == (digits_shards / "train" / name).read_bytes()

    cache = CacheSettings(str(tmp_path / "cache"))
    index = load_index(f"{ROOT}/train", cache)
    assert list(index.shards) == local["shards"] and [s.sha256 for s in index.remote.specs] == local["shard_sha256"]
    args = dict(batch_size=20, train=True, image_size=16, seed=1, workers=2, pk=(5, 4), rank=0, world=1)
    remote = make_loader(f"{ROOT}/train", cache=cache, **args)
    batches, reference = list(remote), list(make_loader(digits_shards / "train", **args))
    assert len(batches) == len(reference) > 4
    assert [b.keys for b in batches] == [b.keys for b in reference]
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches[:4], reference[:4]))
    assert remote.prefetcher.cache.stats.downloads == len(index.shards)


def test_a_missing_object_or_bucket_fails_in_one_line_naming_it(gcs, tmp_path):
    store = RemoteStore(f"{ROOT}/train", retries=1)
    with pytest.raises(MissingObject, match=rf"^{ROOT}/train/nothing\.tar: not found \(404\)") as caught:
        ShardCache(store, tmp_path / "c").pin(ShardSpec("nothing.tar", 10))
    assert "\n" not in str(caught.value)
    missing = r"^gs://no-such-bucket/digits/train: bucket 'no-such-bucket' does not exist"
    with pytest.raises(MissingObject, match=missing) as caught:
        load_index("gs://no-such-bucket/digits/train", CacheSettings(str(tmp_path / "cache")))
    assert "\n" not in str(caught.value)
