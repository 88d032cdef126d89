"""Recall@K, computed in query chunks so that no N x N matrix is ever held."""

from __future__ import annotations

from typing import Iterable

import torch

from rct_dist.losses.pairwise import self_mask, squared_distances


def recall_at_k(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Iterable[int] = (1, 2, 4, 8),
    metric: str = "euclidean",
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Fraction of queries with a same-class item among their k nearest neighbours.

    Every item is a query against all others; the query itself is excluded by its index (not by
    dropping the first neighbour), so duplicates of the query count as real neighbours.
    `metric` is "euclidean" on the raw embeddings (the paper's protocol) or "cosine".
    """
    ks = sorted(set(ks))
    if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(f"need (n, dim) embeddings and (n,) labels, got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    n = embeddings.shape[0]
    if not ks or ks[0] < 1 or ks[-1] >= n:
        raise ValueError(f"every k must be in [1, {n - 1}] for {n} items, got {ks}")
    x = embeddings.detach().float()
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    hits = torch.zeros(len(ks), dtype=torch.float64)
    for start in range(0, n, chunk_size):
        rows = x[start : start + chunk_size]
        mask = self_mask(rows.shape[0], n, start, x.device)
        dist = squared_distances(rows, x, mask).masked_fill(mask, float("inf"))
        nearest = dist.topk(ks[-1], dim=1, largest=False).indices
        match = (labels[nearest] == labels[start : start + rows.shape[0], None]).cumsum(1) > 0
        hits += torch.stack([match[:, k - 1].sum() for k in ks]).double().cpu()
    return {k: (h / n).item() for k, h in zip(ks, hits)}
