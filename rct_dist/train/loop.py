"""The one training loop, for teacher training (Proxy-Anchor on labels) and transfer (RC by default).

One batch's way: shards -> loader (k views per image) -> frozen teacher, outside the engine (no grad)
-> student in the DeepSpeed engine -> loss gathered across ranks -> engine.backward/step -> logs and
checkpoints. Evaluation embeds the held-out split on every rank, gathers by sample key, and reports
Recall@K / MAP@R; the best student by R@1 is exported.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rct_dist.config import Config, config_to_dict, save_config
from rct_dist.data.loader import ShardIndex, make_loader
from rct_dist.data.transforms import Preprocess, build_transform, preprocess_for, renormalization
from rct_dist.distributed import world_rank, world_size
from rct_dist.eval import evaluate, extract_embeddings
from rct_dist.losses import (
    DarkRankLoss,
    PKTLoss,
    ProxyAnchorLoss,
    RelaxedContrastiveLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
)
from rct_dist.models import FrozenTeacher, build_model, export_model
from rct_dist.train import checkpoint
from rct_dist.train.engine import build_engine, deepspeed_config, init_distributed
from rct_dist.train.feed import DeviceFeed, prepare_models, views_flat
from rct_dist.train.monitor import Monitor, projector_sample
from rct_dist.train.retrieval_picture import ThumbnailCache, retrieval_picture
from rct_dist.train.task import TransferTask
from rct_dist.train.timing import StepTimer, device_sync, step_scalars


class RKDLoss(nn.Module):
    """RKD as its paper and the RC paper's comparison use it: distance + 2 x angle."""

    def __init__(self) -> None:
        super().__init__()
        self.distance = RKDDistanceLoss()
        self.angle = RKDAngleLoss()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, return_parts: bool = False):
        d = self.distance(student, teacher)
        a = self.angle(student, teacher)
        loss = d + 2.0 * a
        return (loss, {"distance": d.detach(), "angle": a.detach()}) if return_parts else loss


def build_task(cfg: Config, num_classes: int) -> TransferTask:
    net = build_model(cfg.model.backbone, cfg.model.embedding_size, pretrained=cfg.model.pretrained,
                      pretrained_file=cfg.model.pretrained_file, normalize=cfg.model.normalize)
    supervised = None
    if cfg.job == "train-teacher" or cfg.loss.supervised_weight > 0:
        supervised = ProxyAnchorLoss(num_classes, cfg.model.embedding_size, margin=cfg.loss.margin,
                                     alpha=cfg.loss.alpha)
    if cfg.job == "train-teacher":
        return TransferTask(net, supervised=supervised)
    transfer = {
        "rc": lambda: RelaxedContrastiveLoss(sigma=cfg.loss.sigma, delta=cfg.loss.delta),
        "rkd": RKDLoss,
        "pkt": PKTLoss,
        "darkrank": DarkRankLoss,
    }[cfg.loss.name]()
    return TransferTask(net, transfer=transfer, supervised=supervised, supervised_weight=cfg.loss.supervised_weight)


def build_teacher(cfg: Config, device: torch.device) -> FrozenTeacher | None:
    """The frozen teacher model; None for `teacher.source: shards`, whose embeddings come with the batches.

    A stored (black-box) teacher embedded each image once, not each augmented view: every view of an
    image gets that one embedding, as every view gets the image's label.
    """
    t = cfg.teacher
    if t.source == "shards":
        return None
    if t.source == "export":
        teacher = FrozenTeacher.from_export(t.export, dtype=t.dtype)
    elif t.source == "model":
        teacher = FrozenTeacher.from_timm(t.backbone, t.embedding_size, pretrained=t.pretrained,
                                          pretrained_file=t.pretrained_file, dtype=t.dtype)
    else:
        raise ValueError(f"teacher.source {t.source!r} is not supported (use 'model', 'export' or 'shards')")
    return teacher.to(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_run_dir(cfg: Config) -> Path:
    """The run folder; an existing one is reused only to resume, or replaced only when asked."""
    run_dir = Path(cfg.run.out_dir) / cfg.run.name
    if world_rank() == 0:
        if run_dir.exists() and any(run_dir.iterdir()) and not cfg.run.resume:
            if not cfg.run.overwrite:
                raise FileExistsError(
                    f"run folder {run_dir} exists: pass run.resume=auto to continue it, run.overwrite=true to "
                    "replace it, or another run.name"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    if dist.is_initialized():
        dist.barrier()
    return run_dir


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    if not cfg.run.resume:
        return None
    if cfg.run.resume == "auto":
        found = checkpoint.complete_checkpoints(run_dir / "checkpoints")
        return found[-1][1] if found else None
    return Path(cfg.run.resume)


_views_flat = views_flat  # (B, V, C, H, W) -> (B*V, C, H, W); its old name here


class _Embedder(nn.Module):
    """Student embeddings in fp32 from images cast to the engine's dtype."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.dtype)).float()


def valid_rows(batches) -> Iterator[tuple]:
    """Eval batches without the loader's padding rows (valid=False): (images, labels, keys)."""
    for images, labels, keys, valid in batches:
        yield images[valid], labels[valid], [k for k, ok in zip(keys, valid.tolist()) if ok]


def run_evaluation(cfg: Config, net: nn.Module, dtype: torch.dtype, device: torch.device,
                   preprocess: Preprocess | None = None) -> dict[str, Any]:
    preprocess = preprocess or preprocess_for(cfg)
    loader = make_loader(Path(cfg.data.root) / cfg.data.eval_split, batch_size=cfg.eval.batch_size, train=False,
                         image_size=cfg.data.image_size, workers=cfg.data.workers,
                         transform=build_transform(cfg.data.image_size, False, **preprocess.transform_kwargs()))
    cache = ThumbnailCache(mean=preprocess.mean, std=preprocess.std)
    embeddings, labels, keys = extract_embeddings(_Embedder(net, dtype), cache.watch(valid_rows(loader)),
                                                  device=device)
    result = evaluate(embeddings, labels, ks=tuple(cfg.eval.ks), metric=cfg.eval.metric, with_nmi=False)
    result["skipped"] = loader.skipped
    if cfg.log.retrieval_images:  # a collective: every rank takes part, rank 0 gets the picture
        result["retrieval_picture"] = retrieval_picture(embeddings, labels, keys, cache, n=cfg.log.retrieval_images,
                                                        metric=cfg.eval.metric)
    if cfg.log.projector_samples and cfg.log.tensorboard:  # a collective too; rank 0 gets the sample
        result["projector"] = projector_sample(embeddings, labels, keys, cache, cfg.log.projector_samples,
                                               seed=cfg.run.seed)
    return result


def _export_student(net: nn.Module, folder: Path) -> None:
    """Every rank calls this (ZeRO-3 must gather the partitioned weights); rank 0 writes."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
        if world_rank() == 0:
            export_model(net, folder)


def train(cfg: Config) -> dict[str, Any]:
    """Run a teacher-training or transfer job to the end; returns the final metrics on rank 0."""
    init_distributed()
    rank, world = world_rank(), world_size()
    run_dir = prepare_run_dir(cfg)
    monitor = Monitor(run_dir / "tensorboard", enabled=rank == 0, tensorboard=cfg.log.tensorboard,
                      results_file=run_dir / "results.jsonl")
    preprocess = preprocess_for(cfg)
    seed_everything(cfg.run.seed)
    train_index = ShardIndex.load(Path(cfg.data.root) / cfg.data.train_split)
    task = build_task(cfg, train_index.classes)
    pk = tuple(cfg.data.pk) if cfg.data.pk else None
    loader_args = dict(batch_size=cfg.data.batch_size, train=True, image_size=cfg.data.image_size,
                       views=cfg.data.views, seed=cfg.run.seed, workers=cfg.data.workers,
                       shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                       samples_per_epoch=cfg.data.samples_per_epoch, pk=pk,
                       transform=build_transform(cfg.data.image_size, True, scale=tuple(cfg.data.crop_scale),
                                                 hflip=cfg.data.hflip, uint8=cfg.data.uint8_batches,
                                                 **preprocess.transform_kwargs()),
                       teacher_embeddings=cfg.job == "transfer" and cfg.teacher.source == "shards",
                       decode=cfg.data.decode)
    batches_per_epoch = len(make_loader(train_index, epoch=0, **loader_args))
    accumulation = cfg.deepspeed.gradient_accumulation_steps
    total_steps = cfg.optim.epochs * batches_per_epoch // accumulation
    prepare_models(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"), task.net)
    if cfg.model.compile:
        task.net.compile()  # in place: parameter names, checkpoints and exports are unchanged
    ds_config = deepspeed_config(cfg.deepspeed.config, cfg.data.batch_size * cfg.data.views, accumulation, world,
                                 cfg.optim.grad_clip)
    engine = build_engine(task, ds_config, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps,
                          total_steps, cfg.optim.proxy_lr_multiplier)
    device = engine.device
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    teacher = build_teacher(cfg, device) if cfg.job == "transfer" else None
    if teacher is not None:  # the student's images, in the teacher's own normalisation
        teacher.normalize_inputs(*(renormalization(preprocess, Preprocess.of_backbone(teacher.config["backbone"]))
                                   or (None, None)))
    prepare_models(cfg, device, teacher)
    feed, timer = DeviceFeed.for_run(cfg, preprocess, device, dtype), StepTimer(sync=device_sync(device))

    state = {"epoch": 0, "batch": 0, "best_r1": -1.0}
    start = resume_point(cfg, run_dir)
    if start is not None:
        saved = checkpoint.load(engine, start)
        state.update({k: saved[k] for k in state})
        monitor.say(f"resumed from {start} at epoch {state['epoch'] + 1}, batch {state['batch']}")

    metrics: dict[str, Any] = {}
    step = state["epoch"] * batches_per_epoch + state["batch"]
    logged = config_to_dict(cfg)
    logged["data"].update(mean=list(preprocess.mean), std=list(preprocess.std),
                          interpolation=preprocess.interpolation, crop_pct=preprocess.crop_pct)
    monitor.start(logged, [f"eval/recall@{min(cfg.eval.ks)}", "eval/map@r"], step)
    for epoch in range(state["epoch"], cfg.optim.epochs):
        loader = make_loader(train_index, epoch=epoch, **loader_args)
        skip = state["batch"] if epoch == state["epoch"] else 0
        monitor.start_epoch(epoch, cfg.optim.epochs, len(loader), initial=skip)
        engine.train()
        timer.start()
        last_loss = "-"  # the progress bar shows the last logged loss: no .item() sync on other steps
        for i, (images, labels, _, *stored) in enumerate(loader):
            if i < skip:
                timer.start()
                continue  # the same seeded epoch plan, replayed up to where the checkpoint was taken
            images, labels, stored, n_images, n_views = feed(images, labels, *stored)
            timer.data_ready()
            target = teacher(images) if teacher is not None else stored[0] if stored else None
            loss, parts, student_emb = engine(images, labels, target)
            engine.backward(loss)
            engine.step()
            timer.step_done(n_images, n_views)
            step = epoch * batches_per_epoch + i + 1
            if step % cfg.log.every_steps == 0:
                values = step_scalars(timer.read(), world, loss, parts, engine, target, student_emb)
                monitor.scalars(values, step)
                last_loss = f"{values['loss/total']:.4f}"
            monitor.advance({"loss": last_loss})
            if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                checkpoint.save(engine, run_dir / "checkpoints", step, epoch,
                                {**state, "epoch": epoch, "batch": i + 1}, cfg.checkpoint.keep)
            timer.next_step()
        monitor.end_epoch()
        skipped = loader.skipped
        if any(skipped.values()):
            monitor.say(f"epoch {epoch + 1}: rank {rank} skipped unreadable data {skipped}")
        state.update(epoch=epoch + 1, batch=0)
        last = epoch + 1 == cfg.optim.epochs
        if last or (epoch + 1) % cfg.eval.every_epochs == 0:
            metrics = run_evaluation(cfg, engine.module.net, dtype, device, preprocess)
            r1 = metrics["recall"][min(cfg.eval.ks)]
            exported = r1 > state["best_r1"]
            if exported:
                state["best_r1"] = r1
                _export_student(engine.module.net, run_dir / "export")
            monitor.evaluation(epoch, step, metrics, state["best_r1"], "export" if exported else None)
        checkpoint.save(engine, run_dir / "checkpoints", step, epoch, dict(state), cfg.checkpoint.keep)
    monitor.close()
    metrics["best_r1"] = state["best_r1"]
    return metrics

