"""Transfer losses (`loss(student, teacher)`) and the Proxy-Anchor loss for training teachers."""

from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.losses.darkrank import DarkRankLoss
from rct_dist.losses.pkt import PKTLoss
from rct_dist.losses.proxy_anchor import ProxyAnchorLoss
from rct_dist.losses.regression import EmbeddingRegressionLoss
from rct_dist.losses.relaxed_contrastive import RelaxedContrastiveLoss
from rct_dist.losses.rkd import RKDAngleLoss, RKDDistanceLoss, RKDLoss

__all__ = [
    "DarkRankLoss",
    "EmbeddingRegressionLoss",
    "PKTLoss",
    "PairBatch",
    "PairwiseTransferLoss",
    "ProxyAnchorLoss",
    "RKDAngleLoss",
    "RKDDistanceLoss",
    "RKDLoss",
    "RelaxedContrastiveLoss",
]
