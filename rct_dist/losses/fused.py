"""The tiled RC loss as fused Triton kernels: every (row block, column tile) lives in registers only.

Same mathematics and the same communication as `tiled.py` (its module docstring derives the
gradient), with each block computed by one Triton program instead of a series of torch ops:

- `_row_sum_kernel` (forward, pass 1): each program owns BLOCK_M rows of this rank, streams the
  columns in tiles of BLOCK_N, forms the Gram block over the feature dimension in chunks of
  BLOCK_K, the distances, and adds up each row's distances (the row means m_i);
- `_loss_kernel` (forward, pass 2): the same blocks again, with the relaxed labels from the
  teacher's Gram block (also in chunks), and each row's pull, push and Q sums;
- `_grad_kernel` (backward, pass 3): each row's gradient in the symmetric form
  grad_k = sum_j A_kj (s_k - s_j) = s_k sum_j A_kj - sum_j A_kj s_j, from the O(N) row statistics
  that `tiled.backward_row_stats` computes and all-reduces (4 numbers per row). Its programs own
  BLOCK_M rows and D_OUT output features (one slice when D <= 512).

Three passes is what the mathematics allows: push_i and Q_i need the final row mean m_i (a
relu at delta m_i), and the gradient's column term needs every column's Q_j. Nothing of size
B x N is written to memory; what the kernels read and write is O(N * D).

Precision (`precision`, `PRECISIONS`): the products (student Gram, teacher Gram, and the
backward's A @ S) take
- "ieee": fp32 operands, IEEE fp32 products on CUDA cores (exact to fp32 rounding; the default);
- "tf32": operands rounded to TF32 (10-bit mantissa, round half away from zero) before the kernels,
  tensor-core products with fp32 accumulation;
- "bf16": bf16 operands, tensor-core products with fp32 accumulation.
The squared norms are computed (in torch, fp32) from the same rounded operands, so
|r|^2 + |c|^2 - 2 r.c is the squared distance of the rounded embeddings with only fp32 accumulation
error (products of TF32 or bf16 values are exact in fp32): the low-precision modes' error is the
rounding of the embeddings themselves (README, Fused kernel, for the measured tolerance). float64
inputs always run IEEE float64 products, whatever `precision` says.

Exact duplicates and near-duplicates: the Gram form's rounding noise (about eps (|r|^2 + |c|^2))
under the square root would give identical rows a distance of about sqrt(eps) |r| and a wrong
gradient direction. Every pair whose Gram-form squared distance is within the cancellation bound
TAU (|r|^2 + |c|^2) is recomputed directly as sum_k (r_k - c_k)^2 (a loop over the features on
CUDA cores, run only for the tiles that hold such a pair): duplicates get exactly zero, other
near pairs their exact distance. The embeddings are centred on the column mean first (in torch,
once: the rows are a view of the centred columns, no second copy).

Index arithmetic is 32-bit: `check_sizes` refuses, before any launch, sizes whose offsets would
overflow it.

On CPU tensors the kernels run only in Triton's interpreter (`TRITON_INTERPRET=1` set before Triton
is first imported in the process, and still set when they run): that is how the tests check them.
The interpreter's bf16 `tl.dot` is not faithful (it misreads bf16 operands), so under the
interpreter the "bf16" mode upcasts its bf16 operands to fp32 (exactly) and multiplies in fp32:
the same products as a bf16 tensor core with fp32 accumulation, up to the summation order.
`tests/test_kernel_compile.py` compiles every kernel for sm_80 and sm_90 with Triton's compiler
and ptxas (no spills, shared memory within the limit); no GPU run has checked them yet.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from rct_dist.losses.tiled import TileSetup, backward_row_stats

PRECISIONS = ("ieee", "tf32", "bf16")
_PREC_CODE = {"ieee": 0, "tf32": 1, "bf16": 2}

BLOCK: int | None = None
"""Row block and column tile edge of all kernels (a power of two >= 16; tests use 16 in the
interpreter); None picks them per kernel from the embedding size (`kernel_configs`)."""

TAU = {torch.float32: 2.0**-8, torch.float64: 2.0**-30}
"""Cancellation bound: pairs with Gram-form squared distance <= TAU (|r|^2 + |c|^2) are recomputed
from differences. The Gram form's error is at most about D eps (|r|^2 + |c|^2) (6e-5 relative at
D = 1024 in fp32, typically sqrt(D) eps), so above the bound it is at most ~1.5% (typically 0.05%)
of the squared distance, and exact zeros cannot hide there."""

INDEX_LIMIT = 2**31 - 1
"""Largest offset the kernels' 32-bit index arithmetic holds."""


@triton.jit
def _round_tf32(x):
    """x rounded to TF32 (10-bit mantissa, round half away from zero), as `round_tf32` in torch."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x1000) & -8192
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _reciprocal(x, FP32: tl.constexpr):
    """1 / x of positive x (1 elsewhere): fp32 to about 2 ulp (no IEEE division slow path)."""
    safe = tl.where(x > 0, x, 1.0)
    if FP32:
        return tl.fdiv(tl.full(x.shape, 1.0, tl.float32), safe, ieee_rounding=False)
    else:
        return 1.0 / safe


@triton.jit
def _dot(a, b, PREC: tl.constexpr, INTERP: tl.constexpr):
    """a @ b in the kernel's precision, accumulated in fp32 (fp64 for fp64 operands)."""
    if PREC == 1:
        return tl.dot(a, b, input_precision="tf32")
    elif PREC == 2:
        if INTERP:  # the interpreter's bf16 dot is not faithful; bf16 x bf16 is exact in fp32
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a, b, out_dtype=tl.float32)
    else:
        return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _gram(
    a_ptr, b_ptr, offs_m, offs_n, M, N, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, ACC: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) block of a @ b.T, the feature dimension in chunks of BLOCK_K."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for start in range(0, D, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = offs_k < D
        a = tl.load(a_ptr + offs_m[:, None] * D + offs_k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * D + offs_k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc += _dot(a, b, PREC, INTERP)
    return acc


@triton.jit
def _student_tile(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, offs_m, offs_n, B, N, D, row_offset, tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, FP32: tl.constexpr, NEAR: tl.constexpr,
):
    """Distances of a row block against a column tile, and the pairs that count."""
    ACC: tl.constexpr = tl.float32 if FP32 else tl.float64
    gram = _gram(rows_ptr, cols_ptr, offs_m, offs_n, B, N, D, BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, ACC)
    row_ok = offs_m < B
    col_ok = offs_n < N
    keep = row_ok[:, None] & col_ok[None, :] & (offs_n[None, :] != offs_m[:, None] + row_offset)
    r_norm = tl.load(rn_ptr + offs_m, mask=row_ok, other=0.0)
    c_norm = tl.load(cn_ptr + offs_n, mask=col_ok, other=0.0)
    norms = r_norm[:, None] + c_norm[None, :]
    sq = norms - 2.0 * gram
    if NEAR:
        near = keep & (sq <= tau * norms)
        if tl.max(near.to(tl.int32)) > 0:  # a (near-)duplicate pair: its distance from differences
            exact = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
            for k in range(0, D):
                a = tl.load(rows_ptr + offs_m * D + k, mask=row_ok, other=0.0).to(ACC)
                b = tl.load(cols_ptr + offs_n * D + k, mask=col_ok, other=0.0).to(ACC)
                diff = a[:, None] - b[None, :]
                exact += diff * diff
            sq = tl.where(near, exact, sq)
    sq = tl.where(keep & (sq > 0), sq, 0.0)
    if FP32:
        root = tl.sqrt_rn(tl.where(sq > 0, sq, 1.0))  # IEEE-rounded, as torch's
    else:
        root = tl.sqrt(tl.where(sq > 0, sq, 1.0))
    dist = tl.where(sq > 0, root, 0.0)
    return dist, keep


@triton.jit
def _labels(
    t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, offs_m, offs_n, keep, B, N, DT, neg_inv_sigma,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, FP32: tl.constexpr,
):
    """Relaxed labels w = exp(-|t_i - t_j|^2 / sigma) of the block (1 on the pairs that do not count)."""
    ACC: tl.constexpr = tl.float32 if FP32 else tl.float64
    gram = _gram(t_rows_ptr, t_cols_ptr, offs_m, offs_n, B, N, DT, BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, ACC)
    tr = tl.load(tr_norm_ptr + offs_m, mask=offs_m < B, other=0.0)
    tc = tl.load(tc_norm_ptr + offs_n, mask=offs_n < N, other=0.0)
    sq = (tr[:, None] + tc[None, :]) - 2.0 * gram
    sq = tl.where(keep & (sq > 0), sq, 0.0)
    return tl.exp(sq * neg_inv_sigma)


@triton.jit
def _row_sum_kernel(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, out_ptr, consts_ptr, B, N, D, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, FP32: tl.constexpr, NEAR: tl.constexpr,
):
    """Pass 1: out[i] = sum_j D_ij over all N columns."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    tau = tl.load(consts_ptr + 2)
    total = tl.zeros((BLOCK_M,), dtype=rn_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        dist, keep = _student_tile(rows_ptr, cols_ptr, rn_ptr, cn_ptr, offs_m, offs_n, B, N, D, row_offset, tau,
                                   BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, FP32, NEAR)
        total += tl.sum(dist, 1)
    tl.store(out_ptr + offs_m, total, mask=offs_m < B)


@triton.jit
def _loss_kernel(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, m_ptr,
    pull_ptr, push_ptr, q_ptr, consts_ptr, B, N, D, DT, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
    INTERP: tl.constexpr, FP32: tl.constexpr, NEAR: tl.constexpr,
):
    """Pass 2: each row's sums of w d^2, (1 - w) relu(delta - d)^2 and (1 - w) relu(delta - d) d."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < B
    m = tl.load(m_ptr + offs_m, mask=row_ok, other=1.0)
    inv_m = 1.0 / m
    neg_inv_sigma = tl.load(consts_ptr)
    delta = tl.load(consts_ptr + 1)
    tau = tl.load(consts_ptr + 2)
    pull = tl.zeros((BLOCK_M,), dtype=m.dtype)
    push = tl.zeros((BLOCK_M,), dtype=m.dtype)
    q = tl.zeros((BLOCK_M,), dtype=m.dtype)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        dist, keep = _student_tile(rows_ptr, cols_ptr, rn_ptr, cn_ptr, offs_m, offs_n, B, N, D, row_offset, tau,
                                   BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, FP32, NEAR)
        w = _labels(t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, offs_m, offs_n, keep, B, N, DT, neg_inv_sigma,
                    BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, FP32)
        d = dist * inv_m[:, None]
        short = tl.where(keep, tl.maximum(delta - d, 0.0), 0.0)
        pull += tl.sum(tl.where(keep, w * (d * d), 0.0), 1)
        push += tl.sum((1 - w) * (short * short), 1)
        q += tl.sum((1 - w) * short * d, 1)
    tl.store(pull_ptr + offs_m, pull, mask=row_ok)
    tl.store(push_ptr + offs_m, push, mask=row_ok)
    tl.store(q_ptr + offs_m, q, mask=row_ok)


@triton.jit
def _grad_kernel(
    rows_ptr, cols_ptr, rn_ptr, cn_ptr, t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, stats_ptr,
    grad_ptr, consts_ptr, B, N, D, DT, row_offset,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, D_OUT: tl.constexpr,
    PREC: tl.constexpr, INTERP: tl.constexpr, FP32: tl.constexpr, NEAR: tl.constexpr,
):
    """Backward: grad_k = s_k sum_j A_kj - sum_j A_kj s_j for this program's rows and D_OUT features,
    with A from the (N, 4) row statistics (delta m, alpha, beta, g / N) of every row; this rank's
    row i is global row row_offset + i."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_o = tl.program_id(1) * D_OUT + tl.arange(0, D_OUT)
    row_ok = offs_m < B
    o_ok = offs_o < D
    stat_r = stats_ptr + (offs_m + row_offset) * 4
    margin_r = tl.load(stat_r, mask=row_ok, other=0.0)[:, None]
    alpha_r = tl.load(stat_r + 1, mask=row_ok, other=0.0)[:, None]
    beta_r = tl.load(stat_r + 2, mask=row_ok, other=0.0)[:, None]
    h_r = tl.load(stat_r + 3, mask=row_ok, other=0.0)[:, None]
    neg_inv_sigma = tl.load(consts_ptr)
    tau = tl.load(consts_ptr + 2)
    weight = tl.zeros((BLOCK_M,), dtype=rn_ptr.dtype.element_ty)
    mixed = tl.zeros((BLOCK_M, D_OUT), dtype=rn_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        dist, keep = _student_tile(rows_ptr, cols_ptr, rn_ptr, cn_ptr, offs_m, offs_n, B, N, D, row_offset, tau,
                                   BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, FP32, NEAR)
        w = _labels(t_rows_ptr, t_cols_ptr, tr_norm_ptr, tc_norm_ptr, offs_m, offs_n, keep, B, N, DT, neg_inv_sigma,
                    BLOCK_M, BLOCK_N, BLOCK_K, PREC, INTERP, FP32)
        stat_c = stats_ptr + offs_n * 4
        margin_c = tl.load(stat_c, mask=col_ok, other=0.0)[None, :]
        alpha_c = tl.load(stat_c + 1, mask=col_ok, other=0.0)[None, :]
        beta_c = tl.load(stat_c + 2, mask=col_ok, other=0.0)[None, :]
        h_c = tl.load(stat_c + 3, mask=col_ok, other=0.0)[None, :]
        short = beta_r * tl.maximum(margin_r - dist, 0.0) + beta_c * tl.maximum(margin_c - dist, 0.0)
        over_dist = (h_r + h_c) - (1 - w) * short
        positive = dist > 0  # false on the self pairs, masked pairs and duplicates
        pair = tl.where(positive, w * (alpha_r + alpha_c) + over_dist * _reciprocal(dist, FP32), 0.0)
        cols = tl.load(cols_ptr + offs_n[:, None] * D + offs_o[None, :], mask=col_ok[:, None] & o_ok[None, :],
                       other=0.0)
        if PREC == 1:
            pair = _round_tf32(pair)
            weight += tl.sum(pair, 1)  # of the rounded weights: s_k - s_j cancels exactly for duplicates
            mixed += _dot(pair, cols, PREC, INTERP)
        elif PREC == 2:
            pair_bf16 = pair.to(tl.bfloat16)
            weight += tl.sum(pair_bf16.to(tl.float32), 1)
            mixed += _dot(pair_bf16, cols, PREC, INTERP)
        else:
            weight += tl.sum(pair, 1)
            mixed += _dot(pair, cols, PREC, INTERP)
    out_mask = row_ok[:, None] & o_ok[None, :]
    rows = tl.load(rows_ptr + offs_m[:, None] * D + offs_o[None, :], mask=out_mask, other=0.0).to(mixed.dtype)
    grad = rows * weight[:, None] - mixed
    tl.store(grad_ptr + offs_m[:, None] * D + offs_o[None, :], grad, mask=out_mask)


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


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def check_sizes(n: int, d: int, dt: int) -> None:
    """Refuse, before any launch, sizes whose offsets overflow the kernels' 32-bit index arithmetic:
    (N + a block) x D, (N + a block) x D_teacher and 4 (N + a block) must stay below 2^31."""
    pad = n + 256  # masked lanes of the last block compute offsets past N
    for what, width in (("student embedding size D", d), ("teacher embedding size", dt), ("row statistics", 4)):
        if pad * width > INDEX_LIMIT:
            raise ValueError(
                f"the fused Triton kernels index with 32-bit offsets: N = {n} rows x {what} {width} "
                f"(+ a block of padding) = {pad * width} exceeds {INDEX_LIMIT}; use kernel=\"torch\" "
                "or fewer rows per batch"
            )


def _pow2(x: int) -> int:
    return triton.next_power_of_2(max(int(x), 1))


def kernel_configs(
    d: int, dt: int, precision: str = "ieee", dtype: torch.dtype = torch.float32, arch: int = 90
) -> dict[str, dict]:
    """The launch configuration of each kernel: its block sizes (constexpr arguments, PREC/FP32 included)
    and `num_warps`/`num_stages`, for student size `d`, teacher size `dt` and compute capability
    `arch` (80: A100, 90: H100/H200). What `_Blocks` launches and what tests/test_kernel_compile.py
    compiles (chosen so that ptxas reports no spill there)."""
    check_precision(precision)
    fp32 = dtype != torch.float64
    prec = _PREC_CODE[precision] if fp32 else 0
    chunk = 64 if prec == 2 else 32  # 128 bytes of a row per chunk (bf16 64, fp32 32)
    k_size = max(16, min(chunk, _pow2(max(d, dt))))
    d_pad = max(16, _pow2(d))
    d_out = min(d_pad, 512)  # the backward's accumulator: BLOCK_M x D_OUT fp32 in registers
    # NEAR: the exact recomputation of (near-)duplicate pairs, in the IEEE mode (fp32 or fp64);
    # in tf32/bf16 the embeddings' own rounding is the larger error (module docstring)
    common = dict(PREC=prec, INTERP=INTERPRETED, FP32=fp32, NEAR=prec == 0)
    if BLOCK is not None:
        if BLOCK < 16 or BLOCK & (BLOCK - 1):
            raise ValueError(f"fused.BLOCK must be a power of two >= 16, got {BLOCK}")
        fwd = dict(BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=min(k_size, BLOCK))
        bwd = dict(BLOCK_M=BLOCK, BLOCK_N=BLOCK, BLOCK_K=min(k_size, BLOCK), D_OUT=d_out)
    elif prec:  # tensor cores: 128-row forward blocks. The backward holds a BLOCK_M x D_OUT fp32
        # accumulator (128 registers a thread at 64 x 512): at D_OUT = 512 bf16 leaves room for a
        # column tile of 16, tf32 (fp32 operands) only with 32-row blocks
        fwd = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=k_size)
        if d_out < 512:
            bwd = dict(BLOCK_M=64, BLOCK_N=32)
        else:
            bwd = dict(BLOCK_M=64, BLOCK_N=16) if prec == 2 else dict(BLOCK_M=32, BLOCK_N=32)
        bwd.update(BLOCK_K=k_size, D_OUT=d_out)
    else:  # IEEE fp32 (CUDA cores) or fp64; sm_80's ptxas keeps these at 128 registers
        fwd = dict(BLOCK_M=64 if arch >= 90 else 32, BLOCK_N=64, BLOCK_K=k_size)
        if d_out <= 128:
            bwd = dict(BLOCK_M=64, BLOCK_N=16)
        else:
            bwd = dict(BLOCK_M=32, BLOCK_N=32 if arch >= 90 or d_out < 512 else 16)
        bwd.update(BLOCK_K=k_size, D_OUT=d_out)
    run_fwd = dict(num_warps=8, num_stages=2)
    run_bwd = dict(num_warps=8, num_stages=2)
    run_rows = dict(num_warps=4 if prec and arch < 90 and BLOCK is None else 8, num_stages=2)
    return {
        "_row_sum_kernel": {"constexprs": {**fwd, **common}, **run_rows},
        "_loss_kernel": {"constexprs": {**fwd, **common}, **run_fwd},
        "_grad_kernel": {"constexprs": {**bwd, **common}, **run_bwd},
    }


def block_size(dim: int) -> int:
    """Row block of the forward kernels at student embedding size `dim` (`BLOCK` if set)."""
    return kernel_configs(dim, dim)["_row_sum_kernel"]["constexprs"]["BLOCK_M"]


def round_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded to TF32 (10-bit mantissa, round half away from zero), as `_round_tf32`."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & -8192).view(torch.float32)


def _operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """The centred embeddings as the kernels' product operands (rounded or cast for tensor cores)."""
    if x.dtype == torch.float64 or precision == "ieee":
        return x.contiguous()
    if precision == "tf32":
        return round_tf32(x)
    return x.to(torch.bfloat16).contiguous()


class _Blocks:
    """The kernels' operands (centred, in the product precision), their squared norms, and the
    launches of the three kernels over them. Row i of this rank is column row_offset + i."""

    def __init__(self, cols, t_cols, norms, setup: TileSetup, b: int, precision: str, compute: torch.dtype) -> None:
        self.cols, self.t_cols, self.norms, self.setup = cols, t_cols, norms, setup
        off = setup.row_offset
        self.rows, self.t_rows = cols[off:off + b], t_cols[off:off + b]  # views: no copy
        cn, tcn = norms
        self.rn, self.trn = cn[off:off + b], tcn[off:off + b]
        self.b, self.n, self.d, self.dt = b, cols.shape[0], cols.shape[1], t_cols.shape[1]
        arch = 90
        if cols.is_cuda:
            major, minor = torch.cuda.get_device_capability(cols.device)
            arch = major * 10 + minor
        self.configs = kernel_configs(self.d, self.dt, precision, compute, arch)
        self.compute = compute
        # -1/sigma, delta, tau in the compute dtype (a Python float argument would reach the kernel as fp32)
        self.consts = torch.tensor([-1.0 / setup.sigma, setup.delta, TAU[compute]], dtype=compute, device=cols.device)

    def _device(self):
        return torch.cuda.device(self.cols.device) if self.cols.is_cuda else contextlib.nullcontext()

    def _launch(self, name: str, kernel, grid_cols: int, *args) -> None:
        config = self.configs[name]
        grid = (triton.cdiv(self.b, config["constexprs"]["BLOCK_M"]), grid_cols)
        with self._device():
            kernel[grid](*args, **config["constexprs"], num_warps=config["num_warps"],
                         num_stages=config["num_stages"])

    def _student(self):
        return self.rows, self.cols, self.rn, self.norms[0]

    def _all(self):
        return (*self._student(), self.t_rows, self.t_cols, self.trn, self.norms[1])

    def row_sums(self) -> torch.Tensor:
        out = torch.zeros(self.b, dtype=self.compute, device=self.cols.device)
        if self.b:  # a rank without rows launches nothing (it still takes part in the collectives)
            self._launch("_row_sum_kernel", _row_sum_kernel, 1, *self._student(), out, self.consts,
                         self.b, self.n, self.d, self.setup.row_offset)
        return out

    def loss_sums(self, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pull, push, q = (torch.zeros_like(m) for _ in range(3))
        if self.b:
            self._launch("_loss_kernel", _loss_kernel, 1, *self._all(), m, pull, push, q, self.consts,
                         self.b, self.n, self.d, self.dt, self.setup.row_offset)
        return pull, push, q

    def grad(self, stats: torch.Tensor) -> torch.Tensor:
        grad = torch.zeros(self.b, self.d, dtype=self.compute, device=self.cols.device)
        if self.b:
            d_out = self.configs["_grad_kernel"]["constexprs"]["D_OUT"]
            self._launch("_grad_kernel", _grad_kernel, triton.cdiv(self.d, d_out), *self._all(),
                         stats.to(self.compute).contiguous(), grad, self.consts, self.b, self.n, self.d, self.dt,
                         self.setup.row_offset)
        return grad


class _FusedRC(torch.autograd.Function):
    """(pull, push) sums of this rank's rows; the gradient of `s_rows` includes their column role."""

    @staticmethod
    def forward(ctx, s_rows, s_cols, t_rows, t_cols, setup: TileSetup, precision: str):  # type: ignore[override]
        # s_rows / t_rows are this rank's rows of s_cols / t_cols (rows row_offset ...): the kernels
        # read them as views of the centred columns. Centring keeps Gram-form distances exact under
        # a large offset (tiled.py / geometry.py).
        compute = s_cols.dtype
        cols = _operand(s_cols - s_cols.mean(0), precision)
        t_c = _operand(t_cols - t_cols.mean(0), precision)
        norms = tuple(x.to(compute).square().sum(1) for x in (cols, t_c))
        blocks = _Blocks(cols, t_c, norms, setup, s_rows.shape[0], precision, compute)
        mean = blocks.row_sums() / cols.shape[0]
        m = mean.clamp_min(setup.min_row_mean)
        pull, push, q = blocks.loss_sums(m)
        ctx.setup, ctx.precision, ctx.b = setup, precision, s_rows.shape[0]
        ctx.save_for_backward(cols, t_c, *norms, m, pull, q, mean >= setup.min_row_mean)
        return pull.sum() / setup.norm, push.sum() / setup.norm

    @staticmethod
    @once_differentiable  # the blocks are recomputed without a graph: no second derivatives
    def backward(ctx, grad_pull, grad_push):  # type: ignore[override]
        cols, t_c, cn, tcn, m, pull, q, unfloored = ctx.saved_tensors
        setup: TileSetup = ctx.setup
        _, stats = backward_row_stats(setup, m, pull, q, unfloored, grad_pull, grad_push, cols.shape[0])
        grad = _Blocks(cols, t_c, (cn, tcn), setup, ctx.b, ctx.precision, m.dtype).grad(stats)
        return grad, None, None, None, None, None


def fused_row_sums(
    s_rows: torch.Tensor, s_cols: torch.Tensor, t_rows: torch.Tensor, t_cols: torch.Tensor, setup: TileSetup,
    precision: str = "ieee",
) -> dict[str, torch.Tensor]:
    """`tiled.tiled_row_sums` computed by the fused kernels (`setup.tile` is not used: see `kernel_configs`).

    `s_rows` must be rows row_offset ... of `s_cols` (and `t_rows` of `t_cols`), as a `PairBatch`
    gives them; `precision` is one of `PRECISIONS`.
    """
    check_precision(precision)
    reason = unavailable_reason(s_rows.device)
    if reason:
        raise RuntimeError(f'{reason}; use kernel="torch"')
    check_sizes(s_cols.shape[0], s_cols.shape[1], t_cols.shape[1])
    pull, push = _FusedRC.apply(s_rows, s_cols, t_rows, t_cols, setup, precision)
    return {"pull": pull, "push": push}
