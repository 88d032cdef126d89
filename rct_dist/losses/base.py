"""The one mechanism every transfer loss shares: check the inputs, gather the global batch, reduce.

A transfer loss `loss(student, teacher)` is a sum over the rows of a (global) batch, each row seen
against every column. With `torch.distributed` initialised, each rank holds only its own rows:

- the student is gathered with autograd (gradients flow back to the rank that owns each row),
  the teacher without; each rank computes its rows against all N columns, never N x N;
- the per-rank row sums are added up for the value every rank returns: the global loss;
- the gradient is scaled by the world size, because data-parallel engines (DDP, DeepSpeed) average
  gradients over ranks: after their averaging, parameters get exactly the gradient of the global loss.

Inputs are checked on every rank and the verdict is exchanged in the same collective as the row
counts, so a NaN on one rank raises a clear error on all ranks instead of hanging the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rct_dist.distributed import all_gather_rows, all_gather_stats, all_reduce_sum, is_distributed, world_size
from rct_dist.geometry import self_mask

# Problem codes travel between ranks as integers; index = code.
_PROBLEMS = (
    "",
    "student must be a 2-D floating-point tensor (batch, dim)",
    "teacher must be a 2-D floating-point tensor (batch, dim)",
    "student and teacher must have the same number of rows",
    "student contains NaN or Inf",
    "teacher contains NaN or Inf",
    "teacher has a row of zero norm, which cannot be L2-normalised",
)


def _is_matrix(x: object) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() == 2 and x.is_floating_point()


def _local_problem(student: torch.Tensor, teacher: torch.Tensor, teacher_needs_norm: bool) -> tuple[int, str]:
    """(code, detailed message) for this rank's inputs; code 0 means fine."""
    if not _is_matrix(student):
        return 1, f"{_PROBLEMS[1]}, got {describe(student)}"
    if not _is_matrix(teacher):
        return 2, f"{_PROBLEMS[2]}, got {describe(teacher)}"
    if student.shape[0] != teacher.shape[0]:
        return 3, f"{_PROBLEMS[3]}, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
    for code, x in ((4, student), (5, teacher)):
        bad = ~torch.isfinite(x).all(1)
        if bad.any():
            rows = bad.nonzero().flatten()[:5].tolist()
            return code, f"{_PROBLEMS[code]} (rows {rows}{', ...' if int(bad.sum()) > 5 else ''})"
    if teacher_needs_norm:
        zero = teacher.detach().square().sum(1) == 0
        if zero.any():
            return 6, f"{_PROBLEMS[6]} (rows {zero.nonzero().flatten()[:5].tolist()})"
    return 0, ""


def describe(x: object) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 stays float64; every other floating type (bf16, fp16, fp32) is computed in fp32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass
class PairBatch:
    """This rank's rows and the global batch's columns, in the loss's compute dtype."""

    student_rows: torch.Tensor
    student_cols: torch.Tensor
    teacher_rows: torch.Tensor
    teacher_cols: torch.Tensor
    row_offset: int
    gathered: bool

    @property
    def n(self) -> int:
        """Global batch size."""
        return self.student_cols.shape[0]

    def self_mask(self) -> torch.Tensor:
        return self_mask(self.student_rows.shape[0], self.n, self.row_offset, self.student_rows.device)

    def all_reduce_sum(self, x: torch.Tensor, with_grad: bool = True) -> torch.Tensor:
        """Sum over ranks when the batch is gathered (for losses with batch-wide statistics)."""
        return all_reduce_sum(x, with_grad) if self.gathered else x


def agree_on_inputs(
    code: int, message: str, problems: tuple[str, ...], stats: list[int], device: torch.device, distributed: bool
) -> list[list[int]]:
    """Every rank's `stats` (small integers, e.g. row counts), once all ranks have reported fine inputs.

    A rank with a problem (a nonzero index into `problems`) raises its own detailed `message`; the
    other ranks raise naming it, so no rank is left waiting in a collective.
    """
    if not distributed:
        if code:
            raise ValueError(message)
        return [list(stats)]
    gathered = all_gather_stats([*stats, code], device)
    bad = [(rank, s[-1]) for rank, s in enumerate(gathered) if s[-1]]
    if bad:
        raise ValueError(message or "; ".join(f"rank {r}: {problems[c]}" for r, c in bad))
    return [s[:-1] for s in gathered]


def build_pair_batch(
    student: torch.Tensor, teacher: torch.Tensor, *, gather: bool, teacher_needs_norm: bool = False
) -> PairBatch:
    """Check `student`/`teacher` and gather the global batch (the teacher never carries gradient)."""
    code, message = _local_problem(student, teacher, teacher_needs_norm)
    gathered = gather and is_distributed()
    shape = [student.shape[0], student.shape[1], teacher.shape[1]] if code == 0 else [0, 0, 0]
    device = student.device if isinstance(student, torch.Tensor) else torch.device("cpu")
    stats = agree_on_inputs(code, message, _PROBLEMS, shape, device, gathered)
    dims = {(s[1], s[2]) for s in stats}
    if len(dims) > 1:
        raise ValueError(f"embedding sizes differ across ranks: (student, teacher) dims {sorted(dims)}")
    counts = [s[0] for s in stats]
    if sum(counts) < 2:
        raise ValueError(f"a transfer loss needs at least 2 rows in the batch, got {sum(counts)}")
    dtype = compute_dtype(student, teacher)
    s = student.to(dtype)
    t = teacher.detach().to(dtype)
    rank_offset = sum(counts[: torch.distributed.get_rank()]) if gathered else 0
    return PairBatch(
        student_rows=s,
        student_cols=all_gather_rows(s, counts, with_grad=True) if gathered else s,
        teacher_rows=t,
        teacher_cols=all_gather_rows(t, counts, with_grad=False) if gathered else t,
        row_offset=rank_offset,
        gathered=gathered,
    )


def reduce_row_sums(parts: dict[str, torch.Tensor], batch: PairBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (global value, world-scaled local gradient) and the global value of each part."""
    local = torch.stack(list(parts.values())).sum()
    if not batch.gathered:
        return local, {k: v.detach() for k, v in parts.items()}
    totals = all_reduce_sum(torch.stack([local.detach(), *(v.detach() for v in parts.values())]), with_grad=False)
    scaled = local * world_size()
    loss = scaled + (totals[0] - scaled).detach()
    return loss, dict(zip(parts, totals[1:]))


class PairwiseTransferLoss(nn.Module):
    """Base of the label-free transfer losses; subclasses implement `row_sums`.

    Called as `loss(student, teacher)`; `return_parts=True` also returns the named parts
    (detached, global) for logging. Computation runs in fp32 (float64 stays float64) with autocast
    disabled, whatever dtype the models produce.
    """

    teacher_needs_norm = False

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def row_sums(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Named contributions of this rank's rows, already divided by the loss's normaliser."""
        raise NotImplementedError

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, return_parts: bool = False):
        device_type = student.device.type if isinstance(student, torch.Tensor) else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            batch = build_pair_batch(student, teacher, gather=self.gather, teacher_needs_norm=self.teacher_needs_norm)
            loss, parts = reduce_row_sums(self.row_sums(batch), batch)
        return (loss, parts) if return_parts else loss
