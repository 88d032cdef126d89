"""Embedding regression: the plainest transfer baseline, student -> teacher through a learned linear map.

Each student embedding s_i is mapped by a linear layer (bias included) into the teacher's space and
pulled onto that image's L2-normalised teacher embedding t_i: L = mean_i ||W s_i + b - t_i||^2. It
transfers each point, not the relations between points, which is what the relational losses (RC, RKD,
PKT, DarkRank) are compared against. The map is trained with the student and thrown away after
training. No gathering across ranks: the loss is a mean of per-sample terms, so averaging gradients
over equal local batches (what the engine does) gives the gradient of the global mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingRegressionLoss(nn.Module):
    """`loss(student, teacher)` = mean squared L2 error of `map(student)` against the unit teacher; part `mse`."""

    def __init__(self, student_dim: int, teacher_dim: int, normalize_teacher: bool = True) -> None:
        super().__init__()
        if student_dim < 1 or teacher_dim < 1:
            raise ValueError(f"dimensions must be positive, got student {student_dim}, teacher {teacher_dim}")
        self.map = nn.Linear(student_dim, teacher_dim)
        self.normalize_teacher = normalize_teacher

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, return_parts: bool = False):
        if student.ndim != 2 or teacher.ndim != 2 or student.shape[0] != teacher.shape[0]:
            raise ValueError(f"student and teacher must be (N, D) with the same N, got {tuple(student.shape)} "
                             f"and {tuple(teacher.shape)}")
        if student.shape[1] != self.map.in_features or teacher.shape[1] != self.map.out_features:
            raise ValueError(f"this loss maps {self.map.in_features}-d students to {self.map.out_features}-d "
                             f"teachers, got {student.shape[1]}-d and {teacher.shape[1]}-d")
        with torch.no_grad():
            target = teacher.float()
            target = F.normalize(target, dim=1) if self.normalize_teacher else target
        mapped = F.linear(student.float(), self.map.weight.float(), self.map.bias.float())  # fp32 under autocast
        loss = (mapped - target).square().sum(1).mean()
        return (loss, {"mse": loss.detach()}) if return_parts else loss
