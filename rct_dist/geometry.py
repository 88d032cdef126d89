"""Pairwise geometry shared by the transfer losses and the retrieval metrics (torch only): distances between
rows and columns, safe norms and square roots, the self-pair mask.

Distances use the Gram form |r|^2 + |c|^2 - 2 r.c (one matrix product, fast on every device) after
subtracting the batch centroid from rows and columns. Distances do not change under a shared shift,
and the shift removes the cancellation that the Gram form suffers when embeddings have a large
common offset (unnormalised student embeddings of norm 1e4 lose every small distance in fp32
otherwise). What remains is a rounding error relative to the batch's spread, not its offset:
pairs closer than about sqrt(eps) x spread (1e-8 in float64, 3e-4 in fp32) get a distance of that
size instead of their true one, which changes the loss by terms of that size squared.
"""

from __future__ import annotations

import torch


def self_mask(rows: int, cols: int, row_offset: int, device: torch.device) -> torch.Tensor:
    """Boolean (rows, cols) mask of the self pairs: row i of this rank is column row_offset + i."""
    r = torch.arange(rows, device=device).unsqueeze(1)
    c = torch.arange(cols, device=device).unsqueeze(0)
    return c == r + row_offset


def safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0, so duplicate rows give finite gradients."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


def safe_normalize(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """L2-normalise along `dim`; zero vectors stay zero with a finite gradient."""
    norm = safe_sqrt(x.square().sum(dim, keepdim=True))
    return x / torch.where(norm > 0, norm, torch.ones_like(norm))


def squared_distances(rows: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) squared euclidean distances, exactly zero on the self pairs given by `mask`."""
    centre = cols.detach().mean(0)
    r = rows - centre
    c = cols - centre
    sq = r.square().sum(1, keepdim=True) + c.square().sum(1).unsqueeze(0) - 2.0 * (r @ c.T)
    return sq.clamp_min(0).masked_fill(mask, 0)


def distances(rows: torch.Tensor, cols: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, N) euclidean distances with finite gradients everywhere (zero at zero distance)."""
    return safe_sqrt(squared_distances(rows, cols, mask))
