"""Relational knowledge distillation (Park, Kim, Lu & Cho, CVPR 2019): distance and angle losses.

Both match the authors' `RkdDistance` / `RKdAngle` (lenscloth/RKD, metric/loss.py): smooth L1
(beta 1) between student and teacher relations, averaged over every entry of the n x n (distance)
or n x n x n (angle) relation tensor, self entries included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.geometry import distances, safe_normalize

# Floor on the mean distance, so a fully collapsed batch gives zeros instead of 0/0.
_MIN_MEAN_DISTANCE = 1e-12


class RKDDistanceLoss(PairwiseTransferLoss):
    """RKD-D, `loss(student, teacher)`; part `distance`.

    Distances are divided by their mean over the n(n-1) off-diagonal pairs of the global batch.
    That mean couples all rows, so each rank's distance sum is all-reduced (with gradient for the
    student) before its own rows are compared. The reference averages over the pairs with a
    positive distance (after clamping squared distances at 1e-12, i.e. all off-diagonal pairs);
    here duplicate rows have distance exactly 0 but are still counted, which is the same up to 1e-6.
    """

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        mask = batch.self_mask()
        n = batch.n
        pairs = n * (n - 1)
        with torch.no_grad():
            t = distances(batch.teacher_rows, batch.teacher_cols, mask)
            t_mean = batch.all_reduce_sum(t.sum(), with_grad=False) / pairs
            t = t / t_mean.clamp_min(_MIN_MEAN_DISTANCE)
        s = distances(batch.student_rows, batch.student_cols, mask)
        s_mean = batch.all_reduce_sum(s.sum(), with_grad=True) / pairs
        s = s / s_mean.clamp_min(_MIN_MEAN_DISTANCE)
        return {"distance": F.smooth_l1_loss(s, t, reduction="sum", beta=1.0) / (n * n)}


def _angles(anchors: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(c, n, n) cosines <e_ab, e_ac> of the unit vectors e_ab from anchor a to column b."""
    unit = safe_normalize(cols.unsqueeze(0) - anchors.unsqueeze(1))
    return unit @ unit.transpose(1, 2)


def _angle_huber_sum(
    s_anchors: torch.Tensor, s_cols: torch.Tensor, t_anchors: torch.Tensor, t_cols: torch.Tensor
) -> torch.Tensor:
    """Smooth L1 sum of one chunk of anchors; the teacher is recomputed here too, so the
    checkpoint keeps only its (small) inputs alive, never a c x n x n tensor."""
    with torch.no_grad():
        t = _angles(t_anchors, t_cols)
    return F.smooth_l1_loss(_angles(s_anchors, s_cols), t, reduction="sum", beta=1.0)


class RKDAngleLoss(PairwiseTransferLoss):
    """RKD-A, `loss(student, teacher)`; part `angle`.

    The n x n x n angle tensor is never held: this rank's anchors are processed in chunks of c
    anchors with c * n * (n + dim) <= `chunk_elements` (dim of the wider embedding; c >= 1), and
    each chunk is checkpointed, so the backward recomputes its c x n x n angles instead of storing
    every chunk's: peak memory is a small multiple of `chunk_elements`, whatever the rank's rows.
    Pairs with b == a or c == a give a zero vector and angle 0 for both models, as in the reference.
    """

    def __init__(self, gather: bool = True, chunk_elements: int = 2**22) -> None:
        super().__init__(gather=gather)
        if chunk_elements < 1:
            raise ValueError(f"chunk_elements must be positive, got {chunk_elements}")
        self.chunk_elements = chunk_elements

    def chunk_size(self, n: int, dim: int) -> int:
        """Anchors per chunk for n columns of width `dim`."""
        return max(1, self.chunk_elements // (n * (n + dim)))

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        n = batch.n
        dim = max(batch.student_cols.shape[1], batch.teacher_cols.shape[1])
        step = self.chunk_size(n, dim)
        total = batch.student_rows.new_zeros(())
        # At least one (possibly empty) chunk: it keeps the gathered columns in the graph, so a
        # rank without rows still joins the collectives of the backward.
        for start in range(0, max(batch.student_rows.shape[0], 1), step):
            chunk = slice(start, start + step)
            total = total + checkpoint(
                _angle_huber_sum,
                batch.student_rows[chunk],
                batch.student_cols,
                batch.teacher_rows[chunk],
                batch.teacher_cols,
                use_reentrant=False,
            )
        return {"angle": total / n**3}


class RKDLoss(torch.nn.Module):
    """RKD-DA: `distance_weight` x distance + `angle_weight` x angle; 1 and 2, as the RKD paper and the RC
    paper's comparison use it. A part with weight 0 is neither computed nor reported (RKD-D or RKD-A alone);
    `chunk_elements` bounds the angle part's memory (RKDAngleLoss)."""

    def __init__(self, distance_weight: float = 1.0, angle_weight: float = 2.0, gather: bool = True,
                 chunk_elements: int = 2**22) -> None:
        super().__init__()
        if distance_weight < 0 or angle_weight < 0:
            raise ValueError(f"weights must be non-negative, got distance {distance_weight}, angle {angle_weight}")
        if distance_weight == 0 and angle_weight == 0:
            raise ValueError("distance_weight and angle_weight are both 0: nothing to learn from")
        self.distance_weight = distance_weight
        self.angle_weight = angle_weight
        self.distance = RKDDistanceLoss(gather=gather)
        self.angle = RKDAngleLoss(gather=gather, chunk_elements=chunk_elements)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, return_parts: bool = False):
        parts = {}
        loss = None
        for name, weight, part in (("distance", self.distance_weight, self.distance),
                                   ("angle", self.angle_weight, self.angle)):
            if weight:
                value = part(student, teacher)
                parts[name] = value.detach()
                loss = weight * value if loss is None else loss + weight * value
        return (loss, parts) if return_parts else loss
