"""Embed a held-out set on every rank and gather it, so every rank evaluates the same full set.

Distributed samplers pad ranks with duplicates of other ranks' samples to equalise batch counts,
and ranks may still hold different numbers of rows; the unique sample keys undo both: rows are
gathered with their keys, duplicates dropped (first kept) and the result sorted by key, so it does
not depend on the number of ranks or on how samples were split between them.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from rct_dist.distributed.collectives import all_gather_rows, all_gather_stats


def _gather_keys(keys: Sequence[str], counts: Sequence[int], width: int, device: torch.device) -> list[str]:
    """Every rank's keys in rank order, sent as (n, width) zero-padded UTF-8 byte rows plus lengths,
    so the row gather that carries the embeddings carries them too, on any backend, without pickling."""
    encoded = [k.encode() for k in keys]
    rows = torch.zeros(len(encoded), width, dtype=torch.uint8)
    for i, raw in enumerate(encoded):
        rows[i, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    lengths = torch.tensor([len(raw) for raw in encoded], dtype=torch.int64)[:, None]
    rows = all_gather_rows(rows.to(device), counts, with_grad=False).cpu()
    lengths = all_gather_rows(lengths.to(device), counts, with_grad=False)[:, 0].tolist()
    return [bytes(row[:n].tolist()).decode() for row, n in zip(rows, lengths)]


def _local_pass(
    model: nn.Module, batches: Iterable, device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[str]]:
    """This rank's embeddings, labels and keys, in the order the batches came."""
    embeddings, labels, keys = [], [], []
    with torch.no_grad():
        for images, batch_labels, batch_keys in batches:
            embeddings.append(model(images.to(device)).float())
            labels.append(torch.as_tensor(batch_labels, device=device).long())
            keys.extend(batch_keys)
    return embeddings, labels, keys


def extract_embeddings(
    model: nn.Module, batches: Iterable, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(embeddings, labels, keys) of the whole set on every rank, one row per unique key, sorted by key.

    `batches` yields (images, labels, keys) with keys a list of str; each rank passes its own share.
    Embeddings come back as float32 and labels as int64. The model runs in eval mode (batch-norm
    statistics and dropout must not depend on the split), then its previous mode is restored.
    Works on a single process too, where nothing is gathered.
    """
    if device is None:
        device = next(model.parameters(), torch.empty(0)).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        parts, label_parts, keys = _local_pass(model, batches, device)
    finally:
        model.train(was_training)
    width = max((len(k.encode()) for k in keys), default=0)
    stats = all_gather_stats([len(keys), parts[0].shape[1] if parts else -1, width], device)
    counts = [s[0] for s in stats]
    dim = max(s[1] for s in stats)
    if dim < 0:
        raise ValueError("no batches on any rank")
    local = torch.cat(parts) if parts else torch.zeros(0, dim, device=device)
    local_labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.int64, device=device)
    embeddings = all_gather_rows(local, counts, with_grad=False)
    labels = all_gather_rows(local_labels[:, None], counts, with_grad=False)[:, 0]
    first: dict[str, int] = {}
    for i, key in enumerate(_gather_keys(keys, counts, max(s[2] for s in stats), device)):
        first.setdefault(key, i)
    ordered = sorted(first)
    index = torch.tensor([first[k] for k in ordered], dtype=torch.int64, device=embeddings.device)
    return embeddings[index], labels[index], ordered
