"""Seeded student/teacher batches and a loss-value-parts-gradient helper shared by the RC loss tests."""

from __future__ import annotations

import torch

from rct_dist.losses import RelaxedContrastiveLoss


def inputs(n: int, ds: int = 6, dt: int = 10, dtype: torch.dtype = torch.float64, duplicates: bool = False):
    """(student (n, ds), teacher (n, dt)), seeded; `duplicates` makes rows 3 and 5 copies of row n-2."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(n, ds, generator=g, dtype=dtype), torch.randn(n, dt, generator=g, dtype=dtype)
    if duplicates:
        s[3] = s[n - 2]
        s[5] = s[n - 2]
    return s, t


def loss_parts_grad(student: torch.Tensor, teacher: torch.Tensor, **kwargs):
    """(loss, parts, d loss / d student) of RelaxedContrastiveLoss(**kwargs)."""
    x = student.clone().requires_grad_(True)
    loss, parts = RelaxedContrastiveLoss(**kwargs)(x, teacher, return_parts=True)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), parts, grad
