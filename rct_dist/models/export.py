"""Export folder of an EmbeddingModel: safetensors weights + JSON config, never pickle.

Files:
- `config.json`: the model config (backbone, embedding_size, normalize, in_chans; feature_blocks and
  freeze_bn when set) + format and version;
- `model.safetensors`: the EmbeddingModel state dict (`backbone.*`, `head.*`), for `load_exported`;
- `backbone.safetensors`: the backbone alone with timm's own key names, so timm loads it as
  pretrained weights (`load_as_timm`, or `timm.create_model(backbone, pretrained=True,
  pretrained_cfg_overlay=dict(file=...), num_classes=0, global_pool="")` in any timm code).

`export_onnx` adds `model.onnx` (images -> embeddings, dynamic batch axis) and `model.onnx.json`, the
input contract (image size, resize and crop, normalisation) that is also stored in the ONNX model's
metadata_props; both are optional and need the `onnx` extra.

A timm classifier model is not a substitute for the head (`num_classes=embedding_size` pools with
avg only, the paper sums avg and max pooling), so `load_as_timm` pairs the genuine timm backbone
with the head module.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from rct_dist.atomic import atomic_write
from rct_dist.models.embedding import EmbeddingModel, build_model, create_backbone, head_for
from rct_dist.models.preprocess import Preprocess
from rct_dist.models.torchvision_backbones import is_torchvision

FORMAT = "rct-dist-embedding"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
BACKBONE_FILE = "backbone.safetensors"
ONNX_FILE = "model.onnx"
ONNX_CONTRACT_FILE = "model.onnx.json"
ONNX_FORMAT = "rct-dist-onnx"
ONNX_METADATA_KEY = "rct_dist.input_contract"
ONNX_EXTRA_HINT = 'pip install "rct-dist[onnx]"'
ONNX_INPUT, ONNX_OUTPUT = "images", "embeddings"
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
CONFIG_KEYS = {"backbone": str, "embedding_size": int, "normalize": bool, "in_chans": int}
# recorded only when set (older exports lack them): build_model's defaults apply when absent
OPTIONAL_KEYS = {"feature_blocks": int, "freeze_bn": bool}


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
    kinds = {**CONFIG_KEYS, **{k: v for k, v in OPTIONAL_KEYS.items() if config.get(k) is not None}}
    for key, kind in kinds.items():
        # bool is a subclass of int: reject True as a size
        if not isinstance(config[key], kind) or (kind is int and isinstance(config[key], bool)):
            raise ValueError(f"{path}: {key} must be a {kind.__name__}, got {config[key]!r}")
    return {key: config[key] for key in kinds}


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
    if is_torchvision(config["backbone"]):
        raise ValueError(
            f"load_as_timm needs a timm backbone; {folder} holds {config['backbone']!r}: use load_exported "
            f"(its {BACKBONE_FILE} has torchvision's key names for the cut model)"
        )
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


# ----------------------------------------------------------------------------------------------------
# ONNX
#
# Exporter: the TorchScript-based one (`torch.onnx.export(..., dynamo=False)`) by default. It is in
# every torch this project accepts (>= 2.4; deprecated since 2.9 with a warning, still present in
# 2.14), needs only the `onnx` package, and exported every backbone tried (small CNNs, ResNet,
# EfficientNet, ConvNeXt, Swin) with a dynamic batch axis in seconds, matching PyTorch as closely as
# the dynamo exporter does (about 1e-6 of the output's scale). `exporter="dynamo"` selects the torch.export-based exporter instead
# (torch >= 2.5 and the `onnxscript` package, >= 0.6 for torch 2.11+, not in the extra; 5-30x slower
# here): the way forward once a torch release drops the TorchScript exporter.
# ----------------------------------------------------------------------------------------------------

EXPORTERS = ("torchscript", "dynamo")
PREPROCESS_KEYS = ("mean", "std", "interpolation", "crop_pct")


def _require(module: str, purpose: str, hint: str = ONNX_EXTRA_HINT) -> Any:
    """Import an optional package, or fail saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ModuleNotFoundError(f"{purpose} needs the {module!r} package, which is not installed: {hint}") from err


def _preprocess_fields(preprocess: Any) -> dict[str, Any]:
    """mean, std, interpolation, crop_pct from an object with those attributes (a `Preprocess`) or a
    mapping (missing keys: `Preprocess()`'s ImageNet defaults); None: the defaults."""
    defaults = Preprocess()
    values = {key: getattr(defaults, key) for key in PREPROCESS_KEYS}
    if isinstance(preprocess, dict):
        unknown = sorted(set(preprocess) - set(PREPROCESS_KEYS))
        if unknown:
            raise ValueError(f"preprocess keys must be among {PREPROCESS_KEYS}, got {unknown}")
        values.update(preprocess)
    elif preprocess is not None:
        values.update({key: getattr(preprocess, key) for key in PREPROCESS_KEYS})
    mean, std = [float(v) for v in values["mean"]], [float(v) for v in values["std"]]
    crop_pct = float(values["crop_pct"])
    if len(mean) != len(std) or min(std) <= 0 or not 0 < crop_pct <= 1:
        raise ValueError(f"invalid preprocessing: mean={mean}, std={std}, crop_pct={crop_pct}")
    return dict(mean=mean, std=std, interpolation=str(values["interpolation"]), crop_pct=crop_pct)


def onnx_contract(
    model: EmbeddingModel,
    image_size: int,
    *,
    preprocess: Any = None,
    opset: int,
    exporter: str,
    batch_dynamic: bool = True,
) -> dict[str, Any]:
    """What a consumer of `model.onnx` must feed it and gets back (written to `model.onnx.json`)."""
    fields = _preprocess_fields(preprocess)
    batch: int | str = "batch" if batch_dynamic else 1
    channels = model.config["in_chans"]
    return {
        "format": ONNX_FORMAT,
        "format_version": FORMAT_VERSION,
        "model": dict(model.config),
        "input": {
            "name": ONNX_INPUT,
            "dtype": "float32",
            "shape": [batch, channels, image_size, image_size],
            "layout": "NCHW, RGB channel order" if channels == 3 else "NCHW",
            "normalisation": "(pixel / 255 - mean) / std, per channel",
            "mean": fields["mean"],
            "std": fields["std"],
        },
        # the evaluation transform the run measured its students with: timm's eval recipe, Resize + CenterCrop
        "resize": {
            "shorter_side": math.floor(image_size / fields["crop_pct"]),
            "interpolation": fields["interpolation"],
            "center_crop": image_size,
            "crop_pct": fields["crop_pct"],
        },
        "output": {
            "name": ONNX_OUTPUT,
            "dtype": "float32",
            "shape": [batch, model.config["embedding_size"]],
            "l2_normalized": bool(model.config["normalize"]),
        },
        "opset": opset,
        "exporter": exporter,
    }


def _float_cpu_eval(model: EmbeddingModel) -> tuple[EmbeddingModel, bool]:
    """The model to trace (fp32, CPU, eval) and whether it is a copy (else: restore train mode after)."""
    tensors = list(model.parameters()) + list(model.buffers())
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model, False
    import copy

    return copy.deepcopy(model).to("cpu", torch.float32), True


def _run_exporter(net: nn.Module, example: torch.Tensor, path: Path, opset: int, exporter: str,
                  batch_dynamic: bool) -> None:
    kwargs: dict[str, Any] = dict(input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT], opset_version=opset)
    if exporter == "torchscript":
        if "dynamo" in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5; the default since 2.9
            kwargs["dynamo"] = False
        if batch_dynamic:
            kwargs["dynamic_axes"] = {ONNX_INPUT: {0: "batch"}, ONNX_OUTPUT: {0: "batch"}}
        with warnings.catch_warnings():
            # the deprecation notice of this exporter, and tracer notes on shape checks the model makes
            # (the export is run at a second batch size by the verification instead)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(net, (example,), str(path), **kwargs)
        return
    _require("onnxscript", "the dynamo ONNX exporter", "pip install onnxscript (or use exporter='torchscript')")
    if batch_dynamic:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    program = torch.onnx.export(net, (example,), None, dynamo=True, verbose=False, **kwargs)
    program.save(str(path))


def _max_relative_error(session: Any, net: nn.Module, shape: Sequence[int], batches: Sequence[int],
                        seed: int) -> float:
    """max |onnx - torch| / max |torch| over random batches of each size (normal, as normalised images)."""
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batches:
        images = torch.randn(n, *shape, generator=generator)
        with torch.no_grad():
            expected = net(images).numpy()
        got = session.run([ONNX_OUTPUT], {ONNX_INPUT: images.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"ONNX output shape {got.shape} for a batch of {n}, PyTorch gives {expected.shape}")
        scale = max(float(abs(expected).max()), 1e-6)
        worst = max(worst, float(abs(got - expected).max()) / scale)
    return worst


def export_onnx(
    model: EmbeddingModel,
    path: str | os.PathLike,
    image_size: int,
    *,
    opset: int | None = None,
    batch_dynamic: bool = True,
    preprocess: Any = None,
    exporter: str = "torchscript",
    verify: bool = True,
    rtol: float = 1e-4,
) -> Path:
    """Write `path` (a `.onnx` file): images (N, C, image_size, image_size) float32 -> embeddings (N, D).

    The input is what the run's loader feeds the model: RGB scaled to [0, 1], then normalised with
    `preprocess` (mean/std/interpolation/crop_pct: a `Preprocess`, an object with those attributes or a
    dict; None: `Preprocess()`'s ImageNet defaults). That input contract goes into the model's metadata_props (key
    `rct_dist.input_contract`) and into `<path>.json`. `batch_dynamic` makes N a free axis.

    `opset`: None picks 17 (TorchScript exporter) or 18 (dynamo). `verify` runs the exported model with
    onnxruntime (CPU) on random batches of 1 and 3 (or 1 without a dynamic batch) and fails if it
    differs from the PyTorch eval output by more than `rtol` times the output's largest magnitude.
    Nothing is written unless export, check and verification pass; each file then appears atomically.
    The model is traced in eval mode on the CPU in fp32 (a copy if it is elsewhere); its mode is kept.
    """
    if not isinstance(model, EmbeddingModel):
        raise TypeError(f"export_onnx takes an EmbeddingModel, got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"path must name the .onnx file (e.g. FOLDER/{ONNX_FILE}), got {path}")
    onnx = _require("onnx", "ONNX export")
    ort = _require("onnxruntime", "checking the exported ONNX model") if verify else None
    opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    backbone = model.config["backbone"]
    contract = onnx_contract(model, image_size, preprocess=preprocess, opset=opset, exporter=exporter,
                             batch_dynamic=batch_dynamic)
    shape = (model.config["in_chans"], image_size, image_size)

    net, copied = _float_cpu_eval(model)
    was_training = net.training
    net.eval()
    try:
        import tempfile

        example = torch.randn(2 if batch_dynamic else 1, *shape, generator=torch.Generator().manual_seed(0))
        with tempfile.TemporaryDirectory(prefix="rct-dist-onnx-") as scratch:
            traced = Path(scratch) / ONNX_FILE
            try:
                _run_exporter(net, example, traced, opset, exporter, batch_dynamic)
                proto = onnx.load(str(traced))
                props = {p.key: p.value for p in proto.metadata_props}
                props[ONNX_METADATA_KEY] = json.dumps(contract, sort_keys=True)
                onnx.helper.set_model_props(proto, props)
                onnx.checker.check_model(proto)
            except Exception as err:  # the exporters raise many types; name the model that failed
                raise RuntimeError(
                    f"ONNX export ({exporter} exporter, opset {opset}) of backbone {backbone!r} failed: "
                    f"{type(err).__name__}: {err}"
                ) from err
        payload = proto.SerializeToString()
        if ort is not None:
            session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
            error = _max_relative_error(session, net, shape, (1, 3) if batch_dynamic else (1,), seed=1)
            if not error <= rtol:
                raise RuntimeError(
                    f"the ONNX model of backbone {backbone!r} differs from PyTorch: max relative error "
                    f"{error:.3g} > {rtol:g} (try another opset or exporter='dynamo')"
                )
    finally:
        if not copied:
            net.train(was_training)

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: stream.write(payload))
    text = json.dumps(contract, indent=2, sort_keys=True) + "\n"
    atomic_write(path.with_name(path.name + ".json"), lambda stream: stream.write(text.encode()))
    return path


def read_onnx_contract(path: str | os.PathLike) -> dict[str, Any]:
    """The input contract stored in an exported `model.onnx` (its metadata_props)."""
    onnx = _require("onnx", "reading an ONNX model")
    proto = onnx.load(str(path), load_external_data=False)
    for prop in proto.metadata_props:
        if prop.key == ONNX_METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} holds no rct-dist input contract (metadata key {ONNX_METADATA_KEY!r})")
