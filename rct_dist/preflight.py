"""Checks of what a command's inputs name on disk, run by `rct-dist` before anything heavy starts.

The config loader checks a config by itself (types, ranges, cross-field rules); these checks read the
files it names: each split's `index.json` (P x K against the train split's classes, a batch per rank
against its samples, Recall@K against the evaluated splits' samples, stored teacher embeddings), the
teacher export, pretrained weight files, a resume checkpoint, the run folder, the DeepSpeed JSON, and the
backbone names. They run before any process group, DeepSpeed engine or run folder exists, so a wrong
path or size is one line naming the key and the file (exit 2), not a traceback minutes into start-up
on every rank, nor a run folder left behind by a run that never started.

Every failure is a ConfigError. Only what is cheap to read is checked (indexes, file presence, names):
shard contents, weights and downloads are not opened here.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from rct_dist.config import Config, ConfigError, resolve_deepspeed_config
from rct_dist.data.loader import ShardIndex
from rct_dist.data.splits import CacheSettings, cache_settings, split_location
from rct_dist.data.stores import StoreError, is_remote

INDEX = "index.json"


def _world_size() -> int:
    """The job's size as the trainer will see it (the launcher's variables; 1 without a launcher)."""
    from rct_dist.distributed.world import discover_world

    return discover_world().size


def load_split(key: str, folder: str | os.PathLike, how: str = "write it with `rct-dist make-shards`",
               cache: CacheSettings | None = None) -> ShardIndex:
    """The index of the split `key` names, or a ConfigError naming the key and the file (or the object)."""
    if is_remote(folder):
        try:
            return ShardIndex.load(folder, cache)
        except (OSError, ImportError, StoreError) as error:
            raise ConfigError(f"{key}: {error}") from None
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{key}: {folder} has no valid shard index ({error}); {how}") from None
    folder = Path(folder)
    index_file = folder / INDEX if folder.suffix != ".json" else folder
    tars = folder.is_dir() and any(p.suffix == ".tar" for p in folder.iterdir())
    if not index_file.is_file() and not tars:
        where = f"{folder} does not exist" if not folder.exists() else f"{folder} holds no {INDEX}"
        raise ConfigError(f"{key}: no shard index at {index_file} ({where}); {how}")
    try:
        return ShardIndex.load(folder)
    except FileNotFoundError as error:  # the index lists shards that are not there
        raise ConfigError(f"{key}: {error}") from None
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as error:
        reason = f"missing key {error}" if isinstance(error, KeyError) else " ".join(str(error).split())
        raise ConfigError(f"{key}: {index_file} is not a valid shard index ({reason}); write the split again "
                          "with `rct-dist make-shards`") from None
    except OSError as error:
        raise ConfigError(f"{key}: cannot read {index_file}: {error.strerror or error}") from None


def check_export(key: str, folder: str | os.PathLike | None) -> Path:
    """An rct-dist export folder (config.json and model.safetensors), or a ConfigError naming `key`."""
    from rct_dist.models.export import MODEL_FILE, read_config

    if not folder:
        raise ConfigError(f"{key} is not set: give an rct-dist export folder (a run's runs/<name>/export)")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file, not an export folder")
    if not folder.is_dir():
        raise ConfigError(f"{key}: export folder {folder} does not exist (train that run first, or fix the path)")
    try:
        read_config(folder)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(f"{key}: {' '.join(str(error).split())}") from None
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"{key}: {folder} has no {MODEL_FILE}: not a complete rct-dist export")
    return folder


def check_file(key: str, path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        state = "is a folder, not a file" if Path(path).is_dir() else "does not exist"
        raise ConfigError(f"{key}: {path} {state}")


def check_backbone(key: str, name: str, feature_blocks: int | None = None,
                   blocks_key: str = "model.feature_blocks") -> None:
    """A backbone name timm or torchvision knows (the small CNNs included), with a close name suggested."""
    import timm

    import rct_dist.models  # noqa: F401 - registers rct_cnn4 and rct_cnn3_small with timm
    from rct_dist.models.torchvision_backbones import architecture, is_torchvision

    if not name:
        raise ConfigError(f"{key} is empty: give a timm model name (e.g. resnet18) or torchvision/<name>")
    if is_torchvision(name):
        try:
            architecture(name)
        except ValueError as error:
            raise ConfigError(f"{key}: {error}") from None
        return
    if feature_blocks is not None:
        raise ConfigError(f"{blocks_key} is for torchvision backbones (torchvision/<name>), not the timm "
                          f"backbone {name!r}: set it to null")
    if ":" in name:  # hf-hub:..., local-dir:...: timm resolves these itself
        return
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigError(f"{key}: unknown backbone {name!r}{hint} (a timm model name, see timm.list_models(), "
                          "or torchvision/<name>)")


def _check_ks(cfg: Config, key: str, index: ShardIndex) -> None:
    if max(cfg.eval.ks) > index.samples - 1:
        raise ConfigError(f"eval.ks={cfg.eval.ks}: Recall@{max(cfg.eval.ks)} needs more than {max(cfg.eval.ks)} "
                          f"samples, but {key} {index.directory} has {index.samples}")


def _split_folder(cfg: Config, key: str) -> str | Path:
    split = getattr(cfg.data, key.split(".")[1])
    if not cfg.data.root and not Path(split).is_absolute():
        raise ConfigError("data.root is not set: give the shards folder that holds <split>/index.json "
                          "(e.g. data.root=shards/cub, or in the config file)")
    if is_remote(cfg.data.root):
        return split_location(cfg.data.root, split)
    root = Path(cfg.data.root)
    if cfg.data.root and not root.is_dir():
        raise ConfigError(f"data.root: {root} {'is a file, not' if root.exists() else 'is not'} a folder "
                          "(the folder `rct-dist make-shards --out` wrote)")
    return root / split


def check_data(cfg: Config, world: int) -> ShardIndex:
    """The train, eval and validation splits exist and fit the batch settings; returns the train index."""
    how = "write it with `rct-dist make-shards`, or fix data.root / {key}"
    cache = cache_settings(cfg.data)
    train = load_split("data.train_split", _split_folder(cfg, "data.train_split"), how.format(key="data.train_split"),
                       cache)
    d = cfg.data
    if d.pk is not None and d.pk[0] > train.classes:
        raise ConfigError(f"data.pk={d.pk}: P={d.pk[0]} classes per batch, but the train split {train.directory} "
                          f"has {train.classes} classes; use P <= {train.classes} (and batch_size = P x K)")
    samples = d.samples_per_epoch or train.samples
    if d.batch_size * world > samples:
        source = f"data.samples_per_epoch={d.samples_per_epoch}" if d.samples_per_epoch else \
            f"the train split {train.directory} ({train.samples} samples)"
        raise ConfigError(f"data.batch_size={d.batch_size} x {world} rank(s) = {d.batch_size * world} images per "
                          f"step, more than {source}: lower data.batch_size")
    if cfg.job == "transfer" and cfg.teacher.source == "shards" and train.teacher_dim is None:
        raise ConfigError(f"teacher.source is shards but the train split {train.directory} holds no teacher "
                          "embeddings (no 'teacher' in its index.json): write them with `rct-dist embed "
                          "--into-shards`, and point data.root there")
    for key in ("data.eval_split", "data.val_split"):
        if key == "data.val_split" and d.val_split is None:
            continue
        index = load_split(key, _split_folder(cfg, key), how.format(key=key), cache)
        _check_ks(cfg, key, index)
    return train


def check_run_folder(cfg: Config) -> None:
    """The run folder can be written as the config says (the trainer's own rule, checked before start)."""
    out = Path(cfg.run.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"run.out_dir: {out} is a file, not a folder")
    run_dir = out / cfg.run.name
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.name: {run_dir} is a file, not a run folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not cfg.run.resume and not cfg.run.overwrite:
        raise ConfigError(f"run folder {run_dir} exists: pass run.resume=auto to continue it, run.overwrite=true "
                          "to replace it, or another run.name")
    resume = cfg.run.resume
    if resume not in (None, "auto"):
        from rct_dist.train.checkpoint import MARKER

        folder = Path(resume)
        if not folder.is_dir():
            raise ConfigError(f"run.resume: checkpoint folder {folder} does not exist (run.resume=auto takes the "
                              "newest complete checkpoint of the run)")
        if not (folder / MARKER).is_file():
            raise ConfigError(f"run.resume: {folder} is not a complete checkpoint (no {MARKER} file): give a "
                              "checkpoints/step* folder, or run.resume=auto")


def check_deepspeed(cfg: Config) -> None:
    path = resolve_deepspeed_config(cfg.deepspeed.config)
    try:
        ds = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"deepspeed.config: {path} is not a readable JSON file ({' '.join(str(error).split())})") \
            from None
    if not isinstance(ds, dict):
        raise ConfigError(f"deepspeed.config: {path} must hold a JSON object, got {type(ds).__name__}")
    fp16 = ds.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"deepspeed.config: {cfg.deepspeed.config} trains in fp16, which needs a CUDA GPU "
                              "(DeepSpeed has no fp16 on a CPU); here use a _fp32 or _bf16 config of the same ZeRO "
                              "stage")


def check_models(cfg: Config) -> None:
    m = cfg.model
    check_backbone("model.backbone", m.backbone, m.feature_blocks)
    check_file("model.pretrained_file", m.pretrained_file)
    if cfg.job != "transfer":
        return
    t = cfg.teacher
    if t.source == "export":
        check_export("teacher.export", t.export)
    elif t.source == "model":
        check_backbone("teacher.backbone", t.backbone)
        check_file("teacher.pretrained_file", t.pretrained_file)


def check_train(cfg: Config, world: int | None = None) -> dict[str, Any]:
    """Everything `rct-dist train-teacher` / `transfer` can check before it starts; a summary on success."""
    world = _world_size() if world is None else world
    if cfg.data.decode == "gpu":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("data.decode: gpu decodes JPEGs with CUDA, but torch sees no CUDA device here: "
                              "use data.decode=cpu")
    if cfg.job == "transfer" and cfg.loss.name == "rc" and cfg.loss.rc.kernel == "triton":
        from rct_dist.losses.relaxed_contrastive import check_triton

        try:
            check_triton(cfg.loss.rc.chunk_size)
        except (ValueError, RuntimeError) as error:
            raise ConfigError(f"loss.rc.kernel triton: {error}") from None
    train = check_data(cfg, world)
    check_models(cfg)
    check_deepspeed(cfg)
    check_run_folder(cfg)
    return {"train_samples": train.samples, "train_classes": train.classes, "world": world}


def check_eval_inputs(cfg: Config, export: str | None, data: str | None, raw: bool = False) -> None:
    """`rct-dist eval`: the export (unless --raw) and the split to evaluate."""
    if raw:
        check_backbone("model.backbone", cfg.model.backbone, cfg.model.feature_blocks)
        check_file("model.pretrained_file", cfg.model.pretrained_file)
    else:
        check_export("--export" if export else "the run's export (run.out_dir/run.name/export)",
                     export or Path(cfg.run.out_dir) / cfg.run.name / "export")
    if data:
        index = load_split("--data", data, "give a split folder that holds index.json", cache_settings(cfg.data))
        key = "--data"
    else:
        key = "data.eval_split"
        index = load_split(key, _split_folder(cfg, key), "fix data.root / data.eval_split, or give --data",
                           cache_settings(cfg.data))
    _check_ks(cfg, key, index)


def check_embed_inputs(export: str, data: str, out: str, into_shards: str | None, overwrite: bool) -> None:
    """`rct-dist embed`: the export, the split, and where the results go."""
    check_export("--export", export)
    load_split("--data", data, "give a split folder that holds index.json")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out: {out} is a file, not a folder")
    if into_shards is not None:
        target = Path(into_shards)
        if target.exists() and not target.is_dir():
            raise ConfigError(f"--into-shards: {target} is a file, not a folder")
        if target.resolve() == Path(data).resolve():
            raise ConfigError(f"--into-shards {target} is the split being read (--data): give a new folder")
        if (target / INDEX).exists() and not overwrite:
            raise ConfigError(f"--into-shards: {target} already holds a split ({INDEX}); pass --overwrite to "
                              "replace it")


def check_folder_argument(flag: str, path: str | os.PathLike | None, must_exist: bool = False) -> None:
    """A folder argument that is not a file (and exists, when `must_exist`)."""
    if path is None:
        return
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {path} is a file, not a folder")
    if must_exist and not path.exists():
        raise ConfigError(f"{flag}: folder {path} does not exist")
