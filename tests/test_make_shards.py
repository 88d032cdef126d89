"""`make-shards`: every source into webdataset shards, read back with tarfile (independent of the loader)."""

from __future__ import annotations

import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from fake_files import fake_cub, image_bytes, write_files
from sklearn.datasets import load_digits

import rct_dist
from rct_dist.data.shards import images, make_shards

OMNIGLOT = Path(os.environ.get("RCT_DIST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / "omniglot"


def make(out: Path, source: str, **keywords) -> dict:
    return make_shards(source, out, **{"workers": 1, **keywords})


def read_split(split_dir: Path) -> tuple[dict, dict[str, dict[str, bytes]]]:
    """index.json and {key: {extension: bytes}}, asserting each (key, extension) occurs once."""
    index = json.loads((split_dir / "index.json").read_text())
    samples: dict[str, dict[str, bytes]] = {}
    for name, count in zip(index["shards"], index["shard_samples"]):
        with tarfile.open(split_dir / name) as tar:
            members = tar.getmembers()
            assert len({m.name.split(".")[0] for m in members}) == count
            for member in members:
                key, ext = member.name.split(".", 1)
                assert ext not in samples.setdefault(key, {})
                samples[key][ext] = tar.extractfile(member).read()
    assert len(samples) == index["samples"] == sum(index["shard_samples"])
    return index, samples


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "L"
        return np.asarray(image)


def test_digits_counts_index_pixels_and_determinism(tmp_path):
    summary = make(tmp_path / "a", "digits", shard_size=300, workers=2)
    assert {s: v["samples"] for s, v in summary["splits"].items()} == {"train": 901, "test": 896}
    source = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    names = {}
    for split, count, first in (("train", 901, 0), ("test", 896, 5)):
        index, samples = read_split(tmp_path / "a" / split)
        assert index["format"] == "rct-dist-shards/1" and index["split"] == split and index["source"] == "digits"
        assert index["samples"] == count and index["shard_samples"][0] == 300
        assert len(index["shards"]) == {"train": 4, "test": 3}[split]
        assert index["shards"] == [f"{split}-{i:06d}.tar" for i in range(len(index["shards"]))]
        assert index["classes"] == 5 and index["class_names"] == [str(d) for d in range(first, first + 5)]
        assert index["made_by"]["version"] == rct_dist.__version__ and index["made_by"]["args"]["source"] == "digits"
        assert sorted(samples) == [f"{split}-{i:08d}" for i in range(count)]
        labels = set()
        for sample in samples.values():
            label, meta = int(sample["cls"].decode("ascii")), json.loads(sample["json"])
            labels.add(label)
            assert meta["class"] == index["class_names"][label]
            np.testing.assert_array_equal(pixels(sample["png"]), source[int(meta["source"].split("/")[1])])
        assert labels == set(range(5))
        names[split] = set(index["class_names"])
    assert not names["train"] & names["test"]
    make(tmp_path / "b", "digits", shard_size=300)  # in-process this time
    for split in ("train", "test"):
        for name in json.loads((tmp_path / "a" / split / "index.json").read_text())["shards"]:
            assert (tmp_path / "a" / split / name).read_bytes() == (tmp_path / "b" / split / name).read_bytes()


@pytest.mark.skipif(not (OMNIGLOT / "images_background.npz").is_file(), reason=f"Omniglot npz not found in {OMNIGLOT}")
def test_omniglot_npz_limited_classes_match_source_pixels(tmp_path):
    summary = make(tmp_path, "omniglot", root=OMNIGLOT, limit_classes=3)
    counts = {s: (v["samples"], v["classes"]) for s, v in summary["splits"].items()}
    assert counts == {"train": (60, 3), "test": (60, 3)}
    for split, stem in (("train", "images_background"), ("test", "images_evaluation")):
        index, samples = read_split(tmp_path / split)
        assert index["class_names"] == [f"{stem}/{c:04d}" for c in range(3)]
        with np.load(OMNIGLOT / f"{stem}.npz", allow_pickle=False) as npz:
            source = npz["images"][:3]
        for key in (f"{split}-00000000", f"{split}-00000031", f"{split}-00000059"):
            meta = json.loads(samples[key]["json"])
            c, k = (int(v) for v in meta["source"].split("[")[1].rstrip("]").split(","))
            assert int(samples[key]["cls"]) == c
            np.testing.assert_array_equal(pixels(samples[key]["png"]), np.where(source[c, k], 255, 0))


def test_omniglot_zip_keeps_png_bytes(tmp_path):
    root, kept = tmp_path / "omniglot", {}
    root.mkdir()
    for n, stem in enumerate(("images_background", "images_evaluation")):
        with zipfile.ZipFile(root / f"{stem}.zip", "w") as zf:
            for a, c, k in np.ndindex(2, 2, 2):
                member = f"{stem}/Alphabet_{n}{a}/character{c + 1:02d}/{c:04d}_{k + 1:02d}.png"
                kept[f"{stem}.zip/{member}"] = image_bytes("PNG", len(kept))
                zf.writestr(member, kept[f"{stem}.zip/{member}"])
    make(tmp_path / "out", "omniglot", root=root)
    names = {}
    for split in ("train", "test"):
        index, samples = read_split(tmp_path / "out" / split)
        assert index["samples"] == 8 and index["classes"] == 4
        for sample in samples.values():
            assert sample["png"] == kept[json.loads(sample["json"])["source"]]
        names[split] = set(index["class_names"])
    assert names["train"] == {"Alphabet_00/character01", "Alphabet_00/character02", "Alphabet_01/character01",
                              "Alphabet_01/character02"}
    assert not names["train"] & names["test"]


def test_folder_half_split_keeps_bytes_and_skips_corrupt_files(tmp_path):
    root, files = tmp_path / "images", {}
    for c, cls in enumerate(("ant", "bee", "cat", "dog", "eel")):
        for k, ext in enumerate((".jpg", ".png", ".JPEG")):
            files[f"{cls}/{k}{ext}"] = image_bytes("PNG" if ext == ".png" else "JPEG", 10 * c + k)
    files["bee/garbage.jpg"] = b"not an image"
    files["dog/truncated.jpg"] = files["dog/0.jpg"][:200]
    files["dog/notes.txt"] = "ignored"
    write_files(root, files)
    (root / "empty_class").mkdir()
    summary = make(tmp_path / "out", "folder", root=root)
    assert {s: (v["samples"], v["skipped"]) for s, v in summary["splits"].items()} == {"train": (9, 1), "test": (6, 1)}
    train, train_samples = read_split(tmp_path / "out" / "train")
    test, test_samples = read_split(tmp_path / "out" / "test")
    assert train["class_names"] == ["ant", "bee", "cat"] and test["class_names"] == ["dog", "eel"]
    assert [s["source"] for s in train["skipped"]] == ["bee/garbage.jpg"]
    assert [s["source"] for s in test["skipped"]] == ["dog/truncated.jpg"]
    for sample in [*train_samples.values(), *test_samples.values()]:
        meta = json.loads(sample["json"])
        (ext,) = set(sample) - {"cls", "json"}
        assert ext == ("png" if meta["source"].endswith(".png") else "jpg")
        assert sample[ext] == files[meta["source"]]
    one = make(tmp_path / "one", "folder", root=root, split_classes="none", split="all")
    assert list(one["splits"]) == ["all"] and one["splits"]["all"]["samples"] == 15


@pytest.mark.parametrize(
    "source, layout, message",
    [
        ("folder", None, "does not exist"),
        ("folder", {"a/readme.txt": "no images"}, "no class subfolders"),
        ("cub", {"images.txt": "1 a/1.jpg\n"}, "missing metadata file image_class_labels.txt"),
        ("cars", {}, "missing metadata file cars_annos.mat"),
        ("sop", {"Ebay_train.txt": "image_id class_id super_class_id path\n"}, "missing metadata file Ebay_test.txt"),
        ("omniglot", {"images_background.npz": ""}, "holds neither"),
    ],
)
def test_errors_name_the_problem(tmp_path, source, layout, message):
    if layout is not None:
        (tmp_path / "root").mkdir()
        write_files(tmp_path / "root", layout)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        make(tmp_path / "out", source, root=tmp_path / "root")
    assert not (tmp_path / "out").exists()


def check_disjoint_split(out: Path, expected: dict[str, tuple[int, int]]) -> None:
    indexes = {split: read_split(out / split)[0] for split in expected}
    assert {s: (i["samples"], i["classes"]) for s, i in indexes.items()} == expected
    assert not set(indexes["train"]["class_names"]) & set(indexes["test"]["class_names"])


def test_cub_layout(tmp_path):
    fake_cub(tmp_path / "cub")
    make(tmp_path / "out", "cub", root=tmp_path / "cub")
    check_disjoint_split(tmp_path / "out", {"train": (4, 2), "test": (4, 2)})
    assert read_split(tmp_path / "out" / "test")[0]["class_names"] == ["101.Bird_101", "102.Bird_102"]


def test_cars_layout(tmp_path):
    classes = [97, 98, 98, 99, 100, 100, 100]
    paths = [f"car_ims/{n:06d}.jpg" for n in range(1, len(classes) + 1)]
    write_files(tmp_path / "cars", {p: image_bytes("JPEG", n) for n, p in enumerate(paths)})
    annotations = np.array(
        [(p, c, 0) for p, c in zip(paths, classes)], dtype=[("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    )
    names = np.array([f"Car {i}" for i in range(1, 101)], dtype=object)
    mat = {"annotations": annotations[None], "class_names": names[None]}  # 1 x N like the real file
    scipy.io.savemat(tmp_path / "cars" / "cars_annos.mat", mat)
    make(tmp_path / "out", "cars", root=tmp_path / "cars")
    check_disjoint_split(tmp_path / "out", {"train": (3, 2), "test": (4, 2)})
    assert read_split(tmp_path / "out" / "train")[0]["class_names"] == ["Car 97", "Car 98"]


def test_sop_layout(tmp_path):
    header, files = "image_id class_id super_class_id path\n", {}
    for split, rows in (("train", [(1, 1, "bicycle_final"), (2, 1, "bicycle_final"), (3, 2, "cabinet_final")]),
                        ("test", [(4, 3, "chair_final"), (5, 4, "mug_final")])):
        files[f"Ebay_{split}.txt"] = header + "".join(f"{n} {c} 1 {s}/{n}_0.JPG\n" for n, c, s in rows)
        files.update({f"{s}/{n}_0.JPG": image_bytes("JPEG", n) for n, _, s in rows})
    write_files(tmp_path / "sop", files)
    make(tmp_path / "out", "sop", root=tmp_path / "sop")
    check_disjoint_split(tmp_path / "out", {"train": (3, 2), "test": (2, 2)})


def test_rerun_is_a_noop_and_other_arguments_need_overwrite(tmp_path):
    out, args = tmp_path / "out", {"source": "digits", "shard_size": 300}
    make(out, **args)
    shard = out / "train" / "train-000003.tar"
    stamp = shard.stat().st_mtime_ns
    stale = out / "train" / ".train-000001.tar.tmp-99999"
    stale.write_bytes(b"half")
    again = make(out, **args)
    assert {v["status"] for v in again["splits"].values()} == {"already done"}
    assert shard.stat().st_mtime_ns == stamp and not stale.exists()
    with pytest.raises(FileExistsError, match="--overwrite"):
        make(out, "digits", shard_size=500)
    assert shard.exists() and read_split(out / "train")[0]["made_by"]["args"]["shard_size"] == 300
    (out / "test" / "test-000001.tar").unlink()  # same arguments, shard lost: rewritten without --overwrite
    assert make(out, **args)["splits"]["test"]["status"] == "written" and shard.stat().st_mtime_ns == stamp
    make(out, "digits", shard_size=500, overwrite=True)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["index.json", "train-000000.tar", "train-000001.tar"]
    assert read_split(out / "train")[0]["shard_samples"] == [500, 401]


def test_crash_mid_write_leaves_no_partial_shard_and_no_index(tmp_path, monkeypatch):
    encode, calls = images.ArrayImage.encode, []

    def failing(self):
        calls.append(1)
        if len(calls) == 450:  # in the middle of the second shard
            raise RuntimeError("simulated crash")
        return encode(self)

    monkeypatch.setattr(images.ArrayImage, "encode", failing)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(out, "digits", shard_size=300)
    assert sorted(p.name for p in (out / "train").iterdir()) == ["train-000000.tar"]
    with tarfile.open(out / "train" / "train-000000.tar") as tar:
        assert len(tar.getmembers()) == 3 * 300  # cls, json, png
    monkeypatch.setattr(images.ArrayImage, "encode", encode)
    summary = make(out, "digits", shard_size=300)  # resumes: no index, so nothing to protect
    assert summary["splits"]["train"] == {"status": "written", "samples": 901, "classes": 5, "shards": 4, "skipped": 0}


def test_samples_are_laid_out_in_shuffled_same_class_runs(tmp_path):
    """Every full shard mixes classes (each rank and shuffle buffer sees many), in runs of <= 4 of one class."""
    make(tmp_path, "digits", shard_size=100)
    labels = []
    for shard in sorted((tmp_path / "train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            shard_labels = [int(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".cls")]
        assert len(shard_labels) < 100 or len(set(shard_labels)) == 5, shard
        labels += shard_labels
    runs, length = [], 1
    for a, b in zip(labels, labels[1:]):
        runs, length = (runs, length + 1) if a == b else (runs + [length], 1)
    assert max(runs) < 45  # runs of 4, some adjacent by chance; class order would give 180
    assert sorted(labels) != labels
