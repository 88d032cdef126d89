"""Recall@K and MAP@R from one chunked nearest-neighbour search (see `neighbours` for memory and ties).

Cost: every query needs max(max k, R) neighbours, R being the number of other items of its class.
For SOP (R <= 11) and CUB/Cars (R ~ 60) that is no more than the ks already need. For classes of
thousands of items MAP@R needs thousands of neighbours per query: the topk output and the per-rank
precision arrays are (chunk, R) instead of (chunk, k), and topk slows with R. Chunks only fetch their
own queries' largest R, so a few large classes cost only their own chunks; lower chunk_size if
chunk_size x max R (x ~20 bytes) is too much memory.
"""

from __future__ import annotations

from typing import Iterable

import torch

from rct_dist.eval.clustering import nmi
from rct_dist.eval.neighbours import check_inputs, check_ks, neighbour_chunks


def _others_in_class(labels: torch.Tensor) -> torch.Tensor:
    """R per item: how many other items share its label."""
    _, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    return counts[inverse] - 1


def _search(
    embeddings: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...], with_map: bool,
    metric: str, chunk_size: int, backend: str,
) -> tuple[dict[int, float], float | None]:
    """Recall for each k in `ks` and (with `with_map`) MAP@R, from a single pass over query chunks."""
    labels = labels.to(embeddings.device)
    r = _others_in_class(labels)
    if with_map and not (r > 0).any():
        raise ValueError("MAP@R needs at least one class with two or more items")
    kmax = ks[-1] if ks else 1
    need = r.clamp(min=kmax) if with_map else torch.full_like(r, kmax)
    hits = torch.zeros(len(ks), dtype=torch.float64, device=embeddings.device)
    ap_sum = torch.zeros((), dtype=torch.float64, device=embeddings.device)
    for start, stop, nearest in neighbour_chunks(embeddings, need, metric, chunk_size, backend):
        match = labels[nearest] == labels[start:stop, None]
        if ks:
            first = torch.where(match.any(1), match.int().argmax(1), match.shape[1])
            hits += torch.stack([(first < k).sum() for k in ks]).double()
        if with_map:
            rq = r[start:stop, None]
            rank = torch.arange(1, match.shape[1] + 1, device=match.device)
            correct = match & (rank <= rq)
            precision = correct.cumsum(1).double() / rank
            ap_sum += ((precision * correct).sum(1) / rq.squeeze(1).clamp(min=1)).sum()
    n = embeddings.shape[0]
    recall = {k: h / n for k, h in zip(ks, hits.tolist())}
    return recall, (ap_sum.item() / int((r > 0).sum())) if with_map else None


def recall_at_k(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Iterable[int] = (1, 2, 4, 8),
    metric: str = "euclidean",
    chunk_size: int = 1024,
    backend: str = "auto",
) -> dict[int, float]:
    """Fraction of queries with a same-class item among their k nearest neighbours.

    Every item is a query against all others; the query itself is excluded by its index (not by
    dropping the first neighbour), so duplicates of the query count as real neighbours.
    `metric` is "euclidean" on the raw embeddings (the paper's protocol) or "cosine".
    """
    ks = tuple(sorted(set(ks)))
    check_inputs(embeddings, labels, metric)
    check_ks(ks, embeddings.shape[0])
    return _search(embeddings, labels, ks, False, metric, chunk_size, backend)[0]


def map_at_r(
    embeddings: torch.Tensor, labels: torch.Tensor, metric: str = "euclidean", chunk_size: int = 1024,
    backend: str = "auto",
) -> float:
    """MAP@R (Musgrave et al., "A Metric Learning Reality Check"): for a query with R other items of
    its class, the mean over its top R neighbours of precision@i at each correct rank i (divided by R,
    so misses count as zero). Rewards ranking the whole class first, not just one hit as Recall@K does.
    Queries alone in their class have no R and are left out of the mean.
    """
    check_inputs(embeddings, labels, metric)
    return _search(embeddings, labels, (), True, metric, chunk_size, backend)[1]  # type: ignore[return-value]


def evaluate(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ks: Iterable[int] = (1, 2, 4, 8),
    metric: str = "euclidean",
    chunk_size: int = 1024,
    backend: str = "auto",
    with_nmi: bool = True,
) -> dict:
    """{"recall": {k: Recall@k}, "map_at_r": MAP@R, "nmi": NMI} from one neighbour search.

    `with_nmi=False` skips the k-means, which dominates the cost on many-class sets (SOP: 11,316
    clusters of 60,502 points with scikit-learn takes many minutes).
    """
    ks = tuple(sorted(set(ks)))
    check_inputs(embeddings, labels, metric)
    check_ks(ks, embeddings.shape[0])
    recall, mapr = _search(embeddings, labels, ks, True, metric, chunk_size, backend)
    result: dict = {"recall": recall, "map_at_r": mapr}
    if with_nmi:
        result["nmi"] = nmi(embeddings, labels, metric)
    return result
