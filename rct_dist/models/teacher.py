"""Frozen teacher: an EmbeddingModel that can neither train nor receive gradients.

Transfer trains the student only; the teacher's BatchNorm statistics, dropout and weights must stay
exactly as loaded, whatever a training loop calls (`model.train()` on a parent module included).

The teacher sees the student's images. When its backbone was trained with another normalisation
(a CLIP teacher for an ImageNet student, say), `normalize_inputs(scale, shift)` makes it map each input
x to x * scale + shift first (rct_dist.models.preprocess.renormalization), which is exactly its own
normalisation of the same pixels.
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import nn

from rct_dist.models.embedding import EmbeddingModel, build_model
from rct_dist.models.export import load_exported

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


class FrozenTeacher(nn.Module):
    """Eval mode for good, no gradients; `dtype="bf16"` runs under autocast, embeddings come out fp32.

    The teacher keeps its own precision whatever the student's: images arrive in the engine's dtype
    (bf16 or fp16 under DeepSpeed's `bf16`/`fp16` modes) and are cast to the teacher's weight dtype
    before its first layer, so a fp32 teacher beside a bf16 student runs in fp32 (or autocast bf16 when
    asked), never with mismatched input and weight types.
    """

    def __init__(self, model: EmbeddingModel, dtype: str = "fp32") -> None:
        super().__init__()
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.model = model.requires_grad_(False)
        self.dtype = dtype
        self.register_buffer("input_scale", None, persistent=False)
        self.register_buffer("input_shift", None, persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Always eval: `mode` is ignored, so a parent's `.train()` cannot switch the teacher."""
        return super().train(False)

    @property
    def config(self) -> dict:
        return self.model.config

    def normalize_inputs(self, scale: torch.Tensor | None, shift: torch.Tensor | None) -> FrozenTeacher:
        """Re-normalise every input as x * scale + shift (broadcast over (B, 3, H, W); fp32) before the
        model; None, None switches it off."""
        if (scale is None) != (shift is None):
            raise ValueError("give both scale and shift, or neither")
        device = next(self.model.parameters()).device
        self.input_scale = None if scale is None else scale.detach().to(device, torch.float32)
        self.input_shift = None if shift is None else shift.detach().to(device, torch.float32)
        return self

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype of the teacher's weights, which its inputs are cast to."""
        return next(self.model.parameters()).dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            images = images.float() * self.input_scale + self.input_shift
        images = images.to(self.weight_dtype)
        autocast_dtype = DTYPES[self.dtype]
        autocast = (
            torch.autocast(images.device.type, dtype=autocast_dtype)
            if autocast_dtype is not None
            else contextlib.nullcontext()
        )
        with torch.no_grad(), autocast:
            return self.model(images).float()

    @classmethod
    def from_timm(
        cls,
        backbone: str,
        embedding_size: int,
        pretrained_file: str | None = None,
        pretrained: bool = True,
        normalize: bool = False,
        in_chans: int = 3,
        dtype: str = "fp32",
    ) -> FrozenTeacher:
        """Pretrained timm backbone + a fresh orthogonal head (a random rotation/projection of GAP+GMP)."""
        model = build_model(backbone, embedding_size, pretrained, pretrained_file, normalize, in_chans)
        return cls(model, dtype)

    @classmethod
    def from_export(cls, folder: str | os.PathLike, dtype: str = "fp32") -> FrozenTeacher:
        """A trained teacher from an rct-dist export folder (see export.py)."""
        return cls(load_exported(folder), dtype)
