"""Retrieval metrics on held-out classes."""

from rct_dist.eval.retrieval import recall_at_k

__all__ = ["recall_at_k"]
