"""From a loader batch to model inputs on the training device, and the CUDA speed settings.

On CUDA: pinned host memory and `non_blocking=True` copies (the copy overlaps the host's next work),
images in `channels_last` memory format (what cuDNN's fastest convolution kernels use), and
`cudnn.benchmark` (cuDNN picks its kernels once per input shape; train batches have one shape).
On the CPU every one of these is skipped, so the same code runs there unchanged.

Batches arrive in one of three forms (`data.decode`, `data.uint8_batches`): normalised float32
images (the default), uint8 images normalised here on the device, or lists of encoded bytes that
`DeviceDecode` decodes and augments on the GPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from rct_dist.data.transforms import DeviceDecode, normalize_uint8
from rct_dist.models.preprocess import Preprocess


def views_flat(images: torch.Tensor, *per_image: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, V, C, H, W) views -> (B*V, C, H, W), each view keeping its image's rows of `per_image`
    (label, stored teacher embedding)."""
    if images.dim() == 5:
        views = images.shape[1]
        return images.flatten(0, 1), *(t.repeat_interleave(views, dim=0) for t in per_image)
    return images, *per_image


def channels_last_for(cfg: Any, device: torch.device) -> bool:
    """`model.channels_last`, where null means: on for CUDA, off elsewhere."""
    setting = cfg.model.channels_last
    return device.type == "cuda" if setting is None else bool(setting)


def prepare_models(cfg: Any, device: torch.device, *models: nn.Module | None) -> None:
    """cuDNN autotuning on CUDA, channels_last weights where asked; call before the engine is built."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if channels_last_for(cfg, device):
        for model in models:
            if model is not None:
                model.to(memory_format=torch.channels_last)


def _to(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


class DeviceFeed:
    """`feed(images, labels, *stored) -> (images, labels, stored, images_in_batch, views_in_batch)`:
    images flattened to (B*V, 3, H, W) in the engine's dtype (and channels_last where asked), labels
    and stored teacher embeddings repeated per view, everything on `device`."""

    def __init__(self, device: torch.device, dtype: torch.dtype, *, channels_last: bool = False,
                 normalize: Preprocess | None = None, decoder: DeviceDecode | None = None) -> None:
        self.device, self.dtype, self.channels_last = device, dtype, channels_last
        self.normalize, self.decoder = normalize, decoder

    @classmethod
    def for_run(cls, cfg: Any, preprocess: Preprocess, device: torch.device, dtype: torch.dtype) -> DeviceFeed:
        decoder = None
        if cfg.data.decode == "gpu":
            if device.type != "cuda":
                raise ValueError(f"data.decode: gpu needs a CUDA training device, this run trains on {device}")
            decoder = DeviceDecode(cfg.data.image_size, device, views=cfg.data.views,
                                   scale=tuple(cfg.data.crop_scale), hflip=cfg.data.hflip,
                                   interpolation=preprocess.interpolation, mean=preprocess.mean, std=preprocess.std)
        return cls(device, dtype, channels_last=channels_last_for(cfg, device),
                   normalize=preprocess if cfg.data.uint8_batches and decoder is None else None, decoder=decoder)

    def __call__(self, images: torch.Tensor | Sequence[bytes], labels: torch.Tensor, *stored: torch.Tensor):
        if self.decoder is not None:
            images = self.decoder(images)  # already on the device, normalised
        else:
            images = _to(images, self.device)
            if self.normalize is not None:
                images = normalize_uint8(images, self.normalize.mean, self.normalize.std)
        count = images.shape[0]
        images, labels, *stored = views_flat(images, _to(labels, self.device), *(_to(t, self.device) for t in stored))
        images = images.to(self.dtype)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, labels, stored, count, images.shape[0]
