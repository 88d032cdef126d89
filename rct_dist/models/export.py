"""Export folder of an EmbeddingModel: safetensors weights + JSON config, never pickle.

Files:
- `config.json`: the model config (backbone, embedding_size, normalize, in_chans) + format and version;
- `model.safetensors`: the EmbeddingModel state dict (`backbone.*`, `head.*`), for `load_exported`;
- `backbone.safetensors`: the backbone alone with timm's own key names, so timm loads it as
  pretrained weights (`load_as_timm`, or `timm.create_model(backbone, pretrained=True,
  pretrained_cfg_overlay=dict(file=...), num_classes=0, global_pool="")` in any timm code).

A timm classifier model is not a substitute for the head (`num_classes=embedding_size` pools with
avg only, the paper sums avg and max pooling), so `load_as_timm` pairs the genuine timm backbone
with the head module.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rct_dist.models.embedding import EmbeddingModel, build_model, create_backbone, head_for

FORMAT = "rct-dist-embedding"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
CONFIG_KEYS = {"backbone": str, "embedding_size": int, "normalize": bool, "in_chans": int}


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """State dict as independent contiguous CPU tensors (safetensors refuses shared storage)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def export_model(model: EmbeddingModel, folder: str | os.PathLike) -> Path:
    """Write the export folder (call it on one rank only).

    Each file is written under a temporary name and renamed into place, `config.json` last: a reader
    never sees a partly written file, and a failed export leaves the previous one whole. The three
    renames are not one atomic step, so export to a fresh folder where readers run concurrently.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **model.config}
    payload = json.dumps(config, indent=2, sort_keys=True) + "\n"
    writers = {
        MODEL_FILE: lambda p: save_file(_tensors(model), p),
        BACKBONE_FILE: lambda p: save_file(_tensors(model.backbone), p),
        CONFIG_FILE: lambda p: p.write_text(payload),
    }
    staged: list[tuple[Path, Path]] = []
    try:
        for name, write in writers.items():
            tmp = folder / f".{name}.{os.getpid()}.tmp"
            staged.append((tmp, folder / name))
            write(tmp)
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """The validated model config of an export folder (only the keys `build_model` takes)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not an rct-dist export folder: {path} is missing")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(f"{path} is not an rct-dist export config (format must be {FORMAT!r})")
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {config.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
        )
    missing = sorted(set(CONFIG_KEYS) - set(config))
    if missing:
        raise ValueError(f"{path} lacks the keys {missing}")
    for key, kind in CONFIG_KEYS.items():
        # bool is a subclass of int: reject True as a size
        if not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool)):
            raise ValueError(f"{path}: {key} must be a {kind.__name__}, got {config[key]!r}")
    return {key: config[key] for key in CONFIG_KEYS}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"export folder incomplete: {path} is missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _check_state(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Raise one message naming the missing, unexpected and mis-shaped tensors of `source`."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in tensors]
    problems += [f"unexpected {k}" for k in tensors if k not in expected]
    problems += [
        f"{k}: shape {tuple(tensors[k].shape)} in file, {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
        raise ValueError(f"{source} does not match the model of its config.json: {shown}")


def _load_checked(module: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    _check_state(module, tensors, source)
    module.load_state_dict(tensors)


def load_exported(folder: str | os.PathLike) -> EmbeddingModel:
    """Rebuild the EmbeddingModel of an export folder (CPU, train mode as any new module)."""
    config = read_config(folder)
    model = build_model(**config)
    path = Path(folder) / MODEL_FILE
    _load_checked(model, _read_tensors(path), path)
    return model


def load_as_timm(folder: str | os.PathLike) -> nn.Sequential:
    """`nn.Sequential(timm backbone, head)`, equal in output to `load_exported(folder)`.

    `[0]` is a plain timm model (`num_classes=0, global_pool=""`) that timm itself loaded from
    `backbone.safetensors` as pretrained weights; `[1]` is the EmbeddingHead with the exported weights.
    """
    config = read_config(folder)
    folder = Path(folder)
    backbone_path = folder / BACKBONE_FILE
    tensors = _read_tensors(backbone_path)
    name, in_chans = config["backbone"], config["in_chans"]
    # the file has no classifier and in_chans-wide input weights: say so, and timm loads it strictly
    size = timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    overlay = dict(file=str(backbone_path), num_classes=0, input_size=(in_chans, *size[1:]))
    backbone = create_backbone(name, in_chans, pretrained=True, pretrained_cfg_overlay=overlay)
    _check_state(backbone, tensors, backbone_path)  # some timm entrypoints load non-strictly
    head = head_for(backbone, config["embedding_size"], config["normalize"])
    model_path = folder / MODEL_FILE
    head_tensors = {k[len("head."):]: v for k, v in _read_tensors(model_path).items() if k.startswith("head.")}
    _load_checked(head, head_tensors, model_path)
    return nn.Sequential(backbone, head)
