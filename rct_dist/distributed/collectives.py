"""Gathers and reductions across the default process group, with and without autograd.

Ranks may hold different numbers of rows (the last batch of an epoch); gloo aborts on unequal
all_gather sizes, so every gather first pads to the largest rank's row count and trims afterwards.
The autograd-aware variants are thin `torch.autograd.Function`s around the standard collectives,
because torch's own autograd collectives are deprecated or private in the versions we support.
`dist.all_gather` into a list is used because it is the one gather every backend and version has.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F


# torch 2.14 renamed reduce_scatter_tensor (and deprecated the old name); older torch has only it.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def is_distributed() -> bool:
    """True when a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def world_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_gather_stats(stats: Sequence[int], device: torch.device) -> list[list[int]]:
    """Every rank's small integer record (row counts, dims, problem codes), in rank order."""
    local = torch.tensor(list(stats), dtype=torch.int64, device=device)
    if not is_distributed():
        return [local.tolist()]
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local)
    return [p.tolist() for p in parts]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    missing = rows - x.shape[0]
    return F.pad(x, (0, 0, 0, missing)) if missing else x


def _gather_padded(x: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return parts


class _GatherRowsWithGrad(torch.autograd.Function):
    """All-gather of equally padded row blocks; the backward sums every rank's gradient for
    this rank's block (a reduce-scatter), so each row's gradient lands on the rank that owns it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.cat(_gather_padded(x))

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        # nccl runs a real reduce-scatter; gloo (torch >= 2.2) an all-reduce keeping this rank's block.
        grad = grad.contiguous()
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(), *grad.shape[1:]))
        _reduce_scatter(out, grad)
        return out


def all_gather_rows(x: torch.Tensor, counts: Sequence[int], with_grad: bool) -> torch.Tensor:
    """Concatenate every rank's rows of `x` in rank order; `counts[r]` is rank r's row count.

    With `with_grad`, gradients of the result flow back to the rank that owns each row.
    """
    if not is_distributed():
        return x
    padded = _pad_rows(x, max(counts))
    if with_grad:
        stacked = _GatherRowsWithGrad.apply(padded)
        blocks = stacked.split(padded.shape[0])
    else:
        with torch.no_grad():
            blocks = _gather_padded(padded.detach())
    return torch.cat([b[:n] for b, n in zip(blocks, counts)])


class _AllReduceSumWithGrad(torch.autograd.Function):
    """Sum over ranks; the gradient of a sum is the sum of every rank's output gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out


def all_reduce_sum(x: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Sum of `x` over ranks (identity on one process)."""
    if not is_distributed():
        return x
    if with_grad:
        return _AllReduceSumWithGrad.apply(x)
    out = x.detach().clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out)
    return out
