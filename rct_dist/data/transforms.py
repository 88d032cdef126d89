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
        tag otherwise). A model timm has no config for keeps the ImageNet defaults."""
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
) -> Transform:
    """PIL image (any mode) -> normalised float tensor (3, image_size, image_size).

    `crop_pct` only affects eval, `scale` and `hflip` only train. `Preprocess.transform_kwargs()` gives
    a backbone's crop_pct, interpolation, mean and std.
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
