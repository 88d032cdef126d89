"""Remote roots below the trainer, against an in-process HTTP server with Range support and fault knobs:
locations and errors, the node-local shard cache (one download per shard, checks and refetches, pins
and LRU eviction), the window plan for splits larger than the cache, and tar shards written by other
tools. The integration tests against a real S3 server are in test_remote_shards.py."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from rct_dist.config import ConfigError, load_config
from rct_dist.data.epoch_plan import plan_epoch
from rct_dist.data.loader import CacheSettings, make_loader
from rct_dist.atomic import file_sha256
from rct_dist.data.shard_cache import CorruptDownload, ShardCache, ShardSpec
from rct_dist.data.splits import load_index, sample_table
from rct_dist.data.stores import AccessDenied, MissingObject, RemoteStore, StoreError, join, retrying, scheme_of

ARGS = dict(batch_size=20, train=True, image_size=16, seed=3, workers=0, pk=(5, 4))


@pytest.fixture
def served_digits(digits_shards, http_server) -> tuple[str, Path]:
    """The digits shards behind the HTTP server: (URL of the shards folder, local copy)."""
    for split in ("train", "test"):
        (http_server.root / split).mkdir()
        for path in (digits_shards / split).iterdir():
            if not path.name.startswith("."):
                (http_server.root / split / path.name).write_bytes(path.read_bytes())
    return http_server.url.rstrip("/"), digits_shards


def _keys(loader) -> list[list[str]]:
    return [batch.keys for batch in loader]


# -- locations ----------------------------------------------------------------------------------------------

def test_locations_are_told_apart_and_joined_without_folding_slashes():
    assert scheme_of("shards/cub") is None and scheme_of("/data/x") is None
    assert scheme_of("s3://b/p") == "s3" and scheme_of("gs://b") == "gcs" and scheme_of("HTTPS://h/p") == "http"
    assert join("s3://bucket/prefix/", "train") == "s3://bucket/prefix/train"
    assert join("https://h:8000/a", "/train/") == "https://h:8000/a/train"
    assert join("shards", "train") == str(Path("shards") / "train")
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        scheme_of("ftp://host/x")
    with pytest.raises(ValueError, match="pipe:"):
        scheme_of("pipe:curl -s http://x/a.tar")
    with pytest.raises(ValueError, match="not a location"):
        scheme_of("s3:/bucket/mangled")  # what Path("s3://bucket") turns a URL into


def test_retrying_retries_transient_errors_and_names_the_object():
    calls = []

    class Unavailable(Exception):
        status = 503

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise Unavailable("service unavailable")
        return "ok"

    assert retrying(flaky, "s3://b/k", retries=2, backoff=0.0) == "ok" and len(calls) == 3

    def down():
        calls.append(1)
        raise Unavailable("down")

    calls.clear()
    with pytest.raises(StoreError, match=r"s3://b/k: still failing after 2 attempts \(Unavailable: down\)"):
        retrying(down, "s3://b/k", retries=1, backoff=0.0)
    assert len(calls) == 2
    for status, kind in ((404, MissingObject), (403, AccessDenied)):
        error = type("E", (Exception,), {"status": status})
        attempts = []

        def refused():
            attempts.append(1)
            raise error("no")
        with pytest.raises(kind, match="s3://b/k"):
            retrying(refused, "s3://b/k", retries=5, backoff=0.0)
        assert len(attempts) == 1  # permanent: never retried


def test_http_root_reads_the_same_batches_as_the_local_folder(served_digits, tmp_path):
    url, local = served_digits
    cache = CacheSettings(str(tmp_path / "cache"))
    remote = make_loader(f"{url}/train", cache=cache, **ARGS)
    assert remote.prefetcher is not None
    batches = list(remote)
    reference = list(make_loader(local / "train", **ARGS))
    assert [b.keys for b in batches] == [b.keys for b in reference] and len(batches) == 44
    for a, b in zip(batches[:3], reference[:3]):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    index = load_index(f"{url}/train", cache)
    assert index.directory == cache.split_folder(f"{url}/train")
    assert sorted(p.name for p in index.directory.glob("*.tar")) == list(index.shards)


# -- the cache ---------------------------------------------------------------------------------------------

def _specs(url: str, local: Path) -> tuple[RemoteStore, list[ShardSpec]]:
    meta = json.loads((local / "index.json").read_text())
    return RemoteStore(url, retries=2), [ShardSpec(n, b, h) for n, b, h in
                                         zip(meta["shards"], meta["shard_bytes"], meta["shard_sha256"])]


def test_corrupt_and_truncated_downloads_are_fetched_again(served_digits, http_server, tmp_path):
    url, local = served_digits
    store, specs = _specs(f"{url}/train", local / "train")
    cache = ShardCache(store, tmp_path / "c")
    http_server.corrupt_next(1)
    http_server.truncate_next(1)
    pin = cache.pin(specs[0])
    # The short body is caught by the HTTP client against Content-Length (a transient error: retried), the
    # flipped byte by the SHA-256 check (refetched): three GETs for one shard in the cache.
    assert cache.stats.refetches == 1 and cache.stats.downloads == 1
    assert [r.path for r in http_server.requests if r.method == "GET"] == [f"/train/{specs[0].name}"] * 3
    assert file_sha256(cache.path(specs[0].name)) == specs[0].sha256
    pin.release()
    assert not list((tmp_path / "c").glob(".*part*"))  # no temporary left behind
    http_server.corrupt_next(10)
    with pytest.raises(CorruptDownload, match=rf"{specs[1].name}: every download differs from the index"):
        cache.pin(specs[1])
    assert not cache.path(specs[1].name).exists()


def test_server_errors_are_retried_then_reported_in_one_line(served_digits, http_server, tmp_path):
    url, local = served_digits
    store, specs = _specs(f"{url}/train", local / "train")
    http_server.fail_next(2, 503)
    ShardCache(store, tmp_path / "c").pin(specs[0]).release()  # two 503s, then the third attempt succeeds
    http_server.fail_next(3, 503)
    with pytest.raises(StoreError, match=rf"{specs[1].name}: still failing after 3 attempts") as caught:
        ShardCache(store, tmp_path / "c").pin(specs[1])
    assert "\n" not in str(caught.value)
    with pytest.raises(MissingObject, match=r"nothing\.tar: not found \(404\)"):
        ShardCache(store, tmp_path / "c").pin(ShardSpec("nothing.tar", 10))


def test_eviction_is_least_recently_used_and_never_takes_a_pinned_shard(served_digits, tmp_path):
    url, local = served_digits
    store, specs = _specs(f"{url}/train", local / "train")
    limit = specs[0].size * 3 + 100  # three shards fit
    cache = ShardCache(store, tmp_path / "c", limit)
    held = cache.pin(specs[0])  # pinned: stays whatever happens
    for spec in specs[1:3]:
        cache.pin(spec).release()
    os.utime(cache.path(specs[2].name), (1, 1))  # shard 2 now the least recently used, shard 1 next
    os.utime(cache.path(specs[1].name), (2, 2))
    os.utime(cache.path(specs[0].name), (0, 0))  # the oldest of all, but pinned
    cache.pin(specs[3]).release()
    present = {p.name for p in (tmp_path / "c").glob("*.tar")}
    assert present == {specs[0].name, specs[1].name, specs[3].name}
    assert cache.stats.evictions == 1 and cache.used_bytes() <= limit
    held.release()
    cache.pin(specs[4]).release()
    assert specs[0].name not in {p.name for p in (tmp_path / "c").glob("*.tar")}  # unpinned: now evictable
    # The limit holds for the cache root: another split's folder beside it makes room in this one.
    other = ShardCache(RemoteStore(f"{url}/test", retries=2), tmp_path / "d", limit)
    test_meta = json.loads((local / "test" / "index.json").read_text())
    other.pin(ShardSpec(test_meta["shards"][0], test_meta["shard_bytes"][0], test_meta["shard_sha256"][0])).release()
    assert len(list((tmp_path / "c").glob("*.tar"))) == 2 and other.used_bytes() <= limit


def _read_epoch(url: str, cache_dir: str, rank: int, queue) -> None:
    loader = make_loader(f"{url}/train", cache=CacheSettings(cache_dir), rank=rank, world=2,
                         **{**ARGS, "workers": 2})
    keys = [k for batch in loader for k in batch.keys]
    queue.put((rank, keys))


def test_two_ranks_on_one_node_download_each_shard_once(served_digits, http_server, tmp_path):
    url, local = served_digits
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    ranks = [context.Process(target=_read_epoch, args=(url, str(tmp_path / "cache"), r, queue)) for r in (0, 1)]
    for p in ranks:
        p.start()
    results = dict(queue.get(timeout=300) for _ in ranks)
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    gets = [r.path for r in http_server.requests if r.method == "GET" and r.path.endswith(".tar")]
    shards = json.loads((local / "train" / "index.json").read_text())["shards"]
    assert sorted(gets) == sorted(f"/train/{name}" for name in shards)  # each once, by one of the two ranks
    one = [k for batch in make_loader(local / "train", rank=0, world=1, **ARGS) for k in batch.keys]
    assert sorted(results[0] + results[1]) == sorted(one[:len(results[0]) * 2])


# -- the window plan ---------------------------------------------------------------------------------------

def test_a_split_larger_than_the_cache_is_planned_in_windows(served_digits, http_server, tmp_path):
    url, local = served_digits
    meta = json.loads((local / "train" / "index.json").read_text())
    limit = 4 * max(meta["shard_bytes"]) + 1000  # windows of 2 of the 9 shards
    cache = CacheSettings(str(tmp_path / "cache"), limit=limit)
    loader = make_loader(f"{url}/train", cache=cache, **ARGS)
    assert loader.prefetcher.remote.window_shards() == 2
    table = loader.table
    # Every unit's samples lie in one window of 2 shards, and P x K holds: 5 classes x 4.
    for batch in loader.plan.batches:
        assert len(np.unique(table.shard[batch])) <= 2
        assert sorted(np.bincount(table.labels[batch]).tolist())[-5:] == [4] * 5
    keys = _keys(loader)
    cached = sorted((tmp_path / "cache").glob("*/*.tar"))
    assert sum(p.stat().st_size for p in cached) <= limit
    assert loader.prefetcher.cache.stats.evictions > 0
    # The same global sequence on two ranks, and a mid-epoch resume starts exactly at its point.
    two = [make_loader(f"{url}/train", cache=cache, rank=r, world=2, **ARGS) for r in (0, 1)]
    interleaved = [k for pair in zip(*(_keys(part) for part in two)) for k in pair]
    assert interleaved == keys[:len(interleaved)]
    resumed = make_loader(f"{url}/train", cache=cache, start_samples=7 * 20, **ARGS)
    assert _keys(resumed) == keys[7:]
    # With room for the whole split: the usual plan.
    whole = make_loader(f"{url}/train", cache=CacheSettings(str(tmp_path / "big"), limit=10**9), **ARGS)
    assert whole.prefetcher.remote.window_shards() is None
    assert _keys(whole) == _keys(make_loader(local / "train", **ARGS))


def test_window_plan_refuses_what_it_cannot_do():
    shard, labels = np.repeat(np.arange(4), 10), np.repeat(np.arange(8), 5)
    with pytest.raises(ValueError, match="resampled draws samples from the whole split"):
        plan_epoch(shard, 4, labels, rank=0, world=1, batch_size=10, train=True, seed=0, epoch=0, resampled=True,
                   window_shards=1)
    with pytest.raises(ValueError, match=r"in windows of 1 shard\(s\) \(data.cache_limit\)"):
        plan_epoch(shard, 4, labels, rank=0, world=1, batch_size=15, train=True, seed=0, epoch=0, pk=(5, 3),
                   window_shards=1)  # a shard holds 2 classes: no window has 5


# -- shards of other tools ---------------------------------------------------------------------------------

def _image(color: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 20), (color, 255 - color, 7)).save(buffer, format=fmt)
    return buffer.getvalue()


def _foreign_shards(folder: Path, shards: int = 3, per_shard: int = 12) -> None:
    import webdataset as wds
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "part-%04d.tar"), maxcount=per_shard) as sink:
        for i in range(shards * per_shard):
            fmt = ("jpg", "png", "webp")[i % 3]
            sink.write({"__key__": f"sample{i:05d}", fmt: _image(i * 7 % 255, {"jpg": "JPEG"}.get(fmt, fmt.upper())),
                        "cls": str(i % 6).encode()})


def test_webdataset_shards_without_an_index_are_indexed_from_their_headers(tmp_path, served_digits, http_server):
    _foreign_shards(tmp_path / "other")
    index = load_index(tmp_path / "other")
    assert index.shards == ("part-0000.tar", "part-0001.tar", "part-0002.tar") and index.classes == 6
    assert index.shard_samples == (12, 12, 12) and (tmp_path / "other" / ".rct-index.json").is_file()
    batch = next(iter(make_loader(tmp_path / "other", batch_size=12, train=False, image_size=16, workers=0, rank=0,
                                  world=1)))
    assert batch.images.shape == (12, 3, 16, 16) and batch.labels.tolist() == [i % 6 for i in range(12)]
    assert sum(make_loader(index, batch_size=12, train=False, image_size=16, workers=0, rank=0,
                           world=1).skipped.values()) == 0  # webp decodes like the others
    # Served without an index: listed... by the server? An HTTP folder has no listing here, so a remote
    # folder of foreign shards needs an object store's listing (test_remote_shards.py covers S3).
    (tmp_path / "other" / "part-0003.tar").write_bytes((tmp_path / "other" / "part-0000.tar").read_bytes())
    assert load_index(tmp_path / "other").shards[-1] == "part-0003.tar"  # a changed folder is indexed again


def test_cache_keys_are_refused_with_a_local_root(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("data: {root: shards, cache_limit: 1000}\n")
    with pytest.raises(ConfigError, match="data.cache_limit has no effect with a local data.root"):
        load_config(config)
    config.write_text("data: {root: 's3://bucket/shards', cache_limit: 1000, retries: 2}\n")
    assert load_config(config).data.cache_limit == 1000


def test_a_resume_with_another_window_is_refused(served_digits, tmp_path):
    from rct_dist.train.loop import check_plan, plan_inputs

    url, local = served_digits
    largest = max(json.loads((local / "train" / "index.json").read_text())["shard_bytes"])
    config = tmp_path / "run.yaml"
    plans = []
    for limit in (4 * largest, 6 * largest, 10**9):
        config.write_text(f"data: {{root: '{url}', pk: [5, 4], batch_size: 20, cache_limit: {limit}, "
                          f"cache_dir: '{tmp_path / 'cache'}'}}\n")
        cfg = load_config(config)
        plans.append(plan_inputs(cfg, load_index(f"{url}/train", CacheSettings(cfg.data.cache_dir, limit))))
    assert [p.get("window_shards") for p in plans] == [2, 3, None]
    check_plan(plans[0], dict(plans[0]), tmp_path / "ckpt")  # the same window: resumes
    with pytest.raises(ConfigError, match="the data plan changed .*window_shards: 2 then, 3 now"):
        check_plan(plans[0], plans[1], tmp_path / "ckpt")
    with pytest.raises(ConfigError, match="window_shards: 2 then, None now"):
        check_plan(plans[0], plans[2], tmp_path / "ckpt")  # the whole split now fits: another plan as well


def test_a_missing_client_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def without_gcsfs(name, *args, **kwargs):
        if name == "gcsfs":
            raise ImportError("No module named 'gcsfs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_gcsfs)
    with pytest.raises(ImportError, match=r"reading gcs locations needs the gcsfs package: pip install 'rct-dist\[gcs\]'"):
        RemoteStore("gs://bucket/shards/train").read("index.json")


def test_plain_windows_lose_no_more_than_one_partial_batch():
    shard = np.repeat(np.arange(9), 37)  # 9 shards of 37 samples: no window holds a whole number of batches
    labels = np.arange(len(shard)) % 7
    plan = plan_epoch(shard, 9, labels, rank=0, world=1, batch_size=10, train=True, seed=1, epoch=0, window_shards=2)
    seen = plan.batches.ravel()
    assert len(seen) == len(shard) // 10 * 10 and len(set(seen.tolist())) == len(seen)
    for batch in plan.batches:  # a batch spans at most two consecutive windows
        assert len(np.unique(shard[batch])) <= 4
