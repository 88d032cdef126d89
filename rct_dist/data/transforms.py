"""Image transforms: timm's standard recipes, with each backbone's own preprocessing, plus RGB conversion.

Train is RandomResizedCrop + horizontal flip (no colour jitter: the embedding-transfer papers train
with crop and flip only); eval is Resize(floor(size / crop_pct)) + CenterCrop. timm builds both, so
crop scale, interpolation and crop_pct mean exactly what they mean in timm's model configs.
Datasets such as CUB and SOP contain a few grayscale or CMYK images; they become 3-channel RGB first.

Normalisation (mean, std), interpolation and crop_pct come from the backbone's timm pretrained config
(`Preprocess.of_backbone`: read from timm's registry, no model built and nothing downloaded), so a
CLIP backbone sees CLIP's statistics and a ResNet ImageNet's; `data.mean`, `data.std`,
`data.interpolation` and `data.crop_pct` override them one by one (`preprocess_for`). A frozen teacher
sees the very images the student sees: `renormalization` gives the exact affine map from the
student's normalisation to the teacher's own.

Two ways to move float work off the loader's CPU workers (train only; eval keeps the float path):

- `build_transform(..., uint8=True)` stops before ToTensor + Normalize and returns the crop as a
  uint8 (3, H, W) tensor: batches stay uint8 through collation (4x less to stack and send between
  processes) and `normalize_uint8` turns them into the same normalised floats on the training device.
- `DeviceDecode` takes the raw encoded images (bytes) of a batch, decodes JPEGs with
  `torchvision.io.decode_jpeg(..., device=...)` in one call (other formats on the CPU), and does the
  random resized crop, flip and normalisation on that device (`data.decode: gpu`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.transforms import v2

Transform = Callable[[Image.Image], torch.Tensor]

# The modes timm's transforms accept by name (timm.data.transforms.str_to_interp_mode).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
DEFAULT_INTERPOLATION = "bilinear"
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class Preprocess:
    """How loaded images become model inputs: normalisation, resize interpolation, eval crop fraction."""

    mean: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
    std: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)
    interpolation: str = DEFAULT_INTERPOLATION
    crop_pct: float = DEFAULT_CROP_PCT

    def __post_init__(self) -> None:
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"need 3 means and 3 positive stds, got mean={self.mean}, std={self.std}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct!r}")

    @classmethod
    def of_backbone(cls, backbone: str) -> Preprocess:
        """The preprocessing of a timm backbone's pretrained config (`name` or `name.tag`; the default
        tag otherwise). A model timm has no config for keeps the ImageNet defaults, as does a
        `torchvision/<name>` backbone (torchvision's classification weights: ImageNet mean/std,
        bilinear resize, crop 224 of 256)."""
        if backbone.startswith("torchvision/"):
            return cls(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
                       interpolation="bilinear", crop_pct=0.875)
        import rct_dist.models.small_cnn  # noqa: F401  (registers the small CNNs, whose configs are ImageNet's)
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(backbone)
        except RuntimeError:  # a name timm does not know: build_model reports it, not the transform
            cfg = None
        if cfg is None:
            return cls()
        interpolation = cfg.interpolation if cfg.interpolation in INTERPOLATIONS else DEFAULT_INTERPOLATION
        return cls(mean=cfg.mean, std=cfg.std, interpolation=interpolation,
                   crop_pct=cfg.crop_pct if cfg.crop_pct else DEFAULT_CROP_PCT)

    def override(self, **values: Any) -> Preprocess:
        """A copy with the non-None `values` (mean, std, interpolation, crop_pct) replacing its own."""
        return dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})

    def transform_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of `build_transform`."""
        return dict(mean=self.mean, std=self.std, interpolation=self.interpolation, crop_pct=self.crop_pct)


def preprocess_for(cfg: Any, backbone: str | None = None) -> Preprocess:
    """The preprocessing of a run config: the timm config of `backbone` (default `model.backbone`, the
    student; for an export, its config.json's backbone) under the `data.*` overrides."""
    data = cfg.data
    return Preprocess.of_backbone(backbone or cfg.model.backbone).override(
        mean=data.mean, std=data.std, interpolation=data.interpolation, crop_pct=data.crop_pct)


def renormalization(source: Preprocess, target: Preprocess) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale, shift), each (1, 3, 1, 1) float32, with x_target = x_source * scale + shift for images
    normalised with `source` that a model expecting `target`'s normalisation must see:
    (x * std_s + mean_s - mean_t) / std_t. None when the two normalisations are equal."""
    if source.mean == target.mean and source.std == target.std:
        return None
    mean_s, std_s, mean_t, std_t = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1)
                                    for v in (source.mean, source.std, target.mean, target.std))
    return (std_s / std_t).float(), ((mean_s - mean_t) / std_t).float()


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

    `crop_pct` only affects eval, `scale` and `hflip` only train. `Preprocess.transform_kwargs()` gives
    a backbone's crop_pct, interpolation, mean and std. `uint8=True`: the same crop as a uint8 tensor,
    not normalised (`normalize_uint8` finishes it on the device).
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
