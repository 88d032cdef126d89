"""Omniglot: background classes train, evaluation classes test, from the official zips, the npz repack or
the small packed copy that ships with the package (`rct_dist/demo_data/omniglot28.npz`, for the demo).

The official zips are what users download; their PNG bytes are kept byte-for-byte. The npz repack
(`images` (C, 20, 105, 105) bool with True = white, `labels` (C, 20)) is PNG-encoded as 8-bit L.
The packed copy (`background` and `evaluation`, (C, 20, S*S/8) uint8 from np.packbits, bit 1 = ink,
and `image_size` = S) is unpacked and PNG-encoded the same way. When several forms are present the zips
win, because they need no re-encoding, then the full-size repack, then the packed copy.
"""

from __future__ import annotations

import zipfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from rct_dist.data.shards.images import ArrayImage, ZipImage
from rct_dist.data.shards.plan import Listing
from rct_dist.data.shards.sources import existing_dir

if TYPE_CHECKING:
    from rct_dist.data.shards import ShardOptions

PARTS = (("train", "images_background"), ("test", "images_evaluation"))
PACKED_NAME = "omniglot28.npz"
PACKED_PARTS = (("train", "background"), ("test", "evaluation"))


def omniglot(args: ShardOptions) -> list[Listing]:
    root = existing_dir(args.root, "omniglot")
    for suffix, read in ((".zip", from_zip), (".npz", from_npz)):
        files = [root / f"{stem}{suffix}" for _, stem in PARTS]
        if all(f.is_file() for f in files):
            return [read(split, f) for (split, _), f in zip(PARTS, files)]
    if (root / PACKED_NAME).is_file():
        return from_packed(root / PACKED_NAME)
    raise FileNotFoundError(
        f"omniglot: {root} holds neither images_background.zip + images_evaluation.zip "
        f"nor images_background.npz + images_evaluation.npz nor {PACKED_NAME}"
    )


def pack(images: np.ndarray) -> np.ndarray:
    """(C, K, S, S) bool, True = white background, to (C, K, S*S/8) uint8 with bit 1 = ink (np.packbits)."""
    if images.dtype != np.bool_ or images.ndim != 4 or images.shape[2] != images.shape[3]:
        raise ValueError(f"pack: expected (C, K, S, S) bool, got {images.dtype} {images.shape}")
    return np.packbits(~images.reshape(*images.shape[:2], -1), axis=-1)


def read_packed(path: Path) -> dict[str, np.ndarray]:
    """The packed copy unpacked: {"background": (C, 20, S, S) bool, "evaluation": ...}, True = white."""
    with np.load(path, allow_pickle=False) as npz:
        missing = {"background", "evaluation", "image_size"} - set(npz.files)
        if missing:
            raise ValueError(f"omniglot: {path} lacks the arrays {sorted(missing)} (has {npz.files})")
        size = int(npz["image_size"])
        parts = {}
        for _, name in PACKED_PARTS:
            packed = npz[name]
            if packed.ndim != 3 or packed.dtype != np.uint8 or packed.shape[2] * 8 < size * size:
                raise ValueError(f"omniglot: {path}: {name} is {packed.dtype} {packed.shape}, not packed "
                                 f"{size}x{size} images")
            ink = np.unpackbits(packed, axis=-1, count=size * size).astype(bool)
            parts[name] = ~ink.reshape(*packed.shape[:2], size, size)
    return parts


def from_packed(path: Path) -> list[Listing]:
    """Class names are `{part}/{index:04d}`, the index into the part's classes (in the repack's order)."""
    parts = read_packed(path)
    listings = []
    for split, name in PACKED_PARTS:
        images = parts[name]
        items = [
            (c, f"{path.name}:{name}[{c:04d},{k:02d}]", ArrayImage(images[c, k]))
            for c in range(images.shape[0])
            for k in range(images.shape[1])
        ]
        listings.append(Listing(split, [f"{name}/{c:04d}" for c in range(images.shape[0])], items))
    return listings


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
