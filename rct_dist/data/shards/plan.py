"""What goes into a split: class names in label order and samples with deterministic keys."""

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
