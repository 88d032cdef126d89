"""The relaxed contrastive (RC) loss of Kim, Kim, Cho & Kwak, CVPR 2021.

With teacher embeddings t (L2-normalised) and student embeddings s (not normalised by default):

    w_ij = exp(-|t_i - t_j|^2 / sigma)          relaxed labels, no gradient
    d_ij = |s_i - s_j| / mean_k |s_i - s_k|      row mean over all n columns, self included, not detached
    L    = 1/n sum_i sum_{j != i} [ w_ij d_ij^2 + (1 - w_ij) max(0, delta - d_ij)^2 ]

This equals the authors' `Relaxed_Contra` (where `t_emb` is the student and `s_emb` the teacher).
Large batches run the exact tiled computation of `tiled.py`, which keeps nothing of size B x N.
"""

from __future__ import annotations

import torch

from rct_dist.distributed import world_size
from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.losses.pairwise import distances, safe_normalize, squared_distances
from rct_dist.losses.tiled import TileSetup, tile_size, tiled_row_sums

REDUCTIONS = ("paper", "mean_pairs")


class RelaxedContrastiveLoss(PairwiseTransferLoss):
    """RC loss, `loss(student, teacher)`; parts `pull` and `push` for logging.

    Args:
        sigma: bandwidth of the relaxed labels.
        delta: margin of the push term, in units of the row-mean distance.
        normalize_student: L2-normalise the student first (the paper does not).
        reduction: "paper" divides the pair sum by n (the official code); "mean_pairs" by n(n-1).
        gather: with torch.distributed initialised, use the concatenation of all ranks' batches.
        min_row_mean: floor on the row-mean distance, so a fully collapsed student stays finite.
        chunk_size: tile edge of the tiled computation (same result, memory O(N*D + tile^2) per rank);
            None tiles automatically once a rank's share of pairs exceeds `tiled.AUTO_MIN_ELEMENTS`,
            0 never tiles.
    """

    teacher_needs_norm = True

    def __init__(
        self,
        sigma: float = 1.0,
        delta: float = 1.0,
        normalize_student: bool = False,
        reduction: str = "paper",
        gather: bool = True,
        min_row_mean: float = 1e-12,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(gather=gather)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
            raise ValueError(f"chunk_size must be None or a non-negative integer, got {chunk_size!r}")
        self.sigma = sigma
        self.delta = delta
        self.normalize_student = normalize_student
        self.reduction = reduction
        self.min_row_mean = min_row_mean
        self.chunk_size = chunk_size

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        n = batch.n
        norm = n if self.reduction == "paper" else n * (n - 1)
        with torch.no_grad():
            t_rows = safe_normalize(batch.teacher_rows)
            t_cols = safe_normalize(batch.teacher_cols)
        s_rows, s_cols = batch.student_rows, batch.student_cols
        tile = tile_size(self.chunk_size, n, world_size() if batch.gathered else 1)
        if tile:
            # Columns without autograd: the tiled backward gives each row its column role itself.
            s_cols = s_cols.detach()
            if self.normalize_student:
                s_rows, s_cols = safe_normalize(s_rows), safe_normalize(s_cols)
            setup = TileSetup(self.sigma, self.delta, self.min_row_mean, norm, batch.row_offset, batch.gathered, tile)
            return tiled_row_sums(s_rows, s_cols, t_rows, t_cols, setup)
        mask = batch.self_mask()
        w = torch.exp(-squared_distances(t_rows, t_cols, mask) / self.sigma)
        if self.normalize_student:
            s_rows, s_cols = safe_normalize(s_rows), safe_normalize(s_cols)
        dist = distances(s_rows, s_cols, mask)
        d = dist / dist.mean(1, keepdim=True).clamp_min(self.min_row_mean)
        off_diagonal = (~mask).to(d.dtype)
        pull = (w * d.square() * off_diagonal).sum() / norm
        push = ((1 - w) * torch.relu(self.delta - d).square() * off_diagonal).sum() / norm
        return {"pull": pull, "push": push}
