"""`make-shards --val-classes`: a validation split of held-out training classes, disjoint from train and test."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from fake_files import fake_cub

from rct_dist.data.loader import ShardIndex, make_loader
from rct_dist import cli
from rct_dist.data.shards import make_shards
from rct_dist.data.shards.plan import Listing, hold_out

PACKED = Path(__file__).resolve().parents[1] / "rct_dist" / "demo_data"  # holds omniglot28.npz


def make(out: Path, source: str, **keywords) -> dict:
    return make_shards(source, out, **{"workers": 1, **keywords})


def read_split(split_dir: Path) -> tuple[dict, dict[str, tuple[int, dict]]]:
    """index.json and {key: (label, json metadata)}, read with tarfile (independent of the loader)."""
    index = json.loads((split_dir / "index.json").read_text())
    samples: dict[str, tuple[int, dict]] = {}
    for name in index["shards"]:
        with tarfile.open(split_dir / name) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for member in members:
            key, ext = member.split(".", 1)
            if ext == "cls":
                assert key not in samples
                samples[key] = (int(members[member]), json.loads(members[f"{key}.json"]))
    assert len(samples) == index["samples"]
    return index, samples


def check_split(out: Path, split: str) -> tuple[dict, dict[str, tuple[int, dict]]]:
    """Labels are 0..C-1, each naming its class in index.json, and every class has samples."""
    index, samples = read_split(out / split)
    assert index["split"] == split and index["classes"] == len(index["class_names"])
    for key, (label, meta) in samples.items():
        assert key.startswith(f"{split}-") and meta["class"] == index["class_names"][label]
    assert {label for label, _ in samples.values()} == set(range(index["classes"]))
    return index, samples


def sources_by_class(samples: dict[str, tuple[int, dict]]) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for _, meta in samples.values():
        found.setdefault(meta["class"], set()).add(meta["source"])
    return found


def test_digits_val_split_partitions_the_training_classes(tmp_path):
    whole = make(tmp_path / "whole", "digits", shard_size=200)
    summary = make(tmp_path / "out", "digits", shard_size=200, val_classes=2)
    assert list(summary["splits"]) == ["train", "test", "val"] and list(whole["splits"]) == ["train", "test"]
    assert {s: v["classes"] for s, v in summary["splits"].items()} == {"train": 3, "test": 5, "val": 2}
    assert summary["splits"]["train"]["samples"] + summary["splits"]["val"]["samples"] == 901
    splits = {split: check_split(tmp_path / "out", split) for split in ("train", "val", "test")}
    before = {split: check_split(tmp_path / "whole", split) for split in ("train", "test")}
    names = {split: set(index["class_names"]) for split, (index, _) in splits.items()}
    assert not names["train"] & names["val"] and not names["train"] & names["test"] and not names["val"] & names["test"]
    assert names["train"] | names["val"] | names["test"] == {str(d) for d in range(10)}
    assert names["train"] | names["val"] == set(before["train"][0]["class_names"])
    # The same images, each class's complete: held-out classes move with all their samples.
    assert sources_by_class({**splits["train"][1], **splits["val"][1]}) == sources_by_class(before["train"][1])
    assert sources_by_class(splits["test"][1]) == sources_by_class(before["test"][1])
    keys = [key for _, samples in splits.values() for key in samples]
    assert len(keys) == len(set(keys)) == 1797
    # Each split lists its classes in the original order (labels follow it).
    for split in ("train", "val"):
        assert splits[split][0]["class_names"] == sorted(names[split])
    val_args = splits["val"][0]["made_by"]["args"]
    assert (val_args["val_classes"], val_args["val_split"], val_args["val_seed"]) == (2, "val", 0)
    assert all(index["made_by"]["args"] == val_args for index, _ in splits.values())
    assert "val_classes" not in before["train"][0]["made_by"]["args"]  # shards made without it are still reused


@pytest.mark.skipif(not (PACKED / "omniglot28.npz").is_file(), reason=f"omniglot28.npz not found in {PACKED}")
def test_omniglot_val_after_limit_classes_seeded_and_readable(tmp_path):
    base = {"source": "omniglot", "root": PACKED, "limit_classes": 12, "shard_size": 40}
    summary = make(tmp_path / "a", **base, val_classes=4, val_split="dev")
    counts = {s: (v["samples"], v["classes"]) for s, v in summary["splits"].items()}
    assert counts == {"train": (160, 8), "test": (240, 12), "dev": (80, 4)}
    first = [f"background/{c:04d}" for c in range(12)]  # the train (background) classes --limit-classes keeps
    train, dev = (check_split(tmp_path / "a", split)[0] for split in ("train", "dev"))
    test = check_split(tmp_path / "a", "test")[0]
    assert sorted(train["class_names"] + dev["class_names"]) == first and not set(train["class_names"]) & set(
        dev["class_names"]
    )
    assert test["class_names"] == [f"evaluation/{c:04d}" for c in range(12)]
    assert not (tmp_path / "a" / "val").exists()

    # Deterministic: the same seed gives the same classes and identical bytes; another seed other classes.
    make(tmp_path / "b", **base, val_classes=4, val_split="dev", workers=2)
    for split in ("train", "dev", "test"):
        for name in json.loads((tmp_path / "a" / split / "index.json").read_text())["shards"]:
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()
    make(tmp_path / "c", **base, val_classes=4, val_split="dev", val_seed=1)
    other = json.loads((tmp_path / "c" / "dev" / "index.json").read_text())["class_names"]
    assert len(other) == 4 and other != dev["class_names"] and set(other) <= set(first)

    # The held-out split reads back through the loader, every sample once, labels 0..3.
    index = ShardIndex.load(tmp_path / "a" / "dev")
    assert (index.split, index.classes, index.samples, index.class_names) == ("dev", 4, 80, tuple(dev["class_names"]))
    loader = make_loader(index, batch_size=16, train=False, image_size=28, workers=0, rank=0, world=1)
    labels, keys = [], []
    for batch in loader:
        images, batch_labels, batch_keys, valid = batch.images, batch.labels, batch.keys, batch.valid
        assert images.shape[1:] == (3, 28, 28)
        labels += batch_labels[valid].tolist()
        keys += [key for key, ok in zip(batch_keys, valid.tolist()) if ok]
    assert len(keys) == len(set(keys)) == 80 and all(key.startswith("dev-") for key in keys)
    assert sorted(set(labels)) == [0, 1, 2, 3] and len(labels) == 80
    train_loader = make_loader(tmp_path / "a" / "train", batch_size=8, train=True, image_size=28, workers=0,
                               rank=0, world=1, pk=(4, 2))
    assert all(isinstance(b.labels, torch.Tensor) and int(b.labels.max()) < 8 for b in train_loader)


def test_hold_out_relabels_both_parts_contiguously():
    items = [(label, f"s{n}", None) for n, label in enumerate([0, 1, 2, 3, 4, 5] * 2)]
    listing = Listing("train", list("abcdef"), items)
    rest, held = hold_out(listing, 2, seed=3, split="val")
    assert held.split == "val" and rest.split == "train" and len(held.class_names) == 2
    assert sorted(rest.class_names + held.class_names) == list("abcdef")
    for part in (rest, held):
        assert part.class_names == sorted(part.class_names)
        assert {label for label, _, _ in part.items} == set(range(len(part.class_names)))
        for label, source, _ in part.items:  # each sample keeps its class
            assert part.class_names[label] == "abcdef"[int(source[1:]) % 6]
    assert hold_out(listing, 2, seed=3, split="val") == (rest, held)


def test_cub_and_keyword_function(tmp_path):
    fake_cub(tmp_path / "cub")  # train classes 99, 100; test 101, 102
    summary = make_shards("cub", tmp_path / "out", root=tmp_path / "cub", val_classes=1, workers=1)
    assert {s: (v["samples"], v["classes"]) for s, v in summary["splits"].items()} == {
        "train": (2, 1), "test": (4, 2), "val": (2, 1)
    }
    names = [check_split(tmp_path / "out", s)[0]["class_names"] for s in ("train", "val")]
    assert sorted(names[0] + names[1]) == ["099.Bird_99", "100.Bird_100"]
    again = make(tmp_path / "out", "cub", root=tmp_path / "cub", val_classes=1)
    assert {v["status"] for v in again["splits"].values()} == {"already done"}


def test_other_val_arguments_need_overwrite_and_stale_val_splits_go(tmp_path):
    out, args = tmp_path / "out", {"source": "digits", "shard_size": 300}
    make(out, **args, val_classes=2)
    for other in ({"val_classes": 1}, {"val_classes": 2, "val_seed": 5}, {}):
        with pytest.raises(FileExistsError, match="--overwrite"):
            make(out, **args, **other)
    assert json.loads((out / "val" / "index.json").read_text())["classes"] == 2
    # Renamed: the old "val" split would stay beside the new train, its classes possibly in it; --overwrite removes it.
    summary = make(out, **args, val_classes=2, val_split="dev", overwrite=True)
    assert list(summary["splits"]) == ["train", "test", "dev"]
    assert sorted(p.name for p in out.iterdir()) == ["dev", "test", "train"]
    with pytest.raises(FileExistsError, match=r"out/dev: validation split\(s\) this run would leave behind"):
        make(out, **args)
    assert (out / "dev" / "index.json").is_file()
    summary = make(out, **args, overwrite=True)
    assert list(summary["splits"]) == ["train", "test"] and summary["splits"]["train"]["classes"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["test", "train"]


@pytest.mark.parametrize(
    "keywords, message",
    [
        ({"val_classes": 5}, r"validation split larger than the training classes \(5 >= 5 training classes\)"),
        ({"limit_classes": 3, "val_classes": 3},
         r"larger than the training classes \(3 >= 3 training classes, after --limit-classes 3\)"),
        ({"val_classes": 2, "val_split": "test"}, "--val-split test: this run already writes"),
        ({"val_classes": 2, "val_split": "train"}, "--val-split train: this run already writes"),
        ({"val_classes": 2, "val_split": "a/b"}, "--val-split 'a/b': use letters"),
        ({"val_seed": 3}, "only with --val-classes"),
    ],
)
def test_bad_val_arguments_are_refused_before_writing(tmp_path, keywords, message):
    with pytest.raises(ValueError, match=message):
        make(tmp_path / "out", "digits", **keywords)
    assert not (tmp_path / "out").exists()


def test_val_classes_below_one_and_no_train_split(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["make-shards", "--source", "digits", "--out", str(tmp_path), "--val-classes", "0"])
    assert "--val-classes: expected an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--val-classes must be an integer >= 1, got 0"):
        make_shards("digits", tmp_path / "out", val_classes=0)
    (tmp_path / "images" / "ant").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"from the train split, but this run writes only 'all'"):
        make_shards("folder", tmp_path / "out", root=tmp_path / "images", split_classes="none", split="all",
                    val_classes=1)
    assert not (tmp_path / "out").exists()


def test_help_explains_the_order_with_limit_classes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["make-shards", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--limit-classes 100 --val-classes 20 gives 80 train + 20 val classes" in text
    assert "--val-split NAME" in text and "--val-seed SEED" in text
