"""Image transforms: timm's standard recipes, with each backbone's own preprocessing, plus RGB conversion.

Train is RandomResizedCrop + horizontal flip (no colour jitter: the embedding-transfer papers train
with crop and flip only); eval is Resize(floor(size / crop_pct)) + CenterCrop. timm builds both, so
crop scale, interpolation and crop_pct mean exactly what they mean in timm's model configs.
Datasets such as CUB and SOP contain a few grayscale or CMYK images; they become 3-channel RGB first.

Normalisation (mean, std), interpolation and crop_pct are arguments: the backbone's values are declared
by the models package (`rct_dist.models.preprocess.Preprocess.transform_kwargs()`), and the trainer and
jobs pass them in, so this module applies a backbone's preprocessing without knowing any backbone.
The defaults are ImageNet's (timm's constants).

Two ways to move float work off the loader's CPU workers (train only; eval keeps the float path):

- `build_transform(..., uint8=True)` stops before ToTensor + Normalize and returns the crop as a
  uint8 (3, H, W) tensor: batches stay uint8 through collation (4x less to stack and send between
  processes) and `normalize_uint8` turns them into the same normalised floats on the training device.
- `DeviceDecode` takes the raw encoded images (bytes) of a batch, decodes JPEGs with
  `torchvision.io.decode_jpeg(..., device=...)` in one call (other formats on the CPU), and does the
  random resized crop, flip and normalisation on that device (`data.decode: gpu`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from PIL import Image
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.transforms import v2

Transform = Callable[[Image.Image], torch.Tensor]

DEFAULT_INTERPOLATION = "bilinear"


def build_transform(
    image_size: int,
    train: bool,
    *,
    crop_pct: float = DEFAULT_CROP_PCT,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    interpolation: str = DEFAULT_INTERPOLATION,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    uint8: bool = False,
) -> Transform:
    """PIL image (any mode) -> normalised float tensor (3, image_size, image_size).

    `crop_pct` only affects eval, `scale` and `hflip` only train. A backbone's crop_pct, interpolation,
    mean and std come from the models package (`Preprocess.transform_kwargs()`). `uint8=True`: the same
    crop as a uint8 tensor, not normalised (`normalize_uint8` finishes it on the device).
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
    steps = [v2.RGB(), *timm_transform.transforms]
    if uint8:  # the geometric steps only, then PIL -> uint8 CHW tensor
        steps = [t for t in steps if type(t).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")]
        steps.append(v2.PILToTensor())
    return v2.Compose(steps)


def normalize_uint8(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 images (..., 3, H, W) -> float32 (x / 255 - mean) / std, as ToTensor + Normalize compute it."""
    shape = (3, 1, 1)
    m = torch.tensor(mean, dtype=torch.float32, device=images.device).view(shape)
    s = torch.tensor(std, dtype=torch.float32, device=images.device).view(shape)
    return images.float().div_(255.0).sub_(m).div_(s)


DEVICE_INTERPOLATIONS = ("bilinear", "bicubic", "nearest")  # those tensor resizes do on any device


class DeviceDecode:
    """Encoded images of one batch (a list of bytes) -> normalised float32 (B, 3, S, S) on `device`, or
    (B, views, 3, S, S) when views > 1: each view its own random resized crop and flip, as the CPU
    train transform draws them (timm's RandomResizedCrop: scale, ratio 3/4 .. 4/3, 10 tries then a
    centre crop). JPEGs are decoded on `device` in one batched call; anything else (PNG) on the CPU.
    Random draws use torch's global generator.
    """

    def __init__(self, image_size: int, device: torch.device | str, *, views: int = 1,
                 scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3),
                 hflip: float = 0.5, interpolation: str = DEFAULT_INTERPOLATION,
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        if interpolation not in DEVICE_INTERPOLATIONS:
            raise ValueError(f"data.decode gpu resizes with {', '.join(DEVICE_INTERPOLATIONS)}; the backbone's "
                             f"interpolation is {interpolation!r}: set data.interpolation or use data.decode cpu")
        self.size, self.device, self.views = image_size, torch.device(device), views
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolation = v2.InterpolationMode(interpolation)
        self.mean, self.std = tuple(mean), tuple(std)

    def decode(self, blobs: Sequence[bytes]) -> list[torch.Tensor]:
        """uint8 RGB (3, H, W) tensors on the device, in order."""
        from torchvision.io import ImageReadMode, decode_image, decode_jpeg

        data = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        jpeg = [i for i, d in enumerate(data) if len(d) > 2 and d[0] == 0xFF and d[1] == 0xD8]
        out: list[torch.Tensor | None] = [None] * len(data)
        if jpeg:
            decoded = decode_jpeg([data[i] for i in jpeg], mode=ImageReadMode.RGB, device=self.device)
            for i, image in zip(jpeg, decoded):
                out[i] = image
        for i, image in enumerate(out):
            if image is None:
                out[i] = decode_image(data[i], mode=ImageReadMode.RGB).to(self.device)
        return out  # type: ignore[return-value]

    def crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """(top, left, h, w) of one random resized crop (torchvision's RandomResizedCrop.get_params)."""
        from torchvision.transforms import RandomResizedCrop

        return RandomResizedCrop.get_params(torch.empty(1, height, width), list(self.scale), list(self.ratio))

    def augment(self, image: torch.Tensor) -> torch.Tensor:
        """One view: uint8 (3, S, S)."""
        top, left, h, w = self.crop_box(image.shape[-2], image.shape[-1])
        view = v2.functional.resized_crop(image, top, left, h, w, [self.size, self.size],
                                          interpolation=self.interpolation, antialias=True)
        if torch.rand(1).item() < self.hflip:
            view = v2.functional.horizontal_flip(view)
        return view

    def __call__(self, blobs: Sequence[bytes]) -> torch.Tensor:
        views = [torch.stack([self.augment(image) for _ in range(self.views)]) for image in self.decode(blobs)]
        batch = torch.stack(views)
        return normalize_uint8(batch if self.views > 1 else batch[:, 0], self.mean, self.std)
