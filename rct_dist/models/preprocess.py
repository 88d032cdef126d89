"""A backbone's preprocessing, declared where the backbone is: normalisation, resize interpolation, eval crop.

The models package owns what a backbone expects (its timm pretrained config, or torchvision's
classification recipe) and says it as a `Preprocess`; the data package applies a `Preprocess`'s
values without knowing where they came from (`rct_dist.data.transforms.build_transform` takes
`Preprocess.transform_kwargs()`), and the trainer and jobs join the two. So a CLIP backbone sees CLIP's
statistics and a ResNet ImageNet's, and an ONNX export states the same values in its input contract.

`data.mean`, `data.std`, `data.interpolation` and `data.crop_pct` of a run config override the
backbone's values one by one (`preprocess_for`). A frozen teacher sees the very images the student
sees: `renormalization` gives the exact affine map from the student's normalisation to the teacher's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from timm.data import DEFAULT_CROP_PCT, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import rct_dist.models.small_cnn  # noqa: F401  (registers the small CNNs, whose configs are ImageNet's)
from rct_dist.models.torchvision_backbones import is_torchvision

# The modes timm's transforms accept by name (timm.data.transforms.str_to_interp_mode).
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
DEFAULT_INTERPOLATION = "bilinear"


@dataclass(frozen=True)
class Preprocess:
    """How loaded images become model inputs: normalisation, resize interpolation, eval crop fraction.

    The defaults are ImageNet's (timm's constants), the values a backbone without a config gets."""

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
        tag otherwise), read from timm's registry: no model built, nothing downloaded. A model timm has
        no config for keeps the ImageNet defaults, as does a `torchvision/<name>` backbone
        (torchvision's classification weights: ImageNet mean/std, bilinear resize, crop 224 of 256)."""
        if is_torchvision(backbone):
            return cls(mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD),
                       interpolation="bilinear", crop_pct=0.875)
        from timm.models import get_pretrained_cfg

        try:
            cfg = get_pretrained_cfg(backbone)
        except RuntimeError:  # a name timm does not know: build_model reports it, not the preprocessing
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
        """The values as keyword arguments (mean, std, interpolation, crop_pct), the names the data
        package's transforms take."""
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
