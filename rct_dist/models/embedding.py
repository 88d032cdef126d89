"""Embedding model of the paper: a backbone's feature map, GAP + GMP, then a linear embedding.

As in the authors' code (`x = avg + max`, then `embedding`, orthogonal init, zero bias), the average
and max pooled features are summed, not concatenated. L2 normalisation is optional: the paper's
students are not normalised (the relaxed contrastive loss measures their raw distances).

Backbones are timm models by name, or torchvision classification models as `torchvision/<name>`
(rct_dist.models.torchvision_backbones). `build_raw_features` is the same pooling without the linear
layer: the pretrained features themselves, the baseline a trained embedding must beat.
"""

from __future__ import annotations

import os
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import rct_dist.models.small_cnn  # noqa: F401  (registers the small CNNs with timm)
from rct_dist.models.torchvision_backbones import (
    create_torchvision_backbone,
    describe_mismatch,
    is_torchvision,
)

HUB_HINT = (
    "pass a local weight file instead: build_model(..., pretrained_file=PATH) or the config key "
    "`model.pretrained_file` (a timm state dict, .safetensors or .pth, e.g. the model.safetensors "
    "of the backbone's Hugging Face hub repo)"
)


def _spatial_dims(feature_fmt: str) -> tuple[int, int]:
    if feature_fmt not in ("NCHW", "NHWC"):
        raise ValueError(f"feature_fmt must be NCHW or NHWC, got {feature_fmt!r}")
    return (2, 3) if feature_fmt == "NCHW" else (1, 2)


def global_pool(features: torch.Tensor, spatial_dims: tuple[int, int]) -> torch.Tensor:
    """GAP + GMP, summed as in the authors' code: (B, C, H, W) or (B, H, W, C) -> (B, C)."""
    if features.ndim != 4:
        raise ValueError(
            f"the embedding head pools a 4-D feature map, got shape {tuple(features.shape)} "
            "(backbones returning token sequences, e.g. ViTs, are not supported)"
        )
    return features.mean(spatial_dims) + features.amax(spatial_dims)


class EmbeddingHead(nn.Module):
    """Feature map -> (B, embedding_size): GAP + GMP summed, linear (orthogonal init), optional L2."""

    def __init__(
        self, in_features: int, embedding_size: int, normalize: bool = False, feature_fmt: str = "NCHW"
    ) -> None:
        super().__init__()
        self.spatial_dims = _spatial_dims(feature_fmt)
        self.normalize = normalize
        self.fc = nn.Linear(in_features, embedding_size)
        nn.init.orthogonal_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        embeddings = self.fc(global_pool(features, self.spatial_dims))
        return F.normalize(embeddings, dim=1) if self.normalize else embeddings


def create_backbone(name: str, in_chans: int = 3, **timm_kwargs: Any) -> nn.Module:
    """A timm model returning its unpooled feature map (no classifier, no global pooling)."""
    return timm.create_model(name, num_classes=0, global_pool="", in_chans=in_chans, **timm_kwargs)


def head_for(backbone: nn.Module, embedding_size: int, normalize: bool) -> EmbeddingHead:
    """The head matching a backbone's width and feature layout (timm's NHWC models, e.g. Swin)."""
    fmt = str(getattr(backbone, "output_fmt", "NCHW"))
    return EmbeddingHead(backbone.num_features, embedding_size, normalize, feature_fmt=fmt)


def _batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class EmbeddingModel(nn.Module):
    """`backbone` (feature map) + `head`; `config` holds what rebuilds it (see export.py).

    `config["freeze_bn"]` (Proxy-Anchor's `--bn-freeze`): the backbone's BatchNorm layers keep their
    pretrained statistics and affine weights, small batches of a few classes being poor estimates."""

    def __init__(self, backbone: nn.Module, head: EmbeddingHead, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.config = dict(config)
        if self.config.get("freeze_bn"):
            for bn in _batchnorms(backbone):
                bn.requires_grad_(False)
            self.train(self.training)

    def train(self, mode: bool = True) -> EmbeddingModel:
        """As nn.Module's, but frozen BatchNorm layers stay in eval mode."""
        super().train(mode)
        if self.config.get("freeze_bn"):
            for bn in _batchnorms(self.backbone):
                bn.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(images))


class RawFeatureModel(nn.Module):
    """`backbone` + GAP + GMP (summed), no linear layer: images -> (B, num_features)."""

    def __init__(self, backbone: nn.Module, config: dict[str, Any]) -> None:
        super().__init__()
        self.backbone = backbone
        self.spatial_dims = _spatial_dims(str(getattr(backbone, "output_fmt", "NCHW")))
        self.config = dict(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return global_pool(self.backbone(images), self.spatial_dims)


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


def _timm_file_mismatch(name: str, in_chans: int, path: str) -> str | None:
    """Why a file does not load into a timm backbone: its raw keys against a fresh backbone's, the
    classifier (which timm drops from a classification checkpoint) left out."""
    try:
        found = timm.models.load_state_dict(path, weights_only=True)
        expected = create_backbone(name, in_chans)
    except Exception:  # unreadable file: timm's own error says it
        return None
    heads = expected.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    found = {k: v for k, v in found.items() if not k.startswith(tuple(h + "." for h in heads))}
    return describe_mismatch(expected.state_dict(), found)


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
            detail = _timm_file_mismatch(name, in_chans, str(pretrained_file))
            reason = f"{detail} (timm: {str(err)[:500]})" if detail else str(err)
            raise RuntimeError(f"could not load pretrained_file {pretrained_file} into {name!r}: {reason}") from err
        _check_pretrained_file(backbone, str(pretrained_file))
        return backbone
    try:
        return create_backbone(name, in_chans, pretrained=True)
    except (OSError, RuntimeError) as err:  # hub/network failures; timm's "no pretrained weights exist"
        raise RuntimeError(
            f"could not get pretrained weights for {name!r} ({type(err).__name__}: {err}); "
            f"offline or no hub access? {HUB_HINT}"
        ) from err


def _backbone(name: str, pretrained: bool, pretrained_file: str | None, in_chans: int,
              feature_blocks: int | None) -> nn.Module:
    """The feature-map backbone of `name` (timm, or `torchvision/<arch>`) with the asked weights."""
    if is_torchvision(name):
        return create_torchvision_backbone(name, pretrained, pretrained_file, feature_blocks, in_chans)
    if feature_blocks is not None:
        raise ValueError(
            f"feature_blocks is for torchvision backbones (torchvision/<name>), not the timm backbone {name!r}")
    if pretrained or pretrained_file is not None:
        return _pretrained_backbone(name, in_chans, pretrained_file)
    return create_backbone(name, in_chans)


def build_model(
    backbone: str,
    embedding_size: int,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    normalize: bool = False,
    in_chans: int = 3,
    feature_blocks: int | None = None,
    freeze_bn: bool = False,
) -> EmbeddingModel:
    """Backbone + embedding head; `pretrained_file` implies pretrained weights from that file.

    `backbone`: a timm name or `torchvision/<name>`; `feature_blocks` (torchvision only) keeps the first
    N blocks of its `features`; `freeze_bn` keeps the backbone's BatchNorm layers in eval mode, untrained.
    The config records the last two only when set, so older exports read the same."""
    if embedding_size < 1 or in_chans < 1:
        raise ValueError(f"embedding_size and in_chans must be positive, got {embedding_size}, {in_chans}")
    net = _backbone(backbone, pretrained, pretrained_file, in_chans, feature_blocks)
    config: dict[str, Any] = dict(backbone=backbone, embedding_size=embedding_size, normalize=normalize,
                                  in_chans=in_chans)
    if feature_blocks is not None:
        config["feature_blocks"] = feature_blocks
    if freeze_bn:
        config["freeze_bn"] = True
    return EmbeddingModel(net, head_for(net, embedding_size, normalize), config)


def build_raw_features(
    backbone: str,
    pretrained: bool = False,
    pretrained_file: str | None = None,
    feature_blocks: int | None = None,
    in_chans: int = 3,
) -> RawFeatureModel:
    """The backbone's pooled features (GAP + GMP, width `num_features`) without any trained layer:
    the raw pretrained baseline of a retrieval evaluation. Its `config` says what was built."""
    if in_chans < 1:
        raise ValueError(f"in_chans must be positive, got {in_chans}")
    net = _backbone(backbone, pretrained, pretrained_file, in_chans, feature_blocks)
    config: dict[str, Any] = dict(
        backbone=backbone, raw_features=True, embedding_size=int(net.num_features), normalize=False,
        in_chans=in_chans, pretrained=bool(pretrained or pretrained_file is not None),
        pretrained_file=None if pretrained_file is None else str(pretrained_file))
    if feature_blocks is not None:
        config["feature_blocks"] = feature_blocks
    return RawFeatureModel(net, config)
