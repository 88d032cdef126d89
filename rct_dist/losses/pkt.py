"""Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018), as in the authors' and CRD's code.

Rows are L2-normalised, cosine similarities mapped to [0, 1] by (cos + 1) / 2 and each row turned
into a distribution over all n columns (self included). The loss is the mean over the n x n
entries of t * log((t + eps) / (s + eps)): KL(teacher || student) per row, divided by n^2.
"""

from __future__ import annotations

import torch

from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.geometry import safe_sqrt


def _normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / (|x| + eps), the reference's normalisation; zero rows stay zero with a finite gradient."""
    return x / (safe_sqrt(x.square().sum(1, keepdim=True)) + eps)


def _row_distributions(rows: torch.Tensor, cols: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, N) conditional probabilities of each column given the row, from cosine similarities."""
    sim = ((_normalize(rows, eps) @ _normalize(cols, eps).T + 1) / 2).clamp_min(0)
    return sim / sim.sum(1, keepdim=True)


class PKTLoss(PairwiseTransferLoss):
    """PKT, `loss(student, teacher)`; part `kl`.

    The (cos + 1) / 2 similarity is clamped at 0 (the reference is not), so rounding on
    antipodal pairs can never give a negative probability; the row sum includes the self
    similarity (>= 1/2), so it never vanishes.
    """

    def __init__(self, eps: float = 1e-7, gather: bool = True) -> None:
        super().__init__(gather=gather)
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        self.eps = eps

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            t = _row_distributions(batch.teacher_rows, batch.teacher_cols, self.eps)
        s = _row_distributions(batch.student_rows, batch.student_cols, self.eps)
        kl = (t * torch.log((t + self.eps) / (s + self.eps))).sum()
        return {"kl": kl / batch.n**2}
