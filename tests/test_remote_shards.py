"""Shards in a real object store: SeaweedFS's S3 gateway (`weed mini`, started by the tests on 127.0.0.1
with free ports, see object_store.py), driven through the real command line.

`make-shards --out s3://...`, a transfer run from `s3://` equal to the same run from local shards (test R@1
and exported parameters), a kill -9 mid-epoch and a resume equal to the uninterrupted run, a server
stopped mid-epoch (retries, then one line, then a resume once it is back), two ranks of one node
sharing the cache, shards written by other tools, bad credentials and a missing bucket. The cache's
and the window plan's unit tests run against an in-process HTTP server in test_shard_cache.py."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from object_store import SeaweedS3
from run_outputs import final_r1 as _final_r1, newest_checkpoint as _newest_checkpoint
from run_outputs import assert_same_weights
from rct_dist.data.loader import CacheSettings, make_loader
from rct_dist.data.shards import make_shards
from rct_dist.data.splits import load_index

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
run: {{name: {name}, out_dir: {out}, seed: 5}}
data: {{root: '{data}', image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0{extra}}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
optim: {{lr: 1.0e-3, epochs: 1}}
deepspeed: {{config: zero0_fp32}}
eval: {{batch_size: 256}}
log: {{every_steps: 5, tensorboard: false, retrieval_images: 0, projector_samples: 0}}
checkpoint: {{every_steps: 5, keep: 2}}
"""


def _config(tmp: Path, name: str, data: str, cache: Path | None = None, **data_keys) -> Path:
    extra = "".join(f", {k}: {v}" for k, v in ({"cache_dir": f"'{cache}'"} if cache else {}).items())
    extra += "".join(f", {k}: {v}" for k, v in data_keys.items())
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, out=tmp / "runs", data=data, extra=extra))
    return path


def _command(config: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "rct_dist.cli", "transfer", "--config", str(config), "run.resume=auto", *overrides]


def _run(config: Path, *overrides: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(_command(config, *overrides), capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


def _upload_digits(bucket_url: str, stage: Path) -> None:
    make_shards("digits", bucket_url, shard_size=100, workers=1, stage=stage)


@pytest.fixture(scope="module")
def remote_digits(s3_server, tmp_path_factory) -> str:
    """The digits shards made straight into a bucket of the module's server (as a user would)."""
    s3_server.make_bucket("digits")
    env = {**os.environ, **s3_server.env()}
    out = subprocess.run([sys.executable, "-m", "rct_dist.cli", "make-shards", "--source", "digits", "--out",
                          "s3://digits/v1", "--shard-size", "100", "--workers", "1", "--stage",
                          str(tmp_path_factory.mktemp("stage"))], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert {s: v["status"] for s, v in summary["splits"].items()} == {"train": "uploaded", "test": "uploaded"}
    return "s3://digits/v1"


def test_make_shards_into_a_bucket_is_read_like_the_local_copy(remote_digits, digits_shards, s3_env, tmp_path):
    index = load_index(f"{remote_digits}/train", CacheSettings(str(tmp_path / "cache")))
    local = json.loads((digits_shards / "train" / "index.json").read_text())
    assert list(index.shards) == local["shards"] and [s.sha256 for s in index.remote.specs] == local["shard_sha256"]
    args = dict(batch_size=20, train=True, image_size=16, seed=1, workers=2, pk=(5, 4), rank=0, world=1)
    remote = make_loader(f"{remote_digits}/train", cache=CacheSettings(str(tmp_path / "cache")), **args)
    assert not list(index.directory.glob("*.tar"))  # the sample table came from the bucket: no shard scanned
    batches, reference = list(remote), list(make_loader(digits_shards / "train", **args))
    assert [b.keys for b in batches] == [b.keys for b in reference]
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches[:4], reference[:4]))
    assert remote.prefetcher.cache.stats.downloads == len(index.shards)
    # Again with the same arguments: nothing to do; with others: refused in one line.
    again = subprocess.run([sys.executable, "-m", "rct_dist.cli", "make-shards", "--source", "digits", "--out",
                            remote_digits, "--shard-size", "100"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["splits"]["train"]["status"] == "already done"
    other = subprocess.run([sys.executable, "-m", "rct_dist.cli", "make-shards", "--source", "digits", "--out",
                            remote_digits, "--shard-size", "50"], capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1
    assert "s3://digits/v1/train" in other.stderr and "--overwrite" in other.stderr


@pytest.fixture(scope="module")
def references(remote_digits, digits_shards, s3_server, tmp_path_factory) -> dict[str, Path]:
    """The same transfer run from the local digits shards and from the bucket, uninterrupted."""
    tmp = tmp_path_factory.mktemp("remote-reference")
    env = s3_server.env()
    _run(_config(tmp, "local", str(digits_shards)))
    _run(_config(tmp, "remote", remote_digits, tmp / "cache"), env=env)
    return {"local": tmp / "runs" / "local", "remote": tmp / "runs" / "remote"}


def test_transfer_from_s3_equals_the_same_run_from_local_shards(references):
    assert_same_weights(references["remote"], references["local"], rtol=0, atol=0)
    assert _final_r1(references["remote"]) == _final_r1(references["local"]) > 0.5


def test_kill_9_mid_epoch_with_a_remote_root_then_resume_equals_the_uninterrupted_run(
        references, remote_digits, s3_server, tmp_path):
    config = _config(tmp_path, "killed", remote_digits, tmp_path / "cache")
    run, env = tmp_path / "runs" / "killed", {**os.environ, "OMP_NUM_THREADS": "1", **s3_server.env()}
    proc = subprocess.Popen(_command(config), cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while _newest_checkpoint(run) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(4).uniform(0.0, 0.5))
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    resumed = _run(config, env=s3_server.env())
    assert "resumed from" in resumed.stderr + resumed.stdout
    assert_same_weights(run, references["local"], rtol=0, atol=0)
    assert _final_r1(run) == _final_r1(references["local"])


def test_a_server_stopped_mid_epoch_fails_in_one_line_and_the_run_resumes(digits_shards, tmp_path):
    with SeaweedS3(tmp_path / "server") as server:
        server.make_bucket("flaky")
        env = {**os.environ, **server.env()}
        os.environ.update(server.env())
        try:
            _upload_digits("s3://flaky/digits", tmp_path / "stage")
        finally:
            for key in server.env():
                os.environ.pop(key)
        # A cache of 4 shards of the 9: the window plan keeps downloading through the epoch.
        limit = 4 * max(json.loads((digits_shards / "train" / "index.json").read_text())["shard_bytes"]) + 1000
        config = _config(tmp_path, "flaky", "s3://flaky/digits", tmp_path / "cache", cache_limit=limit, retries=1)
        run = tmp_path / "runs" / "flaky"
        proc = subprocess.Popen(_command(config), cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        deadline = time.time() + 300
        while _newest_checkpoint(run) < 5 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before the server could be stopped"
        server.kill()
        stopped = time.time()
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 1, stderr[-3000:]
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("rct-dist transfer: s3://flaky/digits/train/") and "still failing after 2 attempts" in last
        assert "run.resume=auto" in last and time.time() - stopped < 60
        kept = _newest_checkpoint(run)
        assert kept >= 5
        server.start()
        resumed = _run(config, env=server.env())
        assert f"resumed from {run / 'checkpoints'}" in resumed.stderr + resumed.stdout
        assert (run / "export" / "model.safetensors").is_file()


def _count_downloads(url: str, cache: str, rank: int, env: dict, queue) -> None:
    os.environ.update(env)
    loader = make_loader(url, cache=CacheSettings(cache), batch_size=20, train=True, image_size=16, seed=2,
                         workers=1, pk=(5, 4), rank=rank, world=2)
    keys = [k for batch in loader for k in batch.keys]
    queue.put((rank, loader.prefetcher.cache.stats.downloads, keys))


def test_two_ranks_on_one_node_download_each_shard_of_the_bucket_once(remote_digits, s3_env, tmp_path):
    s3_server = s3_env
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    procs = [context.Process(target=_count_downloads, args=(f"{remote_digits}/train", str(tmp_path / "cache"), r,
                                                            s3_server.env(), queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    shards = len(load_index(f"{remote_digits}/train", CacheSettings(str(tmp_path / "cache"))).shards)
    assert sum(downloads for _, downloads, _ in results) == shards  # the table came from the bucket: no scan
    assert set(results[0][2]).isdisjoint(results[1][2])


def test_webdataset_shards_in_a_bucket_without_an_index(s3_env, tmp_path):
    from test_shard_cache import _foreign_shards
    import s3fs

    _foreign_shards(tmp_path / "tars")
    s3_env.make_bucket("foreign")
    fs = s3fs.S3FileSystem(endpoint_url=s3_env.endpoint)
    for path in sorted((tmp_path / "tars").glob("*.tar")):
        fs.put_file(str(path), f"foreign/other/{path.name}")
    index = load_index("s3://foreign/other", CacheSettings(str(tmp_path / "cache")))
    assert index.shards == ("part-0000.tar", "part-0001.tar", "part-0002.tar") and index.classes == 6
    batches = list(make_loader(index, batch_size=12, train=False, image_size=16, workers=0, rank=0, world=1))
    assert [b.labels.tolist() for b in batches] == [[i % 6 for i in range(12 * s, 12 * s + 12)] for s in range(3)]


def test_bad_credentials_and_a_missing_bucket_fail_in_one_line(remote_digits, s3_server, tmp_path):
    config = _config(tmp_path, "refused", remote_digits, tmp_path / "cache")
    wrong = _run(config, env={**s3_server.env(), "AWS_SECRET_ACCESS_KEY": "not-the-secret"}, check=False)
    lines = wrong.stderr.strip().splitlines()
    assert wrong.returncode == 2 and "access denied" in lines[-1] and lines[-1].startswith("rct-dist transfer: ")
    assert "s3://digits/v1/train/index.json" in lines[-1] and "not-the-secret" not in wrong.stderr
    missing = _run(config, "data.root=s3://no-such-bucket/v1", env=s3_server.env(), check=False)
    last = missing.stderr.strip().splitlines()[-1]
    assert missing.returncode == 2 and "bucket 'no-such-bucket' does not exist" in last


def test_a_cache_smaller_than_the_split_reads_the_bucket_in_windows(remote_digits, s3_env, digits_shards, tmp_path):
    sizes = json.loads((digits_shards / "train" / "index.json").read_text())["shard_bytes"]
    limit = 4 * max(sizes) + 1000  # 4 of the 9 shards: windows of 2
    cache = CacheSettings(str(tmp_path / "cache"), limit=limit)
    args = dict(batch_size=20, train=True, image_size=16, seed=4, workers=1, pk=(5, 4))
    loader = make_loader(f"{remote_digits}/train", cache=cache, rank=0, world=1, **args)
    assert loader.prefetcher.remote.window_shards() == 2
    keys = [batch.keys for batch in loader]
    stats = loader.prefetcher.cache.stats
    assert stats.evictions > 0 and stats.downloads > len(sizes) - 4  # shards left the cache and came back
    assert sum(p.stat().st_size for p in (tmp_path / "cache").glob("*/*.tar")) <= limit
    ranks = [[b.keys for b in make_loader(f"{remote_digits}/train", cache=cache, rank=r, world=2, **args)]
             for r in (0, 1)]
    assert [k for pair in zip(*ranks) for k in pair] == keys[:2 * len(ranks[0])]
