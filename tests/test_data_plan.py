"""The epoch plan is a function of (seed, epoch) and the data alone: the same tensors with 0 or 2 workers,
the same global sequence on 1 or 2 ranks, a resume that reads nothing before its point; damaged shards
(byte flips, truncation, an image that is not one) are skipped and counted per kind; nothing in a shard
is ever unpickled."""

from __future__ import annotations

import io
import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from rct_dist.data import loader as loader_module
from rct_dist.data.epoch_plan import plan_epoch
from rct_dist.data.loader import make_loader
from rct_dist.data.members import scan_shard
from test_loader import SIZE, write_split


@pytest.fixture(scope="module")
def split(tmp_path_factory) -> tuple[Path, list[str]]:
    return write_split(tmp_path_factory.mktemp("plan"))


def _batches(split_dir, **kw) -> list[tuple]:
    args = dict(batch_size=4, train=True, image_size=SIZE, views=2, workers=0, rank=0, world=1, seed=3, epoch=1)
    return list(make_loader(split_dir, **{**args, **kw}))


def _same(a: list[tuple], b: list[tuple]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x.keys == y.keys
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)


def test_same_tensors_with_zero_or_two_workers(split):
    _same(_batches(split[0], workers=0), _batches(split[0], workers=2))


def test_views_and_epochs_draw_different_augmentations(split):
    a, b = _batches(split[0], epoch=1), _batches(split[0], epoch=2)
    assert not torch.equal(a[0].images[:, 0], a[0].images[:, 1])
    assert [x.keys for x in a] != [x.keys for x in b]


def test_resume_reads_nothing_before_its_point_and_equals_the_tail(split, monkeypatch):
    full = _batches(split[0], workers=0)
    loads = []
    original = loader_module.EpochBatches._load
    monkeypatch.setattr(loader_module.EpochBatches, "_load", lambda self, i: loads.append(i) or original(self, i))
    resumed = _batches(split[0], workers=0, start_samples=12)  # 3 batches of 4 already trained on
    _same(full[3:], resumed)
    before = {int(i) for b in make_loader(split[0], batch_size=4, train=True, image_size=SIZE, workers=0, rank=0,
                                           world=1, seed=3, epoch=1).plan.batches[:3] for i in b}
    assert loads and before.isdisjoint(loads)  # not one sample of the first three batches was read


def test_resume_on_another_world_size_continues_the_same_sequence(split):
    single = _batches(split[0], views=1)
    two = [_batches(split[0], views=1, rank=r, world=2, workers=1) for r in range(2)]
    _same(single[:len(two[0]) * 2], [two[s % 2][s // 2] for s in range(2 * len(two[0]))])
    # 2 ranks trained 2 steps (16 samples), then the job resumes on 1 rank, and the other way round
    _same(single[4:], _batches(split[0], views=1, start_samples=16))
    on_two = [_batches(split[0], views=1, rank=r, world=2, start_samples=8) for r in range(2)]
    _same(single[2:2 + 2 * len(on_two[0])], [on_two[s % 2][s // 2] for s in range(2 * len(on_two[0]))])


def test_plan_errors_name_the_problem():
    shard, labels = np.zeros(40, np.int64), np.arange(40) % 4
    with pytest.raises(ValueError, match="not a whole number of batches of 4"):
        plan_epoch(shard, 1, labels, rank=0, world=1, batch_size=4, train=True, seed=0, epoch=0, start_samples=6)
    with pytest.raises(ValueError, match="past this epoch"):
        plan_epoch(shard, 1, labels, rank=0, world=1, batch_size=4, train=True, seed=0, epoch=0, start_samples=44)
    with pytest.raises(ValueError, match="not one per rank of 16"):
        plan_epoch(shard, 1, labels, rank=0, world=16, batch_size=4, train=True, seed=0, epoch=0)


class _Boom:
    """Unpickling this creates a file: the proof that something unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path(self.path).touch, ())


def test_pickle_members_are_never_unpickled(tmp_path, split):
    split_dir = tmp_path / "train"
    shutil.copytree(split[0], split_dir)
    evidence = tmp_path / "unpickled"
    shard = split_dir / "train-000000.tar"
    members = list(wds.WebDataset(str(shard), shardshuffle=False))
    with wds.TarWriter(str(shard)) as sink:
        for m in members:
            payload = pickle.dumps(_Boom(str(evidence)))
            sink.write({"__key__": m["__key__"], "png": m["png"], "cls": m["cls"], "pkl": payload, "pyd": payload,
                        "pickle": payload})
    assert len(scan_shard(str(shard), 6).keys) == len(members)
    for train in (True, False):
        loader = make_loader(split_dir, batch_size=4, train=train, image_size=SIZE, workers=0, rank=0, world=1)
        assert len(list(loader)) == len(loader) > 0
    assert not evidence.exists()


def test_random_byte_flips_are_skipped_and_counted(tmp_path, split):
    """Flip bytes all over one shard (headers and images): the epoch still yields every batch, the damage
    is counted, and every key the loader yields exists in the original split."""
    split_dir = tmp_path / "train"
    shutil.copytree(split[0], split_dir)
    shard = split_dir / "train-000003.tar"  # 12 samples
    data = bytearray(shard.read_bytes())
    rng = np.random.default_rng(7)
    for offset in rng.choice(len(data) - 1024, 40, replace=False):  # the end-of-archive zeros stay
        data[offset] ^= 0xFF
    shard.write_bytes(bytes(data))
    for train in (True, False):
        loader = make_loader(split_dir, batch_size=4, train=train, image_size=SIZE, workers=2, rank=0, world=1)
        batches = list(loader)
        assert len(batches) == len(loader) > 0
        skipped = loader.skipped
        assert sum(skipped.values()) > 0, skipped
        assert {k for b in batches for k in b.keys} <= set(split[1])


def test_image_that_is_not_an_image_is_replaced_within_its_class(tmp_path):
    split_dir, keys = write_split(tmp_path, corrupt_key="s00004")
    loader = make_loader(split_dir, batch_size=6, train=True, image_size=SIZE, pk=(3, 2), workers=0, rank=0, world=1)
    plan_ids = [int(i) for b in loader.plan.batches for i in b]
    bad = loader.table.keys.index("s00004")
    batches = list(loader)
    assert loader.skipped == {"damaged_shards": 0, "lost_samples": 0, "bad_images": plan_ids.count(bad)} \
        and plan_ids.count(bad) == 1
    for batch in batches:
        assert sorted(Counter(batch.labels.tolist()).values()) == [2, 2, 2]  # still P x K
        assert "s00004" not in batch.keys and batch.images.isfinite().all()


def test_truncated_shard_loses_only_what_lies_behind_the_cut(tmp_path):
    split_dir, keys = write_split(tmp_path)
    shard = split_dir / "train-000001.tar"  # 9 samples
    full = scan_shard(str(shard), 6)
    cut = int(full.image[5, 0]) + 10  # inside the 6th sample's image
    shard.write_bytes(shard.read_bytes()[:cut])
    table = scan_shard(str(shard), 6)
    assert not table.complete and "truncated" in table.error
    assert table.keys == full.keys[:5]
    loader = make_loader(split_dir, batch_size=4, train=False, image_size=SIZE, workers=0, rank=0, world=1)
    seen = {k for b in loader for k in b.only_valid().keys}
    assert loader.skipped == {"damaged_shards": 1, "lost_samples": 4, "bad_images": 0}
    assert set(keys) - seen == set(full.keys[5:])


@pytest.mark.parametrize("fmt", ["gnu", "pax", "ustar"])
def test_tar_headers_read_like_tarfile(tmp_path, fmt):
    """The header reader against Python's tarfile: long names (GNU `L`, pax `path`), ustar prefixes,
    directories, empty files; a flipped header byte is refused by its checksum."""
    import os
    import tarfile

    from rct_dist.data.members import DamagedTar, tar_members

    path = tmp_path / f"{fmt}.tar"
    names = ["a.png", "d/" + "x" * 120 + ".cls", "p" * 90 + "/" + "q" * 60 + ".png", "empty.txt"]
    if fmt == "ustar":
        names = [n for n in names if len(n) <= 100 or "/" in n[-100:]]
    with tarfile.open(path, "w", format={"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT,
                                        "ustar": tarfile.USTAR_FORMAT}[fmt]) as archive:
        archive.addfile(_dir_info())
        for i, name in enumerate(names):
            data = bytes([i]) * (700 * i)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as archive:
        expected = [(m.name, m.offset_data, m.size) for m in archive.getmembers() if m.isfile()]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(tar_members(fd, path.stat().st_size)) == expected
    finally:
        os.close(fd)
    data = bytearray(path.read_bytes())
    data[expected[1][1] - 512 + 10] ^= 0x01  # the second file's own header
    path.write_bytes(bytes(data))
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(DamagedTar, match="checksum"):
            list(tar_members(fd, path.stat().st_size))
    finally:
        os.close(fd)


def _dir_info():
    import tarfile

    info = tarfile.TarInfo("folder")
    info.type = tarfile.DIRTYPE
    return info
