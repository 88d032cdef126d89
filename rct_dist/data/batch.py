"""What the loader yields: one batch, its fields by name."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterable, Iterator

import torch


@dataclass
class Batch:
    """One batch of a split for one rank.

    `images`: (B, 3, H, W), or (B, V, 3, H, W) with V augmented views per image, or with `decode="gpu"`
    a list of the samples' encoded bytes; `labels`: (B,) int64; `keys`: the samples' keys; `teacher`:
    (B, dim) float32 stored teacher embeddings when the loader was asked for them; `valid`: in eval,
    (B,) bool, False on rows that pad a rank's last batch or whose image could not be read.
    """

    images: torch.Tensor | list[bytes]
    labels: torch.Tensor
    keys: list[str]
    teacher: torch.Tensor | None = None
    valid: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.keys)

    def only_valid(self) -> Batch:
        """The rows whose `valid` flag is set (all rows when the batch has no flags)."""
        if self.valid is None:
            return self
        keep = self.valid
        return replace(self, images=self.images[keep], labels=self.labels[keep],
                       keys=[k for k, ok in zip(self.keys, keep.tolist()) if ok],
                       teacher=None if self.teacher is None else self.teacher[keep], valid=None)


def valid_rows(batches: Iterable[Batch]) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """(images, labels, keys) of every valid row: what `rct_dist.eval.extract_embeddings` takes."""
    for batch in batches:
        kept = batch.only_valid()
        yield kept.images, kept.labels, kept.keys
