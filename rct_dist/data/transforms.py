"""Image transforms: timm's standard ImageNet recipes, plus RGB conversion for grayscale images.

Train is RandomResizedCrop + horizontal flip (no colour jitter: the embedding-transfer papers train
with crop and flip only); eval is Resize(floor(size / crop_pct)) + CenterCrop. timm builds both, so
crop scale, interpolation and crop_pct mean exactly what they mean in timm's model configs.
Datasets such as CUB and SOP contain a few grayscale or CMYK images; they become 3-channel RGB first.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.transforms import v2

Transform = Callable[[Image.Image], torch.Tensor]


def build_transform(
    image_size: int,
    train: bool,
    *,
    crop_pct: float = 0.875,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = "bilinear",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> Transform:
    """PIL image (any mode) -> normalised float tensor (3, image_size, image_size).

    `crop_pct` only affects eval, `scale` and `hflip` only train.
    """
    timm_transform = create_transform(
        image_size,
        is_training=train,
        scale=scale,
        hflip=hflip,
        color_jitter=None,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=tuple(mean),
        std=tuple(std),
    )
    return v2.Compose([v2.RGB(), *timm_transform.transforms])
