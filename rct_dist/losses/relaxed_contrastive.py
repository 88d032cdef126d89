"""The relaxed contrastive (RC) loss of Kim, Kim, Cho & Kwak, CVPR 2021.

With teacher embeddings t (L2-normalised) and student embeddings s (not normalised by default):

    w_ij = exp(-|t_i - t_j|^2 / sigma)          relaxed labels, no gradient
    d_ij = |s_i - s_j| / mean_k |s_i - s_k|      row mean over all n columns, self included, not detached
    L    = 1/n sum_i sum_{j != i} [ w_ij d_ij^2 + (1 - w_ij) max(0, delta - d_ij)^2 ]

This equals the authors' `Relaxed_Contra` (where `t_emb` is the student and `s_emb` the teacher).
Large batches run the exact tiled computation of `tiled.py`, which keeps nothing of size B x N,
with torch ops or, when asked (`kernel="triton"`), its fused Triton kernels (`fused.py`).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from rct_dist.distributed import world_size
from rct_dist.losses.base import PairBatch, PairwiseTransferLoss
from rct_dist.geometry import distances, safe_normalize, squared_distances
from rct_dist.losses.tiled import TileSetup, tile_size, tiled_row_sums

REDUCTIONS = ("paper", "mean_pairs")
KERNELS = ("auto", "torch", "triton")
PRECISIONS = ("ieee", "tf32", "bf16")  # fused.PRECISIONS, without importing Triton


@functools.cache
def _fused_module():
    """`rct_dist.losses.fused`, or None when Triton cannot be imported (imported only when needed)."""
    try:
        from rct_dist.losses import fused
    except ImportError:
        return None
    return fused


class RelaxedContrastiveLoss(PairwiseTransferLoss):
    """RC loss, `loss(student, teacher)`; parts `pull` and `push` for logging.

    Args:
        sigma: bandwidth of the relaxed labels.
        delta: margin of the push term, in units of the row-mean distance.
        normalize_student: L2-normalise the student first (the paper does not).
        reduction: "paper" divides the pair sum by n (the official code); "mean_pairs" by n(n-1).
        gather: with torch.distributed initialised, use the concatenation of all ranks' batches.
        min_row_mean: floor on the row-mean distance, so a fully collapsed student stays finite.
        chunk_size: tile edge of the tiled computation (same result, memory O(N*D + tile^2) per rank);
            None tiles automatically once a rank's share of pairs exceeds `tiled.AUTO_MIN_ELEMENTS`,
            0 never tiles.
        kernel: what computes the tiles: "torch" (torch ops), "triton" (fused Triton kernels, always,
            whatever the batch size; CUDA tensors, or CPU ones in Triton's interpreter under
            TRITON_INTERPRET=1), "auto" (torch ops, for now: no GPU run has yet shown the kernels equal
            and faster; the batch size from which "auto" takes them will come from that measurement).
            Same loss and gradient to rounding in the "ieee" precision.
        precision: the fused kernels' products (kernel "triton" only; the torch paths ignore it):
            "ieee" exact fp32 (CUDA cores, the default), "tf32" or "bf16" operands on tensor cores
            with fp32 accumulation (README, Fused kernel, for their measured error). float64 inputs
            always run in float64.
    """

    teacher_needs_norm = True

    def __init__(
        self,
        sigma: float = 1.0,
        delta: float = 1.0,
        normalize_student: bool = False,
        reduction: str = "paper",
        gather: bool = True,
        min_row_mean: float = 1e-12,
        chunk_size: int | None = None,
        kernel: str = "auto",
        precision: str = "ieee",
    ) -> None:
        super().__init__(gather=gather)
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        if delta <= 0:
            raise ValueError(f"delta must be positive, got {delta}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 0):
            raise ValueError(f"chunk_size must be None or a non-negative integer, got {chunk_size!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if kernel == "triton":
            check_triton(chunk_size)
        self.sigma = sigma
        self.delta = delta
        self.normalize_student = normalize_student
        self.reduction = reduction
        self.min_row_mean = min_row_mean
        self.chunk_size = chunk_size
        self.kernel = kernel
        self.precision = precision

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        n = batch.n
        norm = n if self.reduction == "paper" else n * (n - 1)
        with torch.no_grad():
            t_rows = safe_normalize(batch.teacher_rows)
            t_cols = safe_normalize(batch.teacher_cols)
        s_rows, s_cols = batch.student_rows, batch.student_cols
        tile = tile_size(self.chunk_size, n, world_size() if batch.gathered else 1)
        fused = self._fused(s_rows, tile)
        if tile or fused:
            # Columns without autograd: the tiled backward gives each row its column role itself.
            s_cols = s_cols.detach()
            if self.normalize_student:
                s_rows, s_cols = safe_normalize(s_rows), safe_normalize(s_cols)
            setup = TileSetup(self.sigma, self.delta, self.min_row_mean, norm, batch.row_offset, batch.gathered, tile)
            if fused:
                return fused.fused_row_sums(s_rows, s_cols, t_rows, t_cols, setup, self.precision)
            return tiled_row_sums(s_rows, s_cols, t_rows, t_cols, setup)
        mask = batch.self_mask()
        w = torch.exp(-squared_distances(t_rows, t_cols, mask) / self.sigma)
        if self.normalize_student:
            s_rows, s_cols = safe_normalize(s_rows), safe_normalize(s_cols)
        dist = distances(s_rows, s_cols, mask)
        d = dist / dist.mean(1, keepdim=True).clamp_min(self.min_row_mean)
        off_diagonal = (~mask).to(d.dtype)
        pull = (w * d.square() * off_diagonal).sum() / norm
        push = ((1 - w) * torch.relu(self.delta - d).square() * off_diagonal).sum() / norm
        return {"pull": pull, "push": push}

    def _fused(self, s_rows: torch.Tensor, tile: int):
        """The fused-kernel module when this call runs it, else None (the inputs are already checked).

        "auto" runs the torch path until a GPU measurement has shown the kernels equal and faster;
        the threshold it then takes them from will come from that measurement (it must depend only
        on what every rank decides alike, as `tile` does: the tiled and untiled paths run different
        collectives).
        """
        if self.kernel != "triton":
            return None
        return _fused_module()


def check_triton(chunk_size: int | None) -> None:
    """`kernel="triton"` needs Triton and either CUDA or Triton's interpreter: fail early and clearly."""
    if chunk_size == 0:
        raise ValueError('chunk_size=0 asks for the untiled torch loss, which kernel="triton" never runs; '
                         'use chunk_size=None with kernel="triton", or kernel="torch"')
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError('kernel="triton" needs the triton package, which is not installed; use kernel="torch"')
    interpret = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    if not (torch.cuda.is_available() or interpret):
        raise RuntimeError(
            'kernel="triton" needs a CUDA device (or TRITON_INTERPRET=1, which runs the kernels on CPU in '
            'Triton\'s interpreter, for tests); use kernel="torch"'
        )
    if _fused_module() is None:
        raise RuntimeError('kernel="triton": Triton is installed but cannot be imported; use kernel="torch"')
