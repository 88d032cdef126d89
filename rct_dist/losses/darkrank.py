"""DarkRank (Chen, Wang & Zhang, AAAI 2018), the label-free listwise "HardDarkRank" part.

Scores are -alpha * |x_i - x_j|^beta. For each row the teacher's `permute_len` highest-scoring
other rows define a ranking, and the loss is the ListMLE negative log-likelihood of that ranking
under the student's scores, averaged over rows. Matches `HardDarkRank` of lenscloth/RKD.
"""

from __future__ import annotations

import torch

from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.geometry import distances


class DarkRankLoss(PairwiseTransferLoss):
    """HardDarkRank, `loss(student, teacher)`; part `rank`.

    The reference drops the first column of the teacher's sorted scores, assuming it is the row
    itself; here the self column is masked to -inf explicitly, which is the same unless rows are
    duplicated (then the reference may drop the duplicate and keep the row itself). The list is
    k = min(permute_len, n - 1) long, so small batches work.
    """

    def __init__(self, alpha: float = 3.0, beta: float = 3.0, permute_len: int = 4, gather: bool = True) -> None:
        super().__init__(gather=gather)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if permute_len < 1:
            raise ValueError(f"permute_len must be at least 1, got {permute_len}")
        self.alpha = alpha
        self.beta = beta
        self.permute_len = permute_len

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        mask = batch.self_mask()
        k = min(self.permute_len, batch.n - 1)
        with torch.no_grad():
            t_score = -self.alpha * distances(batch.teacher_rows, batch.teacher_cols, mask).pow(self.beta)
            order = t_score.masked_fill(mask, float("-inf")).topk(k, dim=1).indices
        s_score = -self.alpha * distances(batch.student_rows, batch.student_cols, mask).pow(self.beta)
        ordered = s_score.gather(1, order)
        # log P(ranking) = sum_m [ordered_m - logsumexp(ordered_m..k)]; the tail sums are a reversed cumsum.
        tails = ordered.flip(1).logcumsumexp(1).flip(1)
        log_prob = (ordered - tails).sum(1)
        return {"rank": -log_prob.sum() / batch.n}
