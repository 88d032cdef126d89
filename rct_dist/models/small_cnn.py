"""Small CNN backbones for CPU runs on 28x28 Omniglot, registered with timm.

Registering them lets configs, `build_model` and exports name them like any timm backbone
(`timm.create_model("rct_cnn4", num_classes=0, global_pool="")` gives the (B, C, H, W) feature map),
so CPU tests and demos run the same code path as ResNets and ViTs on GPUs. They have no hub weights.

- `rct_cnn4`: teacher, 4 blocks of conv3x3-BN-ReLU-maxpool2 with 64 channels (the few-shot "Conv-4");
  28x28 -> (64, 1, 1).
- `rct_cnn3_small`: student, 3 blocks with 16/32/32 channels; 28x28 -> (32, 3, 3).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import ClassifierHead
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn


def _block(in_chans: int, out_chans: int) -> nn.Sequential:
    """conv3x3 (no bias: BN follows) - BN - ReLU - maxpool 2, halving the resolution."""
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(in_chans, out_chans, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(out_chans),
            act=nn.ReLU(inplace=True),
            pool=nn.MaxPool2d(2),
        )
    )


class SmallCNN(nn.Module):
    """Stack of conv blocks with timm's model interface (classifier head, pooling, `num_features`)."""

    def __init__(
        self,
        channels: Sequence[int],
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        widths = [in_chans, *channels]
        self.features = nn.Sequential(*(_block(a, b) for a, b in zip(widths, widths[1:])))
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = channels[-1]
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, pool_type=global_pool)


def _cfg() -> dict:
    """No weights (empty url); 3-channel 28x28 input, as the data pipeline produces RGB tensors."""
    return dict(
        url="",
        num_classes=0,
        input_size=(3, 28, 28),
        pool_size=None,
        crop_pct=1.0,
        interpolation="bilinear",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="features.0.conv",
        classifier="head.fc",
    )


default_cfgs = generate_default_cfgs({"rct_cnn4": _cfg(), "rct_cnn3_small": _cfg()})


@register_model
def rct_cnn4(pretrained: bool = False, **kwargs) -> SmallCNN:
    """Teacher: 4 x 64 channels."""
    return build_model_with_cfg(SmallCNN, "rct_cnn4", pretrained, channels=(64, 64, 64, 64), **kwargs)


@register_model
def rct_cnn3_small(pretrained: bool = False, **kwargs) -> SmallCNN:
    """Student: 16/32/32 channels."""
    return build_model_with_cfg(SmallCNN, "rct_cnn3_small", pretrained, channels=(16, 32, 32), **kwargs)
