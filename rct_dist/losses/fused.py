"""The tiled RC loss as fused Triton kernels: every (row block, column tile) lives in registers only.

Same mathematics and the same communication as `tiled.py` (its module docstring derives the
gradient), with each block computed by one Triton program instead of a series of torch ops:

- `_row_sum_kernel` (pass 1): each program owns BLOCK rows of this rank, streams the columns in
  tiles of BLOCK, forms the Gram block, the distances, and adds up each row's distances;
- `_loss_kernel` (pass 2): the same blocks again, now with the relaxed labels from the teacher's
  Gram block, and each row's pull, push and Q sums;
- `_grad_kernel` (backward): each row's gradient in the symmetric form
  grad_k = sum_j A_kj (s_k - s_j) = s_k sum_j A_kj - sum_j A_kj s_j, from the O(N) row statistics
  that `tiled.backward_row_stats` computes and all-reduces (4 numbers per row).

Nothing of size B x N is written to memory; what the kernels read and write is O(N * D).

Numerics follow the torch path (README, Numerics): the embeddings are centred on the column mean
and their squared norms computed in torch, the Gram products run in the compute dtype (fp32 with
`input_precision="ieee"`, i.e. no TF32; float64 stays float64), squared distances are clamped at
zero, the self pairs are exactly zero, and the square root is taken only of positive values, so
duplicate rows give finite gradients.

On CPU tensors the kernels run only in Triton's interpreter (`TRITON_INTERPRET=1` set before Triton
is first imported in the process, and still set when they run): that is how the tests check them.
fp32 (the loss's compute dtype for every input but float64) is the path meant for GPUs; the float64
kernels exist for exact checks in the interpreter and have not been run on a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from rct_dist.losses.tiled import TileSetup, backward_row_stats

BLOCK: int | None = None
"""Row block and column tile edge of the kernels (a power of two >= 16); None picks one from the
student's embedding size (`block_size`)."""

TEACHER_CHUNK = 64
"""The teacher's Gram block is accumulated over its embedding size in chunks of at most this many."""


@triton.jit
def _student_tile(
    rows, r_norm, cols_ptr, cn_ptr, offs_m, offs_n, offs_d, B, N, D, row_offset, FP32: tl.constexpr
):
    """Distances of a row block against a column tile; the pairs that count; the column tile."""
    col_ok = offs_n < N
    keep = (offs_m[:, None] < B) & col_ok[None, :] & (offs_n[None, :] != offs_m[:, None] + row_offset)
    cols_mask = col_ok[:, None] & (offs_d[None, :] < D)
    cols = tl.load(cols_ptr + offs_n[:, None] * D + offs_d[None, :], mask=cols_mask, other=0.0)
    c_norm = tl.load(cn_ptr + offs_n, mask=col_ok, other=0.0)
    gram = tl.dot(rows, tl.trans(cols), input_precision="ieee")
    sq = (r_norm[:, None] + c_norm[None, :]) - 2.0 * gram
    sq = tl.where(keep & (sq > 0), sq, 0.0)
    if FP32:
        root = tl.sqrt_rn(tl.where(sq > 0, sq, 1.0))  # IEEE-rounded, as torch's
    else:
        root = tl.sqrt(tl.where(sq > 0, sq, 1.0))
    dist = tl.where(sq > 0, root, 0.0)
    return dist, keep, cols


@triton.jit
def _labels(
    t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, offs_m, offs_n, keep, B, N, DT, sigma,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Relaxed labels w = exp(-|t_i - t_j|^2 / sigma) of the block (1 on the pairs that do not count)."""
    row_ok = offs_m < B
    col_ok = offs_n < N
    gram = tl.zeros((BLOCK_M, BLOCK_N), dtype=t_rows_ptr.dtype.element_ty)
    for start in range(0, DT, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < DT
        a_mask = row_ok[:, None] & k_ok[None, :]
        a = tl.load(t_rows_ptr + offs_m[:, None] * DT + offs_k[None, :], mask=a_mask, other=0.0)
        b_mask = col_ok[:, None] & k_ok[None, :]
        b = tl.load(t_cols_ptr + offs_n[:, None] * DT + offs_k[None, :], mask=b_mask, other=0.0)
        gram += tl.dot(a, tl.trans(b), input_precision="ieee")
    tr = tl.load(tr_norm_ptr + offs_m, mask=row_ok, other=0.0)
    tc = tl.load(tc_norm_ptr + offs_n, mask=col_ok, other=0.0)
    sq = (tr[:, None] + tc[None, :]) - 2.0 * gram
    sq = tl.where(keep & (sq > 0), sq, 0.0)
    return tl.exp(-sq / sigma)


@triton.jit
def _load_rows(rows_ptr, rn_ptr, offs_m, offs_d, B, D):
    row_ok = offs_m < B
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    rows = tl.load(rows_ptr + offs_m[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    return rows, tl.load(rn_ptr + offs_m, mask=row_ok, other=0.0)


@triton.jit
def _row_sum_kernel(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, out_ptr, B, N, D, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, FP32: tl.constexpr,
):
    """Pass 1: out[i] = sum_j D_ij over all N columns."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    rows, r_norm = _load_rows(rows_ptr, rn_ptr, offs_m, offs_d, B, D)
    total = tl.zeros((BLOCK_M,), dtype=rows.dtype)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        dist, keep, cols = _student_tile(
            rows, r_norm, cols_ptr, cn_ptr, offs_m, offs_n, offs_d, B, N, D, row_offset, FP32
        )
        total += tl.sum(dist, 1)
    tl.store(out_ptr + offs_m, total, mask=offs_m < B)


@triton.jit
def _loss_kernel(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, m_ptr,
    pull_ptr, push_ptr, q_ptr, consts_ptr, B, N, D, DT, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr, FP32: tl.constexpr,
):
    """Pass 2: each row's sums of w d^2, (1 - w) relu(delta - d)^2 and (1 - w) relu(delta - d) d."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    rows, r_norm = _load_rows(rows_ptr, rn_ptr, offs_m, offs_d, B, D)
    m = tl.load(m_ptr + offs_m, mask=offs_m < B, other=1.0)
    sigma = tl.load(consts_ptr)
    delta = tl.load(consts_ptr + 1)
    pull = tl.zeros((BLOCK_M,), dtype=rows.dtype)
    push = tl.zeros((BLOCK_M,), dtype=rows.dtype)
    q = tl.zeros((BLOCK_M,), dtype=rows.dtype)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        dist, keep, cols = _student_tile(
            rows, r_norm, cols_ptr, cn_ptr, offs_m, offs_n, offs_d, B, N, D, row_offset, FP32
        )
        w = _labels(t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, offs_m, offs_n, keep, B, N, DT, sigma,
                    BLOCK_M, BLOCK_N, BLOCK_K)
        d = dist / m[:, None]
        short = tl.where(keep, tl.maximum(delta - d, 0.0), 0.0)
        pull += tl.sum(tl.where(keep, w * (d * d), 0.0), 1)
        push += tl.sum((1 - w) * (short * short), 1)
        q += tl.sum((1 - w) * short * d, 1)
    row_ok = offs_m < B
    tl.store(pull_ptr + offs_m, pull, mask=row_ok)
    tl.store(push_ptr + offs_m, push, mask=row_ok)
    tl.store(q_ptr + offs_m, q, mask=row_ok)


@triton.jit
def _grad_kernel(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, stats_ptr,
    grad_ptr, consts_ptr, B, N, D, DT, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, BLOCK_K: tl.constexpr, FP32: tl.constexpr,
):
    """Backward: grad_k = s_k sum_j A_kj - sum_j A_kj s_j, with A from the (N, 4) row statistics
    (delta m, alpha, beta, g / N) of every row; this rank's row i is global row row_offset + i."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    row_ok = offs_m < B
    rows, r_norm = _load_rows(rows_ptr, rn_ptr, offs_m, offs_d, B, D)
    stat_r = stats_ptr + (offs_m + row_offset) * 4
    margin_r = tl.load(stat_r, mask=row_ok, other=0.0)[:, None]
    alpha_r = tl.load(stat_r + 1, mask=row_ok, other=0.0)[:, None]
    beta_r = tl.load(stat_r + 2, mask=row_ok, other=0.0)[:, None]
    h_r = tl.load(stat_r + 3, mask=row_ok, other=0.0)[:, None]
    sigma = tl.load(consts_ptr)
    weight = tl.zeros((BLOCK_M,), dtype=rows.dtype)
    mixed = tl.zeros((BLOCK_M, D_PAD), dtype=rows.dtype)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        dist, keep, cols = _student_tile(
            rows, r_norm, cols_ptr, cn_ptr, offs_m, offs_n, offs_d, B, N, D, row_offset, FP32
        )
        w = _labels(t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, offs_m, offs_n, keep, B, N, DT, sigma,
                    BLOCK_M, BLOCK_N, BLOCK_K)
        stat_c = stats_ptr + offs_n * 4
        margin_c = tl.load(stat_c, mask=col_ok, other=0.0)[None, :]
        alpha_c = tl.load(stat_c + 1, mask=col_ok, other=0.0)[None, :]
        beta_c = tl.load(stat_c + 2, mask=col_ok, other=0.0)[None, :]
        h_c = tl.load(stat_c + 3, mask=col_ok, other=0.0)[None, :]
        short = beta_r * tl.maximum(margin_r - dist, 0.0) + beta_c * tl.maximum(margin_c - dist, 0.0)
        over_dist = (h_r + h_c) - (1 - w) * short
        positive = dist > 0  # false on the self pairs, masked pairs and duplicates
        pair = tl.where(positive, w * (alpha_r + alpha_c) + over_dist / tl.where(positive, dist, 1.0), 0.0)
        weight += tl.sum(pair, 1)
        mixed += tl.dot(pair, cols, input_precision="ieee")
    grad = rows * weight[:, None] - mixed
    tl.store(grad_ptr + offs_m[:, None] * D + offs_d[None, :], grad, mask=row_ok[:, None] & (offs_d[None, :] < D))


def _interpreted() -> bool:
    """Whether Triton and these kernels were built for Triton's interpreter (TRITON_INTERPRET=1 set
    when each was imported): Triton's own library functions (tl.sum) are built at its first import."""
    return not any(isinstance(f, triton.runtime.JITFunction) for f in (_row_sum_kernel, tl.sum))


INTERPRETED = _interpreted()


def unavailable_reason(device: torch.device) -> str | None:
    """Why the kernels cannot run on `device` in this process, or None when they can."""
    if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
        return None
    if device.type == "cpu":
        return (
            "the fused Triton kernels need CUDA tensors; on CPU they run only in Triton's interpreter "
            "(TRITON_INTERPRET=1 set before Triton is first imported in the process, meant for tests)"
        )
    return f"the fused Triton kernels run on CUDA devices, not on {device.type}"


def block_size(dim: int) -> int:
    """Row block and column tile edge: `BLOCK` if set, else smaller blocks for larger embeddings."""
    if BLOCK is not None:
        if BLOCK < 16 or BLOCK & (BLOCK - 1):
            raise ValueError(f"fused.BLOCK must be a power of two >= 16, got {BLOCK}")
        return BLOCK
    pad = triton.next_power_of_2(dim)
    return 64 if pad <= 64 else 32 if pad <= 256 else 16


class _Blocks:
    """The centred embeddings, their squared norms, and the launches of the three kernels over them."""

    def __init__(self, rows, cols, t_rows, t_cols, norms, setup: TileSetup) -> None:
        rn, cn, tn_r, tn_c = norms
        self.tensors = (rows, cols, t_rows, t_cols)
        self.norms = norms
        self.kernel_inputs = (rows, cols, rn, cn, t_rows, t_cols, tn_r, tn_c)  # the kernels' argument order
        self.setup = setup
        self.b, self.n, self.d, self.dt = rows.shape[0], cols.shape[0], rows.shape[1], t_rows.shape[1]
        block = block_size(self.d)
        self.grid = (triton.cdiv(self.b, block),)
        d_pad = max(16, triton.next_power_of_2(self.d))
        self.sizes = dict(BLOCK_M=block, BLOCK_N=block, D_PAD=d_pad, FP32=rows.dtype == torch.float32)
        self.chunk = max(16, min(TEACHER_CHUNK, triton.next_power_of_2(self.dt)))
        # sigma and delta in the compute dtype (a Python float argument would reach the kernel as fp32)
        self.consts = torch.tensor([setup.sigma, setup.delta], dtype=rows.dtype, device=rows.device)

    def _device(self):
        rows = self.tensors[0]
        return torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext()

    def row_sums(self) -> torch.Tensor:
        rows, cols, _, _ = self.tensors
        rn, cn, _, _ = self.norms
        out = rows.new_zeros(self.b)
        if self.b:  # a rank without rows launches nothing (it still takes part in the collectives)
            with self._device():
                _row_sum_kernel[self.grid](
                    rows, cols, rn, cn, out, self.b, self.n, self.d, self.setup.row_offset, **self.sizes
                )
        return out

    def loss_sums(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pull, push, q = (m.new_zeros(self.b) for _ in range(3))
        if self.b:
            with self._device():
                _loss_kernel[self.grid](
                    *self.kernel_inputs, m, pull, push, q, self.consts, self.b, self.n, self.d, self.dt,
                    self.setup.row_offset, BLOCK_K=self.chunk, **self.sizes,
                )
        return pull, push, q

    def grad(self, stats: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros_like(self.tensors[0])
        if self.b:
            with self._device():
                _grad_kernel[self.grid](
                    *self.kernel_inputs, stats.contiguous(), grad, self.consts, self.b, self.n, self.d, self.dt,
                    self.setup.row_offset, BLOCK_K=self.chunk, **self.sizes,
                )
        return grad


class _FusedRC(torch.autograd.Function):
    """(pull, push) sums of this rank's rows; the gradient of `s_rows` includes their column role."""

    @staticmethod
    def forward(ctx, s_rows, s_cols, t_rows, t_cols, setup: TileSetup):  # type: ignore[override]
        centre = s_cols.mean(0)  # as in tiled.py / pairwise.py: exact Gram distances under a large offset
        rows, cols = (s_rows - centre).contiguous(), (s_cols - centre).contiguous()
        t_centre = t_cols.mean(0)
        t_r, t_c = (t_rows - t_centre).contiguous(), (t_cols - t_centre).contiguous()
        norms = tuple(x.square().sum(1) for x in (rows, cols, t_r, t_c))
        blocks = _Blocks(rows, cols, t_r, t_c, norms, setup)
        mean = blocks.row_sums() / cols.shape[0]
        m = mean.clamp_min(setup.min_row_mean)
        pull, push, q = blocks.loss_sums(m)
        ctx.setup = setup
        ctx.save_for_backward(rows, cols, t_r, t_c, *norms, m, pull, q, mean >= setup.min_row_mean)
        return pull.sum() / setup.norm, push.sum() / setup.norm

    @staticmethod
    @once_differentiable  # the blocks are recomputed without a graph: no second derivatives
    def backward(ctx, grad_pull, grad_push):  # type: ignore[override]
        rows, cols, t_r, t_c, rn, cn, tn_r, tn_c, m, pull, q, unfloored = ctx.saved_tensors
        setup: TileSetup = ctx.setup
        _, stats = backward_row_stats(setup, m, pull, q, unfloored, grad_pull, grad_push, cols.shape[0])
        grad = _Blocks(rows, cols, t_r, t_c, (rn, cn, tn_r, tn_c), setup).grad(stats)
        return grad, None, None, None, None


def fused_row_sums(
    s_rows: torch.Tensor, s_cols: torch.Tensor, t_rows: torch.Tensor, t_cols: torch.Tensor, setup: TileSetup
) -> dict[str, torch.Tensor]:
    """`tiled.tiled_row_sums` computed by the fused kernels (`setup.tile` is not used: see `BLOCK`)."""
    reason = unavailable_reason(s_rows.device)
    if reason:
        raise RuntimeError(f'{reason}; use kernel="torch"')
    pull, push = _FusedRC.apply(s_rows, s_cols, t_rows, t_cols, setup)
    return {"pull": pull, "push": push}
