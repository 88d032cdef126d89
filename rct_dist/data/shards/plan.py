"""What goes into a split: class names in label order and samples with deterministic keys; `hold_out` moves
a seeded random choice of classes from one split into a new one (a validation split of training classes)."""

from __future__ import annotations

import random
from itertools import groupby
from dataclasses import dataclass
from typing import NamedTuple, Union

from rct_dist.data.shards.images import ArrayImage, FileImage, ZipImage

ImageRef = Union[FileImage, ZipImage, ArrayImage]


class Listing(NamedTuple):
    """A source's raw view of one split: `items` are (label, source id, image), in any order."""

    split: str
    class_names: list[str]
    items: list[tuple[int, str, ImageRef]]


@dataclass(frozen=True)
class Sample:
    key: str
    label: int
    class_name: str
    source: str
    image: ImageRef


@dataclass(frozen=True)
class SplitPlan:
    split: str
    class_names: list[str]
    samples: list[Sample]


def make_plan(listing: Listing, limit_classes: int | None = None, group: int = 4, seed: int = 0) -> SplitPlan:
    """Sort by (label, source id) and number the samples, so keys never depend on file-system or worker order;
    then lay them out in runs of up to `group` images of one class, the runs in a seeded random order.

    Streaming readers see only a window of the data (a rank's shards, a shuffle buffer): shards sorted by
    class would give each rank a few classes, and P x K batches need K images of a class inside the
    buffer. Shuffled runs of `group` (>= K) same-class images give both. `limit_classes` keeps the first
    N classes (labels 0..N-1) for tests and quick runs.
    """
    names = listing.class_names[:limit_classes] if limit_classes else listing.class_names
    items = sorted((item for item in listing.items if item[0] < len(names)), key=lambda item: item[:2])
    if not items:
        raise ValueError(f"split {listing.split!r} has no images")
    samples = [
        Sample(f"{listing.split}-{index:08d}", label, names[label], source, image)
        for index, (label, source, image) in enumerate(items)
    ]
    runs = [
        members[i : i + group]
        for members in (list(g) for _, g in groupby(samples, key=lambda sample: sample.label))
        for i in range(0, len(members), group)
    ]
    random.Random(seed).shuffle(runs)
    return SplitPlan(listing.split, list(names), [sample for run in runs for sample in run])


def first_classes(listing: Listing, limit: int | None) -> Listing:
    """The first `limit` classes (labels 0..limit-1) and their items; the whole listing for None."""
    if not limit or limit >= len(listing.class_names):
        return listing
    return Listing(listing.split, listing.class_names[:limit], [item for item in listing.items if item[0] < limit])


def hold_out(listing: Listing, classes: int, seed: int, split: str) -> tuple[Listing, Listing]:
    """Move `classes` classes, chosen with `random.Random(seed).sample`, into a new listing named `split`.

    Returns (rest, held out). Each keeps the original class order and is relabelled 0..n-1, so both stay
    contiguous (a loss with one proxy per class takes the class count from the index); the class sets are
    disjoint and their union is the input's. At least one class must stay in `listing`.
    """
    total = len(listing.class_names)
    if not 1 <= classes < total:
        raise ValueError(f"cannot hold out {classes} of the {total} classes of split {listing.split!r}: "
                         f"need 1 <= classes < {total}")
    chosen = set(random.Random(seed).sample(range(total), classes))

    def subset(name: str, keep: bool) -> Listing:
        labels = [c for c in range(total) if (c in chosen) == keep]
        relabel = {c: i for i, c in enumerate(labels)}
        items = [(relabel[label], source, image) for label, source, image in listing.items if label in relabel]
        return Listing(name, [listing.class_names[c] for c in labels], items)

    return subset(listing.split, False), subset(split, True)
