"""Embedding model of the paper: a timm backbone's feature map, GAP + GMP, then a linear embedding.

As in the authors' code (`x = avg + max`, then `embedding`, orthogonal init, zero bias), the average
and max pooled features are summed, not concatenated. L2 normalisation is optional: the paper's
students are not normalised (the relaxed contrastive loss measures their raw distances).
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import rct_dist.models.small_cnn  # noqa: F401  (registers the small CNNs with timm)

HUB_HINT = (
    "pass a local weight file instead: build_model(..., pretrained_file=PATH) or the config key "
    "`model.pretrained_file` (a timm state dict, .safetensors or .pth, e.g. the model.safetensors "
    "of the backbone's Hugging Face hub repo)"
)


class EmbeddingHead(nn.Module):
    """Feature map -> (B, embedding_size): GAP + GMP summed, linear (orthogonal init), optional L2."""

    def __init__(
        self, in_features: int, embedding_size: int, normalize: bool = False, feature_fmt: str = "NCHW"
    ) -> None:
        super().__init__()
        if feature_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"feature_fmt must be NCHW or NHWC, got {feature_fmt!r}")
        self.spatial_dims = (2, 3) if feature_fmt == "NCHW" else (1, 2)
        self.normalize = normalize
        self.fc = nn.Linear(in_features, embedding_size)
        nn.init.orthogonal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 4:
            raise ValueError(
                f"the embedding head pools a 4-D feature map, got shape {tuple(features.shape)} "
                "(backbones returning token sequences, e.g. ViTs, are not supported)"
            )
        pooled = features.mean(self.spatial_dims) + features.amax(self.spatial_dims)
        embeddings = self.fc(pooled)
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


def create_backbone(name: str, in_chans: int = 3, **timm_kwargs: Any) -> nn.Module:
    """A timm model returning its unpooled feature map (no classifier, no global pooling)."""
    return timm.create_model(name, num_classes=0, global_pool="", in_chans=in_chans, **timm_kwargs)


def head_for(backbone: nn.Module, embedding_size: int, normalize: bool) -> EmbeddingHead:
    """The head matching a backbone's width and feature layout (timm's NHWC models, e.g. Swin)."""
    fmt = str(getattr(backbone, "output_fmt", "NCHW"))
    return EmbeddingHead(backbone.num_features, embedding_size, normalize, feature_fmt=fmt)


class EmbeddingModel(nn.Module):
    """`backbone` (timm, feature map) + `head`; `config` holds what rebuilds it (see export.py)."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = dict(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


def _check_pretrained_file(backbone: nn.Module, path: str) -> None:
    """Fail if the file lacked backbone weights: timm loads non-strictly when it drops a classifier,
    so a wrong file (another architecture's names, an rct-dist export) would leave a random backbone."""
    file_keys = set(timm.models.load_state_dict(path))
    missing = [k for k in backbone.state_dict() if k not in file_keys]
    if missing:
        raise RuntimeError(
            f"pretrained_file {path} lacks {len(missing)} of the backbone's weights (e.g. {missing[:3]}): "
            "it is not a timm state dict of this backbone (for an rct-dist export folder use "
            "load_exported / FrozenTeacher.from_export, or its backbone.safetensors)"
        )


def _pretrained_backbone(name: str, in_chans: int, pretrained_file: str | None) -> nn.Module:
    """Backbone with pretrained weights: from a local file, else timm's hub (a clear error offline)."""
    if pretrained_file is not None:
        if not os.path.isfile(pretrained_file):
            raise FileNotFoundError(f"pretrained_file not found: {pretrained_file}")
        try:
            backbone = create_backbone(
                name, in_chans, pretrained=True, pretrained_cfg_overlay=dict(file=str(pretrained_file))
            )
        except RuntimeError as err:  # torch's missing/unexpected keys or shape mismatch
            raise RuntimeError(f"could not load pretrained_file {pretrained_file} into {name!r}: {err}") from err
        _check_pretrained_file(backbone, str(pretrained_file))
        return backbone
    try:
        return create_backbone(name, in_chans, pretrained=True)
    except (OSError, RuntimeError) as err:  # hub/network failures; timm's "no pretrained weights exist"
        raise RuntimeError(
            f"could not get pretrained weights for {name!r} ({type(err).__name__}: {err}); "
            f"offline or no hub access? {HUB_HINT}"
        ) from err


def build_model(
    backbone: str,
    embedding_size: int,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    normalize: bool = False,
    in_chans: int = 3,
) -> EmbeddingModel:
    """timm backbone + embedding head; `pretrained_file` implies pretrained weights from that file."""
    if embedding_size < 1 or in_chans < 1:
        raise ValueError(f"embedding_size and in_chans must be positive, got {embedding_size}, {in_chans}")
    if pretrained or pretrained_file is not None:
        net = _pretrained_backbone(backbone, in_chans, pretrained_file)
    else:
        net = create_backbone(backbone, in_chans)
    config = dict(backbone=backbone, embedding_size=embedding_size, normalize=normalize, in_chans=in_chans)
    return EmbeddingModel(net, head_for(net, embedding_size, normalize), config)
