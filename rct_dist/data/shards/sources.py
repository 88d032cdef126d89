"""Sources with one image file per sample, plus scikit-learn digits: each returns the train and test listings.

Train and test classes are disjoint (retrieval protocol): CUB 1-100 / 101-200, Cars 1-98 / 99-196, SOP by its
own train/test files, folders by the first / second half of the sorted class folders, digits 0-4 / 5-9.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import scipy.io

from rct_dist.data.shards.images import ArrayImage, FileImage
from rct_dist.data.shards.plan import Listing

if TYPE_CHECKING:
    from rct_dist.data.shards import ShardOptions

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}  # compared lower-case: ImageNet's .JPEG matches
CUB_TRAIN_CLASSES = 100
CARS_TRAIN_CLASSES = 98


def existing_dir(root: Path | None, source: str) -> Path:
    if root is None:
        raise ValueError(f"--root is required for --source {source}")
    if not root.is_dir():
        raise FileNotFoundError(f"{source}: root folder {root} does not exist")
    return root


def metadata(root: Path, name: str, source: str) -> Path:
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"{source}: missing metadata file {name} in {root}")
    return path


def rows(path: Path, header: bool = False) -> list[list[str]]:
    """Whitespace-separated columns of a text metadata file, blank lines dropped."""
    lines = path.read_text(encoding="utf-8").splitlines()[1 if header else 0 :]
    return [line.split() for line in lines if line.strip()]


def listing(split: str, names: dict[int, str], records: list[tuple[int, str, Path]]) -> Listing:
    """Map a split's class ids, sorted, to contiguous labels 0..n-1; `records` are (class id, source id, file)."""
    ids = sorted(names)
    label = {class_id: index for index, class_id in enumerate(ids)}
    unknown = {class_id for class_id, _, _ in records} - set(ids)
    if unknown:
        raise ValueError(f"split {split!r}: images of unknown class ids {sorted(unknown)[:10]}")
    items = [(label[class_id], source, FileImage(path)) for class_id, source, path in records]
    return Listing(split, [names[class_id] for class_id in ids], items)


def split_at(boundary: int, names: dict[int, str], records: list[tuple[int, str, Path]]) -> list[Listing]:
    """Class ids up to `boundary` train, the rest test."""
    return [
        listing(split, {i: n for i, n in names.items() if keep(i)}, [r for r in records if keep(r[0])])
        for split, keep in (("train", lambda i: i <= boundary), ("test", lambda i: i > boundary))
    ]


def split_names(args: ShardOptions) -> list[str]:
    """The splits a run writes, known before reading the source so finished runs are skipped cheaply."""
    if args.source == "folder" and args.split_classes == "none":
        return [args.split]
    return ["train", "test"]


def folder(args: ShardOptions) -> list[Listing]:
    """One subfolder per class (ImageNet / CUB images/ layout); files found recursively by extension."""
    root = existing_dir(args.root, "folder")
    found = {
        d.name: sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        for d in root.iterdir()
        if d.is_dir() and not d.name.startswith(".")
    }
    empty = sorted(name for name, files in found.items() if not files)
    if empty:
        log.warning("folder: ignoring %d subfolders without images: %s", len(empty), ", ".join(empty[:10]))
    names = sorted(name for name, files in found.items() if files)
    if not names:
        raise ValueError(f"folder: no class subfolders with {'/'.join(sorted(IMAGE_SUFFIXES))} images in {root}")
    if args.split_classes == "none":
        groups = [(args.split, names)]
    elif len(names) < 2:
        raise ValueError(f"folder: --split-classes half needs at least 2 class folders, {root} has {len(names)}")
    else:
        cut = (len(names) + 1) // 2
        groups = [("train", names[:cut]), ("test", names[cut:])]
    return [
        Listing(
            split,
            group,
            [(label, p.relative_to(root).as_posix(), FileImage(p)) for label, n in enumerate(group) for p in found[n]],
        )
        for split, group in groups
    ]


def cub(args: ShardOptions) -> list[Listing]:
    """CUB_200_2011: images.txt (id path), image_class_labels.txt (id class), classes.txt (class name)."""
    root = existing_dir(args.root, "cub")
    paths = dict(rows(metadata(root, "images.txt", "cub")))
    classes = dict(rows(metadata(root, "image_class_labels.txt", "cub")))
    names = {int(i): name for i, name in rows(metadata(root, "classes.txt", "cub"))}
    if paths.keys() != classes.keys():
        raise ValueError("cub: images.txt and image_class_labels.txt list different image ids")
    records = [(int(classes[i]), f"images/{p}", root / "images" / p) for i, p in paths.items()]
    return split_at(CUB_TRAIN_CLASSES, names, records)


def cars(args: ShardOptions) -> list[Listing]:
    """Cars-196: cars_annos.mat with `annotations` (relative_im_path, class) and optional `class_names`."""
    root = existing_dir(args.root, "cars")
    mat = scipy.io.loadmat(metadata(root, "cars_annos.mat", "cars"), squeeze_me=True)
    if "annotations" not in mat:
        raise ValueError(f"cars: {root / 'cars_annos.mat'} has no 'annotations' variable")
    annotations = np.atleast_1d(mat["annotations"])
    records = [(int(a["class"]), str(a["relative_im_path"]), root / str(a["relative_im_path"])) for a in annotations]
    given = [str(n) for n in np.atleast_1d(mat.get("class_names", []))]
    ids = sorted({class_id for class_id, _, _ in records})
    names = {i: given[i - 1] if i <= len(given) else f"class_{i:03d}" for i in ids}
    return split_at(CARS_TRAIN_CLASSES, names, records)


def sop(args: ShardOptions) -> list[Listing]:
    """Stanford Online Products: Ebay_train.txt / Ebay_test.txt (image_id class_id super_class_id path)."""
    root = existing_dir(args.root, "sop")
    result = []
    for split, file in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        table = rows(metadata(root, file, "sop"), header=True)
        records = [(int(class_id), path, root / path) for _, class_id, _, path in table]
        names = {int(class_id): f"{path.split('/')[0]}/{class_id}" for _, class_id, _, path in table}
        result.append(listing(split, names, records))
    return result


def digits(args: ShardOptions) -> list[Listing]:
    """scikit-learn's bundled 8x8 digits (offline): 0-4 train, 5-9 test, gray levels 0-16 scaled to 0-255."""
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.rint(data.images * (255 / 16)).astype(np.uint8)
    return [
        Listing(
            split,
            [str(d) for d in digits_],
            [
                (int(t) - digits_[0], f"sklearn-digits/{i:04d}", ArrayImage(pixels[i]))
                for i, t in enumerate(data.target)
                if t in digits_
            ],
        )
        for split, digits_ in (("train", range(0, 5)), ("test", range(5, 10)))
    ]
