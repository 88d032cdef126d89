"""Transfer losses (`loss(student, teacher)`) and the Proxy-Anchor loss for training teachers."""

from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.losses.relaxed_contrastive import RelaxedContrastiveLoss

__all__ = ["PairBatch", "PairwiseTransferLoss", "RelaxedContrastiveLoss"]
