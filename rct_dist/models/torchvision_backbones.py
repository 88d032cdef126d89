"""torchvision classification models as backbones (`torchvision/<name>`), returning an unpooled NCHW map.

torchvision's own ImageNet weights are plain state dicts of the full classification model, so a
`pretrained_file` is checked against and loaded into that full model first (every key accounted for:
a file of another architecture must not leave random weights), and only then is the feature extractor
cut out of it: `.features` (`.layers` for MNASNet; plus the final ReLU that DenseNet applies in its
forward) or, for ResNet-like models, every child but `avgpool` and `fc`. `feature_blocks=N` keeps
the first N modules of `.features`: a smaller network that still carries its pretrained weights.

The backbone is an `nn.Sequential` whose state-dict keys are torchvision's own (`features.0.0.weight`,
`layer1.0.conv1.weight`), with `num_features` (output channels) like timm's `num_classes=0,
global_pool=""` models, so the embedding head pools it unchanged.
"""

from __future__ import annotations

import difflib
import os
import re
from collections import OrderedDict
from typing import Any, Mapping

import torch
import torchvision
from torch import nn

PREFIX = "torchvision/"
# families whose feature extractor is a Sequential attribute (cut after any block with feature_blocks)
FEATURES_FAMILIES = ("alexnet", "convnext", "densenet", "efficientnet", "mnasnet", "mobilenet_v2",
                     "mobilenet_v3", "squeezenet", "vgg")
# ResNet-like: every child but the pooling and the classifier
TRUNK_FAMILIES = ("regnet", "resnet", "resnext", "wide_resnet")
HEAD_CHILDREN = ("avgpool", "fc")
FILE_HINT = (
    "pass torchvision's weight file instead: build_model(..., pretrained_file=PATH) or the config key "
    "`model.pretrained_file` (the .pth state dict of the full classification model, as torchvision "
    "downloads it)"
)
# old DenseNet checkpoints (torchvision's own URLs) name layers 'norm.1'; torchvision renames them on load
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


def is_torchvision(name: str) -> bool:
    return name.startswith(PREFIX)


def _all_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def supported_names() -> list[str]:
    """The torchvision classification models this module can cut a feature map out of."""
    return [n for n in _all_names() if n.startswith(FEATURES_FAMILIES + TRUNK_FAMILIES)]


def architecture(name: str) -> str:
    """`torchvision/<arch>` -> `<arch>`, failing clearly on unknown or unsupported architectures."""
    arch = name[len(PREFIX):] if is_torchvision(name) else name
    known = _all_names()
    if arch not in known:
        close = difflib.get_close_matches(arch, known, n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise ValueError(f"unknown torchvision model {name!r}{hint} (torchvision.models.list_models())")
    if arch not in supported_names():
        raise ValueError(
            f"{name!r} has no feature map this package can cut out; supported torchvision backbones: "
            f"{', '.join(supported_names())}"
        )
    return arch


def _features_attr(arch: str) -> str | None:
    """Name of the Sequential that holds the features, None for ResNet-like models."""
    if arch.startswith(TRUNK_FAMILIES):
        return None
    return "layers" if arch.startswith("mnasnet") else "features"


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a weight file (.safetensors, or a torch file loaded with weights_only); a dict under
    `state_dict` / `model_state_dict` (training checkpoints) is unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    data: Any = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model_state_dict"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} holds no state dict (a mapping of names to tensors)")
    return dict(data)


def describe_mismatch(expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
                      ignore_missing: tuple[str, ...] = ("num_batches_tracked",)) -> str | None:
    """What keeps `found` (a file) from loading strictly into a module with state `expected`: the
    first missing, unexpected and mis-shaped key (with both shapes), or None when it fits."""
    missing = [k for k in expected if k not in found and not k.endswith(ignore_missing)]
    unexpected = [k for k in found if k not in expected]
    shapes = [k for k in expected if k in found and tuple(found[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of the model's tensors are missing from the file, first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} tensors of the file are not in the model, first {unexpected[0]!r}")
    if shapes:
        k = shapes[0]
        problems.append(
            f"{len(shapes)} tensors differ in shape, first {k!r}: {tuple(found[k].shape)} in the file, "
            f"{tuple(expected[k].shape)} in the model"
        )
    return "; ".join(problems) or None


def _load_file(model: nn.Module, path: str, name: str) -> None:
    """Strict load of torchvision's weight file into the full classification model, checked first."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained_file not found: {path}")
    state = read_state_dict(path)
    if name.startswith(PREFIX + "densenet"):
        state = {_DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in state.items()}
    problem = describe_mismatch(model.state_dict(), state)
    if problem:
        raise RuntimeError(
            f"pretrained_file {path} does not fit {name!r} (a torchvision state dict of the full "
            f"classification model is expected): {problem}"
        )
    model.load_state_dict(state, strict=False)  # strict but for num_batches_tracked of old files


class TorchvisionBackbone(nn.Sequential):
    """The feature extractor of a torchvision model: images -> (B, num_features, H', W')."""

    output_fmt = "NCHW"

    def __init__(self, modules: OrderedDict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.num_features = _width(self)


@torch.no_grad()
def _width(net: nn.Module) -> int:
    """Output channels, from one eval-mode forward of a 64x64 image (works for any cut)."""
    was_training = net.training
    net.eval()
    try:
        return int(net(torch.zeros(1, 3, 64, 64)).shape[1])
    finally:
        net.train(was_training)


def create_torchvision_backbone(
    name: str, pretrained: bool = False, pretrained_file: str | None = None,
    feature_blocks: int | None = None, in_chans: int = 3,
) -> TorchvisionBackbone:
    """Feature extractor of `torchvision/<arch>`: weights from `pretrained_file`, else torchvision's
    download when `pretrained`, else random; `feature_blocks` keeps the first N feature blocks."""
    arch = architecture(name)
    if in_chans != 3:
        raise ValueError(f"{name!r}: torchvision backbones take 3-channel images, got in_chans={in_chans}")
    attr = _features_attr(arch)
    if feature_blocks is not None and attr is None:
        raise ValueError(
            f"feature_blocks is for torchvision backbones with a `features` sequence ({name!r} has none; "
            f"families: {', '.join(FEATURES_FAMILIES)})"
        )
    if pretrained_file is None and pretrained:
        try:
            model = torchvision.models.get_model(arch, weights="DEFAULT")
        except Exception as err:  # network, hash or cache failures: all mean "no weights here"
            raise RuntimeError(
                f"could not download torchvision's weights for {name!r} ({type(err).__name__}: {err}); "
                f"offline? {FILE_HINT}"
            ) from err
    else:
        model = torchvision.models.get_model(arch, weights=None)
        if pretrained_file is not None:
            _load_file(model, str(pretrained_file), name)
    if attr is None:
        return TorchvisionBackbone(OrderedDict(
            (n, m) for n, m in model.named_children() if n not in HEAD_CHILDREN))
    features: nn.Sequential = getattr(model, attr)
    if feature_blocks is not None:
        if isinstance(feature_blocks, bool) or not 1 <= feature_blocks <= len(features):
            raise ValueError(
                f"feature_blocks must be between 1 and {len(features)} for {name!r}, got {feature_blocks}")
        features = features[:feature_blocks]
    modules: OrderedDict[str, nn.Module] = OrderedDict([(attr, features)])
    if arch.startswith("densenet") and len(features) == len(getattr(model, attr)):
        modules["relu"] = nn.ReLU()  # DenseNet's forward applies it after norm5, the last feature module
    return TorchvisionBackbone(modules)
