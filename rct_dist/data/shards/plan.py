"""What goes into a split: class names in label order and samples with deterministic keys."""

from __future__ import annotations

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


def make_plan(listing: Listing, limit_classes: int | None = None) -> SplitPlan:
    """Sort by (label, source id) and number the samples, so keys never depend on file-system or worker order.

    `limit_classes` keeps the first N classes (labels 0..N-1) for tests and quick runs.
    """
    names = listing.class_names[:limit_classes] if limit_classes else listing.class_names
    items = sorted((item for item in listing.items if item[0] < len(names)), key=lambda item: item[:2])
    if not items:
        raise ValueError(f"split {listing.split!r} has no images")
    return SplitPlan(
        listing.split,
        list(names),
        [
            Sample(f"{listing.split}-{index:08d}", label, names[label], source, image)
            for index, (label, source, image) in enumerate(items)
        ],
    )
