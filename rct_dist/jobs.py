"""Jobs around a trained student: `eval` (retrieval metrics of an export), `embed` (an export's embeddings
of a split, optionally stored in a copy of the split's shards) and `export` (a student from any checkpoint).

`eval` and `embed` run on one process or on every rank of a launcher's job (torchrun, deepspeed): each
rank embeds the shards it owns and `extract_embeddings` gathers the rows by key, so the result does not
depend on the number of ranks. Stored embeddings are how a black-box teacher's view of the data travels
with it: `teacher.source: shards` trains against them without running any teacher model.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds

from rct_dist.config import Config, load_config
from rct_dist.data.batch import valid_rows
from rct_dist.data.loader import TEACHER_FIELD, ShardIndex, make_loader
from rct_dist.data.splits import cache_settings, split_location
from rct_dist.data.stores import is_remote
from rct_dist.data.transforms import build_transform
from rct_dist.atomic import atomic_write
from rct_dist.data.shards.writer import INDEX, clean_temp_files
from rct_dist.distributed import all_gather_stats, world_rank, world_size
from rct_dist.eval import evaluate, extract_embeddings
from rct_dist.models import EmbeddingModel, build_raw_features, export_model, load_exported
from rct_dist.models.preprocess import preprocess_for
from rct_dist.train import checkpoint
from rct_dist.train.engine import init_distributed
from rct_dist.train.build import build_task

Embedded = tuple[torch.Tensor, torch.Tensor, list[str]]  # embeddings (N, dim) fp32, labels (N,), keys


def _device() -> torch.device:
    """This rank's accelerator (the one LOCAL_RANK names), or the CPU; nccl gathers need it set."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", 0))
    accelerator.set_device(local)
    return torch.device(accelerator.device_name(local))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def embed_split(export: Path, split: Path, cfg: Config, device: torch.device) -> Embedded:
    """Every readable sample of `split`, embedded once by the exported student, on every rank, sorted by key.

    The loader settings (image size, eval batch size, workers) come from `cfg`, as in the trainer's
    evaluation, and so does the preprocessing (the export's backbone's timm config under the `data.*`
    overrides), so an export is measured exactly as its run measured it.
    """
    return embed_with(load_exported(export), split, cfg, device)


def embed_with(model: torch.nn.Module, split: Path, cfg: Config, device: torch.device) -> Embedded:
    """`embed_split` for any model whose `config["backbone"]` names its backbone (preprocessing)."""
    model = model.to(device).eval()
    preprocess = preprocess_for(cfg, model.config["backbone"])
    loader = make_loader(split, batch_size=cfg.eval.batch_size, train=False, image_size=cfg.data.image_size,
                         workers=cfg.data.workers, cache=cache_settings(cfg.data), prefetch_steps=cfg.data.prefetch_steps,
                         transform=build_transform(cfg.data.image_size, False, **preprocess.transform_kwargs()))
    embeddings, labels, keys = extract_embeddings(model, valid_rows(loader), device=device)
    return embeddings.cpu(), labels.cpu(), keys


def run_eval(cfg: Config, export: str | os.PathLike | None = None, data: str | os.PathLike | None = None,
             with_nmi: bool = False) -> dict[str, Any]:
    """Recall@K, MAP@R (and NMI) of an export on a split; by default the run's export on its eval split."""
    init_distributed()
    export = Path(export) if export else Path(cfg.run.out_dir) / cfg.run.name / "export"
    data = data or split_location(cfg.data.root, cfg.data.eval_split)
    embeddings, labels, keys = embed_split(export, data, cfg, _device())
    metrics = evaluate(embeddings, labels, ks=tuple(cfg.eval.ks), metric=cfg.eval.metric, with_nmi=with_nmi)
    return {"export": str(export), "data": str(data), "samples": len(keys), **metrics}


def run_eval_raw(cfg: Config, data: str | os.PathLike | None = None, with_nmi: bool = False) -> dict[str, Any]:
    """Recall@K, MAP@R (and NMI) of the raw pretrained features of `cfg.model.backbone` (with
    `model.pretrained` / `model.pretrained_file` / `model.feature_blocks`): GAP + GMP of its last feature
    map, no embedding layer, nothing trained. The first baseline of any transfer: what the student's
    starting point already retrieves."""
    init_distributed()
    m = cfg.model
    model = build_raw_features(m.backbone, pretrained=m.pretrained, pretrained_file=m.pretrained_file,
                               feature_blocks=m.feature_blocks)
    data = data or split_location(cfg.data.root, cfg.data.eval_split)
    embeddings, labels, keys = embed_with(model, data, cfg, _device())
    metrics = evaluate(embeddings, labels, ks=tuple(cfg.eval.ks), metric=cfg.eval.metric, with_nmi=with_nmi)
    return {"raw_features": m.backbone, "pretrained": bool(m.pretrained or m.pretrained_file),
            "dim": int(embeddings.shape[1]), "data": str(data), "samples": len(keys), **metrics}


def _save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda stream: np.save(stream, array, allow_pickle=False))


def write_embeddings(out: Path, embedded: Embedded) -> None:
    """embeddings.npy (float32), labels.npy (int64) and keys.txt (one per line, same order), each atomic."""
    embeddings, labels, keys = embedded
    out.mkdir(parents=True, exist_ok=True)
    _save_npy(out / "embeddings.npy", embeddings.numpy().astype(np.float32, copy=False))
    _save_npy(out / "labels.npy", labels.numpy().astype(np.int64, copy=False))
    text = "".join(f"{key}\n" for key in keys).encode("utf-8")
    atomic_write(out / "keys.txt", lambda stream: stream.write(text))


def _npy_bytes(vector: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, vector, allow_pickle=False)
    return buffer.getvalue()


def copy_shard_with_teacher(source: Path, target: Path, teacher: dict[str, np.ndarray]) -> int:
    """Write `target`: the samples of `source` byte for byte plus their `teacher.npy`; returns the count.

    Samples without an embedding (unreadable when embedded) are left out, and so is whatever lies
    behind damage in the source shard (warned, as the loader does).
    """
    written = 0

    def fill(stream: BinaryIO) -> None:
        nonlocal written
        sink = wds.TarWriter(stream, mtime=0.0)  # fixed mtime, as make-shards: same input, same bytes
        try:
            samples = wds.DataPipeline(wds.SimpleShardList([str(source)]),
                                       wds.tarfile_to_samples(handler=wds.warn_and_continue))
            for sample in samples:
                vector = teacher.get(sample["__key__"])
                if vector is None:
                    continue
                fields = {k: v for k, v in sample.items() if not k.startswith("__")}
                sink.write({"__key__": sample["__key__"], **fields, TEACHER_FIELD: _npy_bytes(vector)})
                written += 1
        finally:
            sink.close()

    atomic_write(target, fill)
    return written


def _check_shard_target(split: Path, target: Path, overwrite: bool) -> None:
    """Refuse, before any work, to write into the split being read or over finished shards."""
    if target.resolve() == split.resolve():
        raise ValueError(f"--into-shards {target} is the split being read: give a new folder")
    if (target / INDEX).exists() and not overwrite:
        raise FileExistsError(f"{target} already holds a split (index.json); pass --overwrite to replace it")


def write_teacher_shards(index: ShardIndex, embedded: Embedded, target: Path, export: Path,
                         device: torch.device) -> dict[str, Any]:
    """A copy of the split with each sample's embedding as `teacher.npy`, and its index.json.

    Rank r copies shards r, r + world, ...; rank 0 writes the index last (as make-shards does, its
    presence means the split is complete), with "teacher": {"dim", "export"} added.
    """
    embeddings, _, keys = embedded
    if world_rank() == 0:
        target.mkdir(parents=True, exist_ok=True)
        clean_temp_files(target)
        (target / INDEX).unlink(missing_ok=True)
    _barrier()
    teacher = dict(zip(keys, embeddings.numpy().astype(np.float32, copy=False)))
    counts = [0] * len(index.shards)
    for i in range(world_rank(), len(index.shards), world_size()):
        counts[i] = copy_shard_with_teacher(index.directory / index.shards[i], target / index.shards[i], teacher)
    counts = [sum(column) for column in zip(*all_gather_stats(counts, device))]
    meta = json.loads((index.directory / INDEX).read_text(encoding="utf-8"))
    meta.update(shards=list(index.shards), shard_samples=counts, samples=sum(counts),
                teacher={"dim": int(embeddings.shape[1]), "export": str(export.resolve())},
                copied_from=str(index.directory.resolve()))
    if world_rank() == 0:
        text = json.dumps(meta, indent=1, ensure_ascii=False).encode("utf-8")
        atomic_write(target / INDEX, lambda stream: stream.write(text))
    return {"out": str(target), "shards": len(counts), "samples": sum(counts)}


def run_embed(cfg: Config, export: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike,
              into_shards: str | os.PathLike | None = None, overwrite: bool = False) -> dict[str, Any]:
    """An export's embeddings of a split, written to `out` (rank 0), and optionally into new shards."""
    export, out = Path(export), Path(out)
    remote = is_remote(data)
    data = str(data) if remote else Path(data)
    index = ShardIndex.load(data, cache_settings(cfg.data))  # a missing split fails before any process group
    if into_shards is not None and remote:
        raise ValueError(f"--into-shards copies the split's shards with the embeddings added, from a local folder; "
                         f"{data} is remote: copy it to a local folder first, or embed without --into-shards")
    if into_shards is not None:
        _check_shard_target(data, Path(into_shards), overwrite)
    init_distributed()
    device = _device()
    embedded = embed_split(export, data, cfg, device)
    if world_rank() == 0:
        write_embeddings(out, embedded)
    summary: dict[str, Any] = {"out": str(out), "samples": len(embedded[2]), "dim": int(embedded[0].shape[1]),
                               "index_samples": index.samples}
    if into_shards is not None:
        summary["shards"] = write_teacher_shards(index, embedded, Path(into_shards), export, device)
    _barrier()
    return summary


def checkpoint_folder(run_dir: Path, tag: str = "auto") -> Path:
    """The newest complete checkpoint of a run ("auto"), or the given tag if it is complete: a folder, or
    a tag name (`step000100`) under the run's checkpoints/."""
    if tag == "auto":
        found = checkpoint.complete_checkpoints(run_dir / "checkpoints")
        if not found:
            raise FileNotFoundError(f"no complete checkpoint under {run_dir / 'checkpoints'}")
        return found[-1][1]
    folder = Path(tag)
    if not folder.is_dir() and (run_dir / "checkpoints" / tag).is_dir():
        folder = run_dir / "checkpoints" / tag
    if not folder.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {folder} (nor {run_dir / 'checkpoints' / tag})")
    if not (folder / checkpoint.MARKER).is_file():
        raise FileNotFoundError(f"{folder} is not a complete checkpoint (no {checkpoint.MARKER} file)")
    return folder


def checkpoint_state(folder: Path) -> dict[str, torch.Tensor]:
    """The fp32 state dict of the engine's module, read with the weights-only unpickler.

    ZeRO 1-3 (and bf16) checkpoints hold the fp32 weights as optimizer partitions, which DeepSpeed's
    zero_to_fp32 consolidates; a ZeRO-0 checkpoint has no partitions and holds the module whole (in the
    training dtype: exact for fp32 runs).
    """
    with checkpoint.weights_only_loads():
        if any(folder.glob("*_optim_states.pt")):
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
        return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]


def student_from_state(cfg: Config, state: dict[str, torch.Tensor]) -> EmbeddingModel:
    """The run's student as the trainer built it, holding `state`'s weights.

    Pretrained weights are not fetched (the checkpoint replaces them); the whole task is loaded
    strictly, so a checkpoint of a different model or run fails with the mismatching keys named.
    """
    model = dataclasses.replace(cfg.model, pretrained=False, pretrained_file=None)
    proxies = state.get("criterion.proxies")
    # The regression loss's map is sized by the teacher's width, which the checkpoint holds whatever the teacher
    # source (a shards teacher's width is in the shards, not in the config).
    regression_map = state.get("transfer.map.weight")
    task = build_task(dataclasses.replace(cfg, model=model), len(proxies) if proxies is not None else 1,
                      regression_map.shape[0] if regression_map is not None else None)
    task.load_state_dict(state)
    return task.net


def run_export(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, tag: str = "auto",
               onnx: bool = False, opset: int | None = None, exporter: str = "torchscript") -> Path:
    """Export the student of a run's checkpoint; default folder `<run>/export-<tag>` (not the best export).

    `onnx=True` also writes `model.onnx` (+ `model.onnx.json`, its input contract) for the run's
    `data.image_size` and eval preprocessing, checked against PyTorch with onnxruntime; it needs the
    `onnx` extra, and is exported and checked before the safetensors files are written.
    """
    from rct_dist.models.export import ONNX_FILE, export_onnx

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    folder = checkpoint_folder(run_dir, tag)
    net = student_from_state(cfg, checkpoint_state(folder))
    target = Path(out) if out else run_dir / f"export-{folder.name}"
    if onnx:
        preprocess = preprocess_for(cfg, cfg.model.backbone)  # as the run evaluated its student
        export_onnx(net, target / ONNX_FILE, cfg.data.image_size, opset=opset, preprocess=preprocess,
                    exporter=exporter)
    return export_model(net, target)

