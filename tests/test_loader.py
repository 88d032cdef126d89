"""Shard loader contract: exactly-once eval, equal batches per rank, one seeded global sequence per epoch
(whatever the world size or worker count), views, P x K batches, counted skips of broken data, clear
errors; on tiny shards written here."""

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


def _valid_keys(batches: list) -> list[str]:
    return [k for b in batches for k, v in zip(b.keys, b.valid.tolist()) if v]


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
    assert all(b.images.shape == (4, 3, SIZE, SIZE) for batches in per_rank for b in batches)
    seen = _valid_keys(per_rank[0]) + _valid_keys(per_rank[1])
    assert sorted(seen) == keys


def test_train_equal_full_batches_with_uneven_shards(split):
    split_dir, keys = split
    loaders = [make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=2, rank=r, world=2)
               for r in range(2)]
    per_rank = [list(ld) for ld in loaders]
    assert [len(b) for b in per_rank] == [len(keys) // 8] * 2 == [len(ld) for ld in loaders]
    for batches in per_rank:
        for batch in batches:
            images, labels, batch_keys = batch.images, batch.labels, batch.keys
            assert images.shape == (4, 3, SIZE, SIZE) and labels.shape == (4,) and len(batch_keys) == 4
            assert all(int(k[1:]) % CLASSES == c for k, c in zip(batch_keys, labels.tolist()))
    seen = [k for batches in per_rank for b in batches for k in b.keys]
    assert len(seen) == len(set(seen)) == 40  # 10 global batches of 4, each sample at most once


def test_samples_per_epoch_and_resampled(split):
    split_dir, _ = split
    loader = make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=0,
                         resampled=True, samples_per_epoch=100, rank=0, world=1)
    assert len(list(loader)) == len(loader) == 25
    longer = make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=0, samples_per_epoch=100,
                         rank=0, world=1)  # 100 samples of a 42-sample split: three seeded passes
    keys = [k for b in longer for k in b.keys]
    assert len(keys) == 100 and Counter(Counter(keys).values()) == {2: 26, 3: 16}


def test_sequence_changes_with_epoch_not_with_rank(split):
    split_dir, _ = split
    plans = {(r, e): make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=1, epoch=e,
                                 rank=r, world=2).plan for r in range(2) for e in range(2)}
    for e in range(2):
        assert plans[0, e].unit_ids.tolist() == [0, 2, 4, 6, 8] and plans[1, e].unit_ids.tolist() == [1, 3, 5, 7, 9]
        assert set(plans[0, e].batches.ravel()).isdisjoint(plans[1, e].batches.ravel())
    assert plans[0, 0].batches.tolist() != plans[0, 1].batches.tolist()


def _rank_epochs(rank: int, world: int, split_dir: str) -> dict:
    """One gloo rank: rank and world come from torch.distributed. Workers start by spawn here (as
    under mp.spawn), which re-imports torch in each, so only the eval epoch uses them."""
    out = {}
    for epoch in range(2):
        loader = make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=0, epoch=epoch)
        out[f"keys{epoch}"] = [b.keys for b in loader]
    eval_loader = make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=2)
    out["eval_keys"] = _valid_keys(list(eval_loader))
    return out


def test_global_sequence_under_torch_distributed(split):
    """Two gloo ranks take turns on one global sequence: interleaved, their batches are one process's."""
    split_dir, keys = split
    ranks = run_ranks(_rank_epochs, 2, str(split_dir))
    for e in range(2):
        single = [b.keys for b in make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, workers=0,
                                                   epoch=e, rank=0, world=1)]
        assert len(ranks[0][f"keys{e}"]) == len(ranks[1][f"keys{e}"]) == len(keys) // 8
        interleaved = [ranks[s % 2][f"keys{e}"][s // 2] for s in range(2 * len(ranks[0][f"keys{e}"]))]
        assert interleaved == single
    assert ranks[0]["keys0"] != ranks[0]["keys1"]
    assert sorted(ranks[0]["eval_keys"] + ranks[1]["eval_keys"]) == keys


def test_views_are_different_augmentations_of_one_image(split):
    split_dir, _ = split
    first = next(iter(make_loader(split_dir, batch_size=4, train=True, image_size=SIZE,
                                  views=3, workers=0, rank=0, world=1)))
    images, keys = first.images, first.keys
    assert images.shape == (4, 3, 3, SIZE, SIZE) and len(set(keys)) == 4
    for views in images:
        assert not torch.equal(views[0], views[1]) or not torch.equal(views[1], views[2])


def test_pk_batches_hold_p_classes_of_k_images(split):
    split_dir, _ = split
    loader = make_loader(split_dir, batch_size=6, train=True, image_size=SIZE, pk=(3, 2), workers=2, rank=0, world=1)
    batches = list(loader)
    assert len(batches) == len(loader) == 6  # 6 classes x 7 images: 3 groups of 2 per class, 18 groups, 6 units
    for batch in batches:
        images, labels, keys = batch.images, batch.labels, batch.keys
        assert images.shape[0] == 6 and len(set(keys)) == 6
        assert sorted(Counter(labels.tolist()).values()) == [2, 2, 2]
    with pytest.raises(ValueError, match="pk"):
        make_loader(split_dir, batch_size=4, train=True, image_size=SIZE, pk=(3, 2), rank=0, world=1)


def test_corrupt_image_and_truncated_tar_are_skipped_and_counted(tmp_path, caplog):
    split_dir, keys = write_split(tmp_path, corrupt_key="s00004")
    truncated = split_dir / "train-000003.tar"  # 12 samples; cut inside one of its later images
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2 + 100])
    loader = make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=2, rank=0, world=1)
    with caplog.at_level(logging.WARNING):
        seen = _valid_keys(list(loader))
    skipped = loader.skipped
    assert skipped["bad_images"] == 1 and skipped["damaged_shards"] == 1
    assert "s00004" not in seen and len(seen) == len(set(seen)) == len(keys) - 1 - skipped["lost_samples"]
    lost = set(keys) - set(seen) - {"s00004"}
    assert len(lost) == skipped["lost_samples"] > 0
    assert all(k in {f"s{i:05d}" for i in range(17, 29)} for k in lost)  # only the cut shard's
    assert "skipped" in caplog.text and "6 of 12 samples readable" in caplog.text


def test_more_ranks_and_workers_than_shards(split):
    split_dir, keys = split
    loaders = [make_loader(split_dir, batch_size=2, train=True, image_size=SIZE, workers=2, rank=r, world=4)
               for r in range(4)]
    assert [len(list(ld)) for ld in loaders] == [len(keys) // 8] * 4
    evals = [make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=2, rank=r, world=8)
             for r in range(8)]
    assert sorted(k for ld in evals for k in _valid_keys(list(ld))) == keys


@pytest.mark.parametrize("train", [True, False])
def test_transform_makes_three_channels_from_grayscale(train):
    image = Image.fromarray(np.zeros((20, 30), dtype=np.uint8))  # mode "L"
    out = build_transform(SIZE, train)(image)
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
