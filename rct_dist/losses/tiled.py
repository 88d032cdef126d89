"""The RC loss in tiles: exact, with nothing of size B x N (let alone N x N) kept.

The untiled loss holds several (B_local, N) matrices (distances, relaxed labels, masks, and what
autograd saves of them). Here this rank's rows meet the columns in (tile, tile) blocks:

- pass 1 sums each row's distances: the row means m_i (all N columns, self included);
- pass 2 sums each row's pull and push terms, and Q_i = sum_j (1 - w_ij) relu(delta - d_ij) d_ij,
  which with the pull sum gives the derivative of the loss with respect to m_i;
- the backward recomputes the blocks instead of storing them (a `torch.autograd.Function`).

Gradient. With c_ij = dL/dD_ij (the row-mean term included: D_ij reaches L through d_ij and m_i)
and dD_ij/ds_i = (s_i - s_j) / D_ij = -dD_ij/ds_j, row k, which appears as a row and as a column,
gets

    grad_k = sum_j A_kj (s_k - s_j),   A_kj = (c_kj + c_jk) / D_kj   (0 where D_kj = 0),
    c_ij   = a_i w_ij d_ij - b_i (1 - w_ij) relu(delta - d_ij) + g_i / N,   d_ij = D_ij / m_i,
    a_i = 2 gp_i / (m_i norm),  b_i = 2 gq_i / (m_i norm),
    g_i = dL/dm_i = -2 (gp_i pull_i - gq_i Q_i) / (m_i norm)   (0 where m_i is floored),

with gp, gq the output gradients of the pull and push sums of the rank owning row i, and pull_i the
row's unnormalised pull sum. As computed, with alpha = a / m and beta = b / m (D_ij = 0 excluded):

    A_kj = w_kj (alpha_k + alpha_j)
           + [g_k / N + g_j / N - (1 - w_kj) (beta_k relu(delta m_k - D_kj) + beta_j relu(delta m_j - D_kj))] / D_kj.

c_jk needs the statistics (delta m, alpha, beta, g / N) of every row j: they are the only thing the
backward communicates (one all-reduce of N x 4 numbers), so each rank finishes the gradient of its
own rows against all columns, without sending an N x D gradient back. The backward thus equals
that of "this rank's row sums of (rows, all-gather-with-grad(rows))", which is exactly the core path,
so `base.reduce_row_sums` and its world-size scaling apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from rct_dist.distributed import all_reduce_sum
from rct_dist.geometry import distances, self_mask, squared_distances

AUTO_TILE = 1024
"""Tile edge that `chunk_size=None` uses once tiling pays (a (1024, 1024) fp32 block is 4 MiB)."""

AUTO_MIN_ELEMENTS = 2**22
"""`chunk_size=None` tiles when a rank's share of the batch holds more than this many (row, column)
pairs, i.e. from N > 2048 on one process: below it the untiled loss needs at most a few hundred MiB
and is about as fast (docs/benchmarks.md)."""

Span = tuple[int, int]


def tile_size(chunk_size: int | None, n: int, world: int) -> int:
    """Tile edge to use, or 0 for the untiled path.

    The automatic choice (`chunk_size=None`) depends only on the global batch size and the world
    size, not on this rank's row count, so every rank takes the same path (the two paths run
    different collectives in the backward).
    """
    if chunk_size is not None:
        return chunk_size
    rows = -(-n // world)
    return AUTO_TILE if rows * n > AUTO_MIN_ELEMENTS else 0


@dataclass(frozen=True)
class TileSetup:
    """What the tiles need besides the embeddings: the loss's constants and this rank's place."""

    sigma: float
    delta: float
    min_row_mean: float
    norm: int
    row_offset: int
    gathered: bool
    tile: int


def _spans(size: int, tile: int) -> list[Span]:
    return [(start, min(start + tile, size)) for start in range(0, size, tile)]


def _block(setup: TileSetup, rows: torch.Tensor, cols: torch.Tensor, r: Span, c: Span) -> tuple[torch.Tensor, ...]:
    """Distances of rows r against columns c, and the self-pair mask of that block."""
    mask = self_mask(r[1] - r[0], c[1] - c[0], setup.row_offset + r[0] - c[0], rows.device)
    return distances(rows[r[0]:r[1]], cols[c[0]:c[1]], mask), mask


def _labels(
    setup: TileSetup, t_rows: torch.Tensor, t_cols: torch.Tensor, r: Span, c: Span, mask: torch.Tensor
) -> torch.Tensor:
    """Relaxed labels w of the block (teacher rows already L2-normalised)."""
    return torch.exp(-squared_distances(t_rows[r[0]:r[1]], t_cols[c[0]:c[1]], mask) / setup.sigma)


def _global_rows(local: torch.Tensor, setup: TileSetup, n: int) -> torch.Tensor:
    """Every rank's per-row statistics, in global row order (a sum of zero-padded copies: O(N))."""
    if not setup.gathered:
        return local
    full = local.new_zeros(n, local.shape[1])
    full[setup.row_offset:setup.row_offset + local.shape[0]] = local
    return all_reduce_sum(full, with_grad=False)


def backward_row_stats(
    setup: TileSetup,
    m: torch.Tensor,
    pull: torch.Tensor,
    q: torch.Tensor,
    unfloored: torch.Tensor,
    grad_pull: torch.Tensor,
    grad_push: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backward's row statistics (delta m, alpha, beta, g / N): this rank's rows, and all N rows.

    The second is the backward's only communication (one all-reduce of N x 4 numbers when the batch
    is gathered); the fused kernels (`fused.py`) use the same statistics.
    """
    scale = 2 / (m * setup.norm)
    g_over_n = -scale * (grad_pull * pull - grad_push * q) * unfloored / n
    local = torch.stack([setup.delta * m, scale * grad_pull / m, scale * grad_push / m, g_over_n], 1)
    return local, _global_rows(local, setup, n)


class _TiledRC(torch.autograd.Function):
    """(pull, push) sums of this rank's rows; the gradient of `s_rows` includes their column role."""

    @staticmethod
    def forward(ctx, s_rows, s_cols, t_rows, t_cols, setup: TileSetup):  # type: ignore[override]
        centre = s_cols.mean(0)  # distances are shift-invariant; centring keeps them exact (pairwise.py)
        rows, cols = s_rows - centre, s_cols - centre
        n, spans_r, spans_c = cols.shape[0], _spans(rows.shape[0], setup.tile), _spans(cols.shape[0], setup.tile)
        row_sum = rows.new_zeros(rows.shape[0])
        for r in spans_r:
            for c in spans_c:
                row_sum[r[0]:r[1]] += _block(setup, rows, cols, r, c)[0].sum(1)
        mean = row_sum / n
        m = mean.clamp_min(setup.min_row_mean)
        pull, push, q = (rows.new_zeros(rows.shape[0]) for _ in range(3))
        for r in spans_r:
            for c in spans_c:
                dist, mask = _block(setup, rows, cols, r, c)
                w = _labels(setup, t_rows, t_cols, r, c, mask)
                d = dist / m[r[0]:r[1], None]
                short = torch.relu(setup.delta - d).masked_fill(mask, 0)
                pull[r[0]:r[1]] += (w * d.square()).sum(1)  # zero on the self pairs: d_ii = 0
                push[r[0]:r[1]] += ((1 - w) * short.square()).sum(1)
                q[r[0]:r[1]] += ((1 - w) * short * d).sum(1)
        ctx.setup = setup
        ctx.save_for_backward(rows, cols, t_rows, t_cols, m, pull, q, mean >= setup.min_row_mean)
        return pull.sum() / setup.norm, push.sum() / setup.norm

    @staticmethod
    @once_differentiable  # the tiles are recomputed without a graph: no second derivatives
    def backward(ctx, grad_pull, grad_push):  # type: ignore[override]
        rows, cols, t_rows, t_cols, m, pull, q, unfloored = ctx.saved_tensors
        setup: TileSetup = ctx.setup
        n = cols.shape[0]
        local, stats = backward_row_stats(setup, m, pull, q, unfloored, grad_pull, grad_push, n)
        grad = torch.zeros_like(rows)
        for r in _spans(rows.shape[0], setup.tile):
            margin_r, alpha_r, beta_r, h_r = local[r[0]:r[1]].T.unsqueeze(2)  # each (rows, 1)
            for c in _spans(n, setup.tile):
                margin_c, alpha_c, beta_c, h_c = stats[c[0]:c[1]].T.unsqueeze(1)  # each (1, cols)
                dist, mask = _block(setup, rows, cols, r, c)
                w = _labels(setup, t_rows, t_cols, r, c, mask)
                short = beta_r * torch.relu(margin_r - dist) + beta_c * torch.relu(margin_c - dist)
                over_dist = (h_r + h_c) - (1 - w) * short
                pair = torch.where(dist > 0, w * (alpha_r + alpha_c) + over_dist / dist, 0)
                grad[r[0]:r[1]] += rows[r[0]:r[1]] * pair.sum(1, keepdim=True) - pair @ cols[c[0]:c[1]]
        return grad, None, None, None, None


def tiled_row_sums(
    s_rows: torch.Tensor, s_cols: torch.Tensor, t_rows: torch.Tensor, t_cols: torch.Tensor, setup: TileSetup
) -> dict[str, torch.Tensor]:
    """RC pull and push sums of this rank's rows, already divided by `setup.norm`.

    `s_cols` are the global batch's student rows, detached: the gradient of `s_rows` already
    holds their role as columns. `t_rows`/`t_cols` are the L2-normalised teacher rows and columns.
    """
    pull, push = _TiledRC.apply(s_rows, s_cols, t_rows, t_cols, setup)
    return {"pull": pull, "push": push}
