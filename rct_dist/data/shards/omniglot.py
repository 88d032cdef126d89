"""Omniglot: background classes train, evaluation classes test, from the official zips or the npz repack.

The official zips are what users download; their PNG bytes are kept byte-for-byte. The npz repack
(`images` (C, 20, 105, 105) bool with True = white, `labels` (C, 20)) is PNG-encoded as 8-bit L.
When both forms are present the zips win, because they need no re-encoding.
"""

from __future__ import annotations

import argparse
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np

from rct_dist.data.shards.images import ArrayImage, ZipImage
from rct_dist.data.shards.plan import Listing
from rct_dist.data.shards.sources import existing_dir

PARTS = (("train", "images_background"), ("test", "images_evaluation"))


def omniglot(args: argparse.Namespace) -> list[Listing]:
    root = existing_dir(args.root, "omniglot")
    for suffix, read in ((".zip", from_zip), (".npz", from_npz)):
        files = [root / f"{stem}{suffix}" for _, stem in PARTS]
        if all(f.is_file() for f in files):
            return [read(split, f) for (split, _), f in zip(PARTS, files)]
    raise FileNotFoundError(
        f"omniglot: {root} holds neither images_background.zip + images_evaluation.zip "
        "nor images_background.npz + images_evaluation.npz"
    )


def from_zip(split: str, archive: Path) -> Listing:
    """Members `*/alphabet/character/xxxx_yy.png`: the class is `alphabet/character`."""
    with zipfile.ZipFile(archive) as zf:
        members = [m for m in zf.namelist() if m.lower().endswith(".png") and len(PurePosixPath(m).parts) >= 3]
    if not members:
        raise ValueError(f"omniglot: {archive} has no alphabet/character/*.png members")
    class_of = {m: "/".join(PurePosixPath(m).parts[-3:-1]) for m in members}
    names = sorted(set(class_of.values()))
    label = {name: index for index, name in enumerate(names)}
    items = [(label[class_of[m]], f"{archive.name}/{m}", ZipImage(archive, m)) for m in members]
    return Listing(split, names, items)


def from_npz(split: str, path: Path) -> Listing:
    """Class names are `{file stem}/{label:04d}`: the repack carries no alphabet names."""
    with np.load(path, allow_pickle=False) as npz:
        if not {"images", "labels"} <= set(npz.files):
            raise ValueError(f"omniglot: {path} lacks the arrays 'images' and 'labels' (has {npz.files})")
        images, labels = npz["images"], npz["labels"]
    if images.ndim != 4 or labels.shape != images.shape[:2]:
        raise ValueError(
            f"omniglot: {path} has images {images.shape} and labels {labels.shape}, expected (C, K, H, W) and (C, K)"
        )
    ids = np.unique(labels)
    contiguous = np.searchsorted(ids, labels)
    items = [
        (int(contiguous[c, k]), f"{path.name}:images[{c:04d},{k:02d}]", ArrayImage(images[c, k]))
        for c in range(images.shape[0])
        for k in range(images.shape[1])
    ]
    return Listing(split, [f"{path.stem}/{int(i):04d}" for i in ids], items)
