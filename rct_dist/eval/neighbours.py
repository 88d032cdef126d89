"""Exact nearest neighbours in query chunks, the one search every retrieval metric is computed from.

Only a (chunk, N) block of distances is held at a time, never N x N: about 16 bytes per entry at
peak, measured 1 GB extra RSS for SOP's 60,502 x 512 at chunk_size=1024 (bench/eval_memory.py). Distances are squared
euclidean in float32 from `pairwise.squared_distances` (centred Gram form); "cosine" L2-normalises
first, which orders neighbours exactly as cosine similarity does.

Tie rule: neighbours are ordered by (distance, index), i.e. ties go to the lower index. On the torch
path this is exact: the float32 distance bits and the column index are packed into one int64 key
(non-negative floats order like their bit patterns), so a plain topk is already stable. The query is
excluded by its index (its key is set to the maximum), never by dropping the first hit, so a
duplicate of the query is a real neighbour.

faiss (exact IndexFlatL2; on normalised rows for "cosine") is used for CPU tensors when it is
installed, never required. It computes its own float32 distances, so it can order near-ties
(|d1 - d2| ~ 1e-7 d) differently, and among items tied exactly at the k-th distance it may return
another member of the tie than the torch path; everything else matches.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Iterator

import numpy as np
import torch

from rct_dist.geometry import safe_normalize, self_mask, squared_distances

METRICS = ("euclidean", "cosine")
BACKENDS = ("auto", "torch", "faiss")


def check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, metric: str) -> None:
    """Reject what would otherwise give silently wrong metrics (NaN distances, misaligned labels)."""
    if embeddings.dim() != 2 or labels.shape != (embeddings.shape[0],):
        raise ValueError(
            f"need (n, dim) embeddings and (n,) labels, got {tuple(embeddings.shape)} and {tuple(labels.shape)}"
        )
    if embeddings.shape[0] < 2:
        raise ValueError(f"need at least 2 items to retrieve from, got {embeddings.shape[0]}")
    if not embeddings.is_floating_point() or labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"need float embeddings and integer labels, got {embeddings.dtype} and {labels.dtype}")
    if not torch.isfinite(embeddings).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def check_ks(ks: tuple[int, ...], n: int) -> None:
    if not ks or ks[0] < 1 or ks[-1] >= n:
        raise ValueError(f"every k must be in [1, {n - 1}] for {n} items, got {ks}")


def _faiss_module(backend: str):
    """The faiss module when this search should use it, else None."""
    if backend == "torch":
        return None
    installed = importlib.util.find_spec("faiss") is not None
    if backend == "faiss" and not installed:
        raise ValueError("backend='faiss' but faiss is not installed")
    return importlib.import_module("faiss") if installed else None


def _torch_chunk(x: torch.Tensor, start: int, stop: int, k: int) -> torch.Tensor:
    """Indices of the k nearest items for queries start..stop, ordered by (distance, index)."""
    n = x.shape[0]
    mask = self_mask(stop - start, n, start, x.device)
    dist = squared_distances(x[start:stop], x, mask).abs_()  # abs_ turns a possible -0.0 into +0.0
    key = dist.view(torch.int32).to(torch.int64).bitwise_left_shift_(32)
    del dist
    key.bitwise_or_(torch.arange(n, device=x.device))
    key.masked_fill_(mask, torch.iinfo(torch.int64).max)
    return key.topk(k, dim=1, largest=False).values.bitwise_and_(0xFFFFFFFF)


def _faiss_chunk(index, x: np.ndarray, start: int, stop: int, k: int) -> torch.Tensor:
    """As `_torch_chunk` via faiss: search k + 1, drop the query's own index wherever it lands
    (or the last hit when ties pushed the query out), then order by (distance, index)."""
    dist, idx = index.search(x[start:stop], k + 1)
    own = idx == np.arange(start, stop)[:, None]
    own[~own.any(1), -1] = True
    keep = ~own
    dist, idx = dist[keep].reshape(-1, k), idx[keep].reshape(-1, k)
    order = np.lexsort((idx, dist), axis=1)
    return torch.from_numpy(np.take_along_axis(idx, order, 1).astype(np.int64))


def neighbour_chunks(
    embeddings: torch.Tensor, k: torch.Tensor, metric: str, chunk_size: int, backend: str = "auto"
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (start, stop, indices) per query chunk; `indices` has the chunk's max of `k` (per-query
    neighbour counts) columns, so one class of thousands of items costs only its own chunks."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    x = embeddings.detach().float()
    if metric == "cosine":
        x = safe_normalize(x, dim=1)
    # "auto" keeps GPU tensors on the GPU: the torch search there beats a copy to a CPU faiss index.
    faiss = _faiss_module(backend) if backend == "faiss" or x.device.type == "cpu" else None
    if faiss is not None:
        host = np.ascontiguousarray(x.cpu().numpy())
        index = faiss.IndexFlatL2(host.shape[1])
        index.add(host)
    n = x.shape[0]
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        kmax = int(k[start:stop].max())
        if faiss is None:
            yield start, stop, _torch_chunk(x, start, stop, kmax)
        else:
            yield start, stop, _faiss_chunk(index, host, start, stop, kmax).to(x.device)
