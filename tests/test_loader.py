"""Shard loader contract: exactly-once eval, equal batches per rank, seeded shard order, views,
P x K batches, counted skips of broken data, clear errors; on tiny shards written here."""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from multiprocess import run_ranks
from rct_dist.data.loader import INDEX_FORMAT, ShardIndex, make_loader
from rct_dist.data.transforms import build_transform

SIZES = (3, 9, 5, 12, 2, 7, 4)  # uneven on purpose: 42 samples in 7 shards
CLASSES = 6
SIZE = 16


def _png(rng: np.random.Generator, gray: bool) -> bytes:
    shape = (SIZE, SIZE) if gray else (SIZE, SIZE, 3)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_split(root: Path, sizes=SIZES, corrupt_key: str | None = None) -> tuple[Path, list[str]]:
    """Shards plus index.json in the fixed format; every 5th image is grayscale. Returns (dir, keys)."""
    split_dir = root / "train"
    split_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names, keys, i = [], [], 0
    for s, n in enumerate(sizes):
        names.append(f"train-{s:06d}.tar")
        with wds.TarWriter(str(split_dir / names[-1])) as sink:
            for _ in range(n):
                key = f"s{i:05d}"
                image = b"not a png" if key == corrupt_key else _png(rng, gray=i % 5 == 0)
                sink.write({"__key__": key, "png": image, "cls": str(i % CLASSES).encode(), "json": {"i": i}})
                keys.append(key)
                i += 1
    index = {"format": INDEX_FORMAT, "split": "train", "shards": names, "shard_samples": list(sizes),
             "samples": sum(sizes), "classes": CLASSES, "class_names": [f"c{c}" for c in range(CLASSES)],
             "source": "test", "made_by": "test"}
    (split_dir / "index.json").write_text(json.dumps(index))
    return split_dir, keys


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, list[str]]:
    return write_split(tmp_path_factory.mktemp("shards"))


def _valid_keys(batches: list[tuple]) -> list[str]:
    return [k for _, _, keys, valid in batches for k, v in zip(keys, valid.tolist()) if v]


def test_index_errors(tmp_path, split):
    with pytest.raises(FileNotFoundError, match="no shard index"):
        ShardIndex.load(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ValueError, match="format"):
        ShardIndex.load(tmp_path)
    meta = json.loads((split[0] / "index.json").read_text())
    (tmp_path / "index.json").write_text(json.dumps(meta))  # shards are not next to this copy
    with pytest.raises(FileNotFoundError, match="missing shard"):
        ShardIndex.load(tmp_path / "index.json")


def test_eval_every_sample_once_across_ranks_and_workers(split):
    split_dir, keys = split
    loaders = [make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=2, rank=r, world=2)
               for r in range(2)]
    per_rank = [list(ld) for ld in loaders]
    assert len(per_rank[0]) == len(per_rank[1]) == len(loaders[0]) == len(loaders[1])
    assert all(images.shape == (4, 3, SIZE, SIZE) for batches in per_rank for images, *_ in batches)
    seen = _valid_keys(per_rank[0]) + _valid_keys(per_rank[1])
    assert sorted(seen) == keys


def test_train_equal_full_batches_with_uneven_shards(split):
    split_dir, keys = split
    loaders = [make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=2, rank=r, world=2)
               for r in range(2)]
    shard_samples = dict(zip(ShardIndex.load(split_dir).shards, SIZES))
    assert [sum(shard_samples[s] for s in ld.plan.shards) for ld in loaders] != [21, 21]  # really uneven
    per_rank = [list(ld) for ld in loaders]
    assert [len(b) for b in per_rank] == [len(keys) // 8] * 2 == [len(ld) for ld in loaders]
    for batches in per_rank:
        for images, labels, batch_keys in batches:
            assert images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4,) and len(batch_keys) == 4
            assert all(int(k[1:]) % CLASSES == c for k, c in zip(batch_keys, labels.tolist()))


def test_samples_per_epoch_and_resampled(split):
    split_dir, _ = split
    loader = make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=0,
                         resampled=True, samples_per_epoch=100, rank=0, world=1)
    assert len(list(loader)) == len(loader) == 25


def test_shard_order_changes_with_epoch_not_with_rank(split):
    split_dir, _ = split
    plans = {(r, e): make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=1, epoch=e,
                                 rank=r, world=2).plan for r in range(2) for e in range(2)}
    for e in range(2):
        assert plans[0, e].order == plans[1, e].order
        assert set(plans[0, e].shards).isdisjoint(plans[1, e].shards)
    assert plans[0, 0].order != plans[0, 1].order


def _rank_epochs(rank: int, world: int, split_dir: str) -> dict:
    """One gloo rank: rank and world come from torch.distributed. Workers start by spawn here (as
    under mp.spawn), which re-imports torch in each, so only the eval epoch uses them."""
    out = {}
    for epoch in range(2):
        loader = make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=0, epoch=epoch)
        out[f"order{epoch}"] = list(loader.plan.order)
        out[f"shards{epoch}"] = list(loader.plan.shards)
        out[f"batches{epoch}"] = len(list(loader))
    eval_loader = make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=2)
    out["eval_keys"] = _valid_keys(list(eval_loader))
    return out


def test_split_by_node_under_torch_distributed(split):
    split_dir, keys = split
    ranks = run_ranks(_rank_epochs, 2, str(split_dir))
    for e in range(2):
        assert ranks[0][f"order{e}"] == ranks[1][f"order{e}"]
        assert ranks[0][f"shards{e}"] == ranks[0][f"order{e}"][0::2]
        assert ranks[1][f"shards{e}"] == ranks[1][f"order{e}"][1::2]
        assert ranks[0][f"batches{e}"] == ranks[1][f"batches{e}"] == len(keys) // 8
    assert ranks[0]["order0"] != ranks[0]["order1"]
    assert sorted(ranks[0]["eval_keys"] + ranks[1]["eval_keys"]) == keys


def test_views_are_different_augmentations_of_one_image(split):
    split_dir, _ = split
    images, labels, keys = next(iter(make_loader(split_dir, batch_size=4, train=True, image_size=SIZE,
                                                 views=3, workers=0, rank=0, world=1)))
    assert images.shape == (4, 3, 3, SIZE, SIZE) and len(set(keys)) == 4
    for views in images:
        assert not torch.equal(views[0], views[1]) or not torch.equal(views[1], views[2])


def test_pk_batches_hold_p_classes_of_k_images(split):
    split_dir, _ = split
    loader = make_loader(split_dir, batch_size=6, train=True, image_size=SIZE, pk=(3, 2), shuffle_buffer=12,
                         workers=2, rank=0, world=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 42 // 6
    for images, labels, keys in batches:
        assert images.shape[0] == 6 and len(set(keys)) == 6
        assert sorted(Counter(labels.tolist()).values()) == [2, 2, 2]
    with pytest.raises(ValueError, match="pk"):
        make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, pk=(3, 2), rank=0, world=1)


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog):
    split_dir, keys = write_split(tmp_path, corrupt_key="s00004")
    truncated = split_dir / "train-000003.tar"  # 12 samples; cut inside one of its later images
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2 + 100])
    loader = make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=2, rank=0, world=1)
    with caplog.at_level(logging.WARNING, logger="rct_dist.data.loader"):
        seen = _valid_keys(list(loader))
    assert loader.skipped["samples"] >= 1 and loader.skipped["read_errors"] >= 1
    assert "s00004" not in seen and len(seen) == len(set(seen)) < len(keys) - 1
    lost = set(keys) - set(seen) - {"s00004"}
    assert lost and all(k in {f"s{i:05d}" for i in range(17, 29)} for k in lost)  # only the cut shard's
    assert "skipped" in caplog.text


def test_too_few_shards_for_ranks_times_workers(split):
    split_dir, _ = split
    with pytest.raises(ValueError, match="7 shards but world_size x workers = 4 x 2"):
        make_loader(split_dir, batch_size=2, train=True, image_size=SIZE, workers=2, rank=0, world=4)
    make_loader(split_dir, batch_size=2, train=True, image_size=SIZE, workers=2, rank=0, world=4, resampled=True)


@pytest.mark.parametrize("train", [True, False])
def test_transform_makes_three_channels_from_grayscale(train):
    image = Image.fromarray(np.zeros((20, 30), dtype=np.uint8))  # mode "L"
    out = build_transform(SIZE, train)(image)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
