"""Retrieval and clustering metrics on held-out classes, and the distributed extraction feeding them."""

from rct_dist.eval.clustering import nmi
from rct_dist.eval.extraction import extract_embeddings
from rct_dist.eval.retrieval import evaluate, map_at_r, recall_at_k

__all__ = ["evaluate", "extract_embeddings", "map_at_r", "nmi", "recall_at_k"]
