"""The one training loop, for teacher training (Proxy-Anchor on labels) and transfer (RC by default).

One batch's way: shards -> loader (k views per image) -> frozen teacher, outside the engine (no grad)
-> student in the DeepSpeed engine -> loss gathered across ranks -> engine.backward/step -> logs and
checkpoints. Evaluation embeds the held-out split on every rank, gathers by sample key, and reports
Recall@K / MAP@R on the test (and validation) split; the student the selection keeps is exported
(selection.py: the last, the best on validation, or only when asked the best on test).
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from rct_dist.config import Config, ConfigError, config_to_dict, save_config
from rct_dist.data.batch import valid_rows
from rct_dist.data.epoch_plan import step_seed
from rct_dist.data.loader import ShardIndex, make_loader, sample_table
from rct_dist.data.splits import cache_settings, split_location, window_shards
from rct_dist.data.transforms import build_transform
from rct_dist.distributed import world_rank, world_size
from rct_dist.distributed.peers import PeerWatch
from rct_dist.logs import setup_logging
from rct_dist.eval import evaluate, extract_embeddings
from rct_dist.models import export_model
from rct_dist.models.preprocess import Preprocess, preprocess_for, renormalization
from rct_dist.train import checkpoint
from rct_dist.train.build import build_task, build_teacher, teacher_dim
from rct_dist.train.engine import (build_engine, continue_micro_steps, deepspeed_config, init_distributed,
                                  nonfinite_guard, replicate_buffers, warmup_cosine, warmup_step_decay)
from rct_dist.train.feed import DeviceFeed, prepare_models
from rct_dist.train.monitor import Monitor, projector_sample
from rct_dist.train.preemption import StopOnSignal, Stopped, request_requeue
from rct_dist.train.selection import Selection, resolve_select, summary
from rct_dist.eval.retrieval_picture import ThumbnailCache, retrieval_picture
from rct_dist.train.timing import StepTimer, device_sync, step_scalars


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
    if cfg.run.resume == "auto":  # the newest complete checkpoint whose files are all there, whole
        found = checkpoint.usable_checkpoints(run_dir / "checkpoints", warn=print if world_rank() == 0 else None)
        return found[-1][1] if found else None
    return Path(cfg.run.resume)


class _Embedder(nn.Module):
    """Student embeddings in fp32 from images cast to the engine's dtype."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net
        self.dtype = dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.to(self.dtype)).float()


def run_evaluation(cfg: Config, net: nn.Module, dtype: torch.dtype, device: torch.device,
                   preprocess: Preprocess | None = None, split: str | None = None,
                   pictures: bool = True) -> dict[str, Any]:
    """Recall@K and MAP@R of `net` on `split` (default the eval split); `pictures`: also the retrieval
    picture and projector sample the config asks for (the test split's, not the validation split's)."""
    preprocess = preprocess or preprocess_for(cfg)
    loader = make_loader(split_location(cfg.data.root, split or cfg.data.eval_split), batch_size=cfg.eval.batch_size,
                         train=False, image_size=cfg.data.image_size, workers=cfg.data.workers,
                         cache=cache_settings(cfg.data), prefetch_steps=cfg.data.prefetch_steps,
                         transform=build_transform(cfg.data.image_size, False, **preprocess.transform_kwargs()))
    cache = ThumbnailCache(mean=preprocess.mean, std=preprocess.std)
    embeddings, labels, keys = extract_embeddings(_Embedder(net, dtype), cache.watch(valid_rows(loader)),
                                                  device=device)
    result = evaluate(embeddings, labels, ks=tuple(cfg.eval.ks), metric=cfg.eval.metric, with_nmi=False)
    result["skipped"] = loader.skipped
    if pictures and cfg.log.retrieval_images:  # a collective: every rank takes part, rank 0 gets the picture
        result["retrieval_picture"] = retrieval_picture(embeddings, labels, keys, cache, n=cfg.log.retrieval_images,
                                                        metric=cfg.eval.metric)
    if pictures and cfg.log.projector_samples and cfg.log.tensorboard:  # a collective too; rank 0 gets the sample
        result["projector"] = projector_sample(embeddings, labels, keys, cache, cfg.log.projector_samples,
                                               seed=cfg.run.seed)
    return result


def _export_student(net: nn.Module, folder: Path) -> None:
    """Every rank calls this (ZeRO-3 must gather the partitioned weights); rank 0 writes."""
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=None):
        if world_rank() == 0:
            export_model(net, folder)


def _schedule(cfg: Config, steps_per_epoch: int, total_steps: int):
    if cfg.optim.schedule == "step":
        return warmup_step_decay(cfg.optim.warmup_steps, steps_per_epoch, cfg.optim.decay_epochs, cfg.optim.decay_gamma)
    return warmup_cosine(cfg.optim.warmup_steps, total_steps)


def _evaluate_and_select(cfg: Config, engine, selection: Selection, epoch: int, step: int, dtype: torch.dtype,
                         preprocess: Preprocess, monitor: Monitor, run_dir: Path) -> dict[str, Any]:
    """Test (and validation) metrics of the current student; exports it when the selection keeps it."""
    replicate_buffers(engine.module)  # rank 0's BatchNorm statistics, the checkpoint's and the export's, on every rank
    net = engine.module.net
    metrics = run_evaluation(cfg, net, dtype, engine.device, preprocess)
    val = None
    if cfg.data.val_split:
        val = run_evaluation(cfg, net, dtype, engine.device, preprocess, split=cfg.data.val_split, pictures=False)
    kept = selection.consider(epoch, metrics, val)
    if kept:
        _export_student(net, run_dir / "export")
    if val is not None:
        monitor.evaluation(epoch - 1, step, val, selection.best_val_r1, None, split="val")
    monitor.evaluation(epoch - 1, step, metrics, selection.score, "export" if kept else None)
    return metrics


def plan_inputs(cfg: Config, train_index: ShardIndex) -> dict[str, Any]:
    """What decides an epoch's global sample sequence, saved with every checkpoint: a resume refuses to
    continue a sequence these no longer describe. (World size and worker count are not among them.)"""
    table = sample_table(train_index)
    plain = {"shuffle_buffer": cfg.data.shuffle_buffer, "resampled": cfg.data.resampled}  # P x K uses neither
    return {"seed": cfg.run.seed, "batch_size": cfg.data.batch_size, "pk": list(cfg.data.pk or []),
            **(plain if not cfg.data.pk else {}),
            "samples_per_epoch": cfg.data.samples_per_epoch, "train_split": cfg.data.train_split,
            "readable_samples": len(table), "shards": len(train_index.shards),
            **({"window_shards": window} if (window := window_shards(train_index)) else {})}


def _stop(stop: StopOnSignal, saved: Path, step: int, cfg: Config, monitor: Monitor, rank: int) -> None:
    """Leave after a stop signal, with the checkpoint `saved` at `step` complete on every rank."""
    requeued = request_requeue(cfg.run.requeue) if rank == 0 else None
    message = (f"stopped on {stop.received} after optimizer step {step}: checkpoint {saved} is complete; "
               f"resume with run.resume=auto{f' ({requeued})' if requeued else ''}")
    monitor.say(message)
    raise Stopped(message, str(saved))


def check_plan(saved: dict[str, Any] | None, current: dict[str, Any], start: Path) -> None:
    """A clear error when the checkpoint's data plan differs from this run's."""
    if saved is None:
        return
    keys = [*current, *(k for k in ("window_shards",) if k in saved and k not in current)]  # windows, then none
    changed = [f"{k}: {saved.get(k)!r} then, {current.get(k)!r} now" for k in keys if saved.get(k) != current.get(k)]
    if changed:
        raise ConfigError(f"cannot resume from {start}: the data plan changed ({'; '.join(changed)}). Resume "
                         "with the settings the checkpoint was trained with, or start a new run")


def rescale_schedule(engine, optimizer_steps: int) -> None:
    """Put the LR schedule at `optimizer_steps` (a resume on another world size: the same samples are
    fewer or more steps now)."""
    scheduler = engine.lr_scheduler
    if scheduler is None or scheduler.last_epoch == optimizer_steps:
        return
    scheduler.last_epoch = optimizer_steps - 1
    scheduler.step()


def _epoch_skips(loader, device: torch.device) -> dict[str, int]:
    """Skipped data of the epoch summed over ranks (bad images are per rank; shard damage is the same
    on every rank, the table being built from the same files): a collective."""
    skipped = loader.skipped
    if dist.is_initialized():
        bad = torch.tensor([skipped["bad_images"]], dtype=torch.int64, device=device)
        dist.all_reduce(bad)
        skipped = {**skipped, "bad_images": int(bad.item())}
    return skipped


def restore_state(engine, start: Path | None, universal: bool, plan: dict[str, Any], monitor: Monitor, *,
                  world: int, batch_size: int, accumulation: int, epoch_units: int) -> dict[str, Any]:
    """The trainer's state, fresh or from the checkpoint `start` (engine, optimizer and schedule restored too).

    epoch: epochs finished; samples: samples of the epoch's global sequence trained on; micro: micro-batches
    trained on by each rank; step: optimizer steps (micro // accumulation: checkpoint tags, log.every_steps,
    checkpoint.every_steps, TensorBoard's x axis); world: ranks when saved; plan: the data plan's inputs."""
    state: dict[str, Any] = {"epoch": 0, "samples": 0, "micro": 0, "step": 0, "world": world, "plan": None,
                             "selection": None, "nonfinite_steps": 0}
    if start is not None:
        saved = checkpoint.load(engine, start, universal=universal)
        check_plan(saved.get("plan"), plan, start)
        state.update({k: saved[k] for k in state if k in saved})
        if "samples" not in saved:  # checkpoints of earlier versions: a batch count on the same world size
            state["samples"] = saved.get("batch", 0) * world * batch_size
            state["step"] = saved.get("step", state["epoch"] * (epoch_units // world) + saved.get("batch", 0))
        if "micro" not in saved:  # earlier versions counted micro-batches as steps
            state["micro"], state["step"] = state["step"], state["step"] // accumulation
        if state["world"] != world:
            done = state["epoch"] * epoch_units * batch_size + state["samples"]
            rescale_schedule(engine, done // (world * batch_size * accumulation))
            monitor.say(f"resuming a run of {state['world']} ranks on {world}: the same sample sequence continues "
                        f"after {state['samples']} samples of epoch {state['epoch'] + 1}")
        monitor.say(f"resumed from {start} at epoch {state['epoch'] + 1}, sample {state['samples']}")
    continue_micro_steps(engine, state["micro"])
    return {**state, "world": world, "plan": plan}


RESUME_HINT = "The newest complete checkpoint is kept: run the same command again (run.resume: auto) to go on."


def train(cfg: Config) -> dict[str, Any]:
    """Run a teacher-training or transfer job to the end; returns on rank 0 the test metrics of the model
    it kept (`recall`, `map_at_r`; see selection.py), with `val` (its validation metrics or None), `final`
    (the last model's test metrics), `selected_epoch`, `select`, `epochs_run` and `stopped_early`.

    A rank that leaves a multi-rank job (killed, frozen, its node cut off) ends the others with `PeerLost`,
    whose one line names it (distributed/peers.py)."""
    joined = init_distributed(cfg.run.dist_timeout)
    with PeerWatch(joined.rank, joined.size, hint=RESUME_HINT, label=f"rct-dist {cfg.job}", expected=(Stopped,)):
        return _train(cfg)


def _train(cfg: Config) -> dict[str, Any]:
    """train()'s body, inside the process group and the watch for lost ranks."""
    rank, world = world_rank(), world_size()
    run_dir = prepare_run_dir(cfg)
    setup_logging(rank, run_dir / "train.log")  # rank 0: INFO on stderr and appended to train.log; others: WARNING
    monitor = Monitor(run_dir / "tensorboard", enabled=rank == 0, tensorboard=cfg.log.tensorboard,
                      results_file=run_dir / "results.jsonl")
    preprocess = preprocess_for(cfg)
    seed_everything(cfg.run.seed)
    cache = cache_settings(cfg.data)
    train_index = ShardIndex.load(split_location(cfg.data.root, cfg.data.train_split), cache)
    if cfg.data.val_split:
        ShardIndex.load(split_location(cfg.data.root, cfg.data.val_split), cache)  # a missing one fails now
    task = build_task(cfg, train_index.classes, teacher_dim(cfg, train_index) if cfg.job == "transfer" else None)
    pk = tuple(cfg.data.pk) if cfg.data.pk else None
    loader_args = dict(batch_size=cfg.data.batch_size, train=True, image_size=cfg.data.image_size,
                       views=cfg.data.views, seed=cfg.run.seed, workers=cfg.data.workers,
                       shuffle_buffer=cfg.data.shuffle_buffer, resampled=cfg.data.resampled,
                       samples_per_epoch=cfg.data.samples_per_epoch, pk=pk,
                       transform=build_transform(cfg.data.image_size, True, scale=tuple(cfg.data.crop_scale),
                                                 hflip=cfg.data.hflip, uint8=cfg.data.uint8_batches,
                                                 **preprocess.transform_kwargs()),
                       teacher_embeddings=cfg.job == "transfer" and cfg.teacher.source == "shards",
                       decode=cfg.data.decode, prefetch_steps=cfg.data.prefetch_steps)
    first_epoch = make_loader(train_index, epoch=0, **loader_args)
    batches_per_epoch = len(first_epoch)  # per rank; P x K epochs may differ by a batch or two
    accumulation = cfg.deepspeed.gradient_accumulation_steps
    steps_per_epoch = batches_per_epoch // accumulation
    total_steps = cfg.optim.epochs * steps_per_epoch
    prepare_models(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"), task.net)
    if cfg.model.compile:
        task.net.compile()  # in place: parameter names, checkpoints and exports are unchanged
    ds_config = deepspeed_config(cfg.deepspeed.config, cfg.data.batch_size * cfg.data.views, accumulation, world,
                                 cfg.optim.grad_clip)
    start = resume_point(cfg, run_dir)
    universal = (start is not None and checkpoint.saved_world(start) not in (None, world)
                 and ds_config.get("zero_optimization", {}).get("stage", 0) > 0)
    if universal:  # ZeRO's per-rank optimizer partitions, re-partitioned through DeepSpeed's universal format
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine = build_engine(task, ds_config, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps,
                          total_steps, cfg.loss.proxy_anchor.lr_multiplier,
                          schedule=_schedule(cfg, steps_per_epoch, total_steps),
                          new_layers_only_steps=cfg.optim.warmup_epochs_new_layers * steps_per_epoch,
                          skip_nonfinite=cfg.optim.skip_nonfinite, max_nonfinite_steps=cfg.optim.max_nonfinite_steps)
    guard = nonfinite_guard(engine)
    device = engine.device
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else torch.float32
    teacher = build_teacher(cfg, device) if cfg.job == "transfer" else None
    if teacher is not None:  # the student's images, in the teacher's own normalisation
        teacher.normalize_inputs(*(renormalization(preprocess, Preprocess.of_backbone(teacher.config["backbone"]))
                                   or (None, None)))
    prepare_models(cfg, device, teacher)
    feed, timer = DeviceFeed.for_run(cfg, preprocess, device, dtype), StepTimer(sync=device_sync(device))

    select = resolve_select(cfg.eval.select, cfg.data.val_split)
    plan = plan_inputs(cfg, train_index)
    # epoch: epochs finished; samples: samples of the epoch's global sequence trained on; micro: micro-batches
    # trained on by each rank; step: optimizer steps (micro // accumulation: checkpoint tags, log.every_steps,
    # checkpoint.every_steps, TensorBoard's x axis); world: ranks when saved.
    state = restore_state(engine, start, universal, plan, monitor, world=world, batch_size=cfg.data.batch_size,
                          accumulation=accumulation, epoch_units=first_epoch.plan.units)
    guard.skipped_total = state["nonfinite_steps"]
    selection = Selection.restore(state["selection"], select, cfg.optim.early_stop_patience)

    metrics: dict[str, Any] = {}
    micro, step = state["micro"], state["step"]
    logged = config_to_dict(cfg)
    logged["data"].update(mean=list(preprocess.mean), std=list(preprocess.std),
                          interpolation=preprocess.interpolation, crop_pct=preprocess.crop_pct)
    monitor.start(logged, [f"eval/recall@{min(cfg.eval.ks)}", "eval/map@r"], step)
    stop = StopOnSignal(cfg.run.stop_signals)
    try:
        stopped_early = selection.should_stop()
        for epoch in range(state["epoch"], cfg.optim.epochs if not stopped_early else state["epoch"]):
            resumed = state["samples"] if epoch == state["epoch"] else 0
            loader = make_loader(train_index, epoch=epoch, start_samples=resumed, **loader_args)
            plan_of_epoch = loader.plan
            # An optimizer step never spans two epochs: an epoch trains its whole steps only (at most
            # accumulation - 1 micro-batches per rank left out), so every checkpoint is at a step boundary.
            whole = plan_of_epoch.units // world // accumulation * accumulation
            monitor.start_epoch(epoch, cfg.optim.epochs, whole, initial=plan_of_epoch.start_unit // world)
            remaining = whole - plan_of_epoch.start_unit // world
            engine.train()
            engine.module.backbone_frozen = epoch < cfg.optim.warmup_epochs_new_layers
            timer.start()
            last_loss = "-"  # the progress bar shows the last logged loss: no .item() sync on other steps
            for i, batch in enumerate(loader):
                if i >= remaining:
                    break
                torch.manual_seed(step_seed(cfg.run.seed, epoch, int(plan_of_epoch.unit_ids[i])))  # dropout & co.
                stored = () if batch.teacher is None else (batch.teacher,)
                images, labels, stored, n_images, n_views = feed(batch.images, batch.labels, *stored)
                timer.data_ready()
                target = teacher(images) if teacher is not None else stored[0] if stored else None
                loss, parts, student_emb = engine(images, labels, target)
                guard.note_loss(loss)  # a NaN/Inf here or in a gradient skips the step on every rank (nonfinite.py)
                engine.backward(loss)
                engine.step()
                timer.step_done(n_images, n_views)
                micro += 1
                boundary = micro % accumulation == 0  # this micro-batch ended an optimizer step
                step = micro // accumulation
                state.update(samples=resumed + (i + 1) * plan_of_epoch.samples_per_step, micro=micro, step=step,
                             nonfinite_steps=guard.skipped_total)
                if boundary and step % cfg.log.every_steps == 0:
                    values = step_scalars(timer.read(), world, loss, parts, engine, target, student_emb)
                    values["train/nonfinite_steps"] = float(guard.skipped_total)
                    monitor.scalars(values, step)
                    last_loss = f"{values['loss/total']:.4f}"
                monitor.advance({"loss": last_loss})
                saved = None
                if boundary and cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 \
                        and i + 1 < remaining:
                    # (the epoch's last step is saved once, at the epoch's end, with the evaluation's state)
                    saved = checkpoint.save(engine, run_dir / "checkpoints", step, epoch,
                                            {**state, "epoch": epoch, "selection": selection.state()},
                                            cfg.checkpoint.keep)
                if boundary and i + 1 < remaining and stop.agreed(device):  # the epoch's end checks after its save
                    saved = saved or checkpoint.save(engine, run_dir / "checkpoints", step, epoch,
                                                     {**state, "epoch": epoch, "selection": selection.state()},
                                                     cfg.checkpoint.keep)
                    _stop(stop, saved, step, cfg, monitor, rank)
                timer.next_step()
            monitor.end_epoch()
            skipped = _epoch_skips(loader, device)
            monitor.train_epoch(epoch, step, {"skipped": skipped, "nonfinite_steps": guard.skipped_total})
            if any(skipped.values()):
                monitor.say(f"epoch {epoch + 1}: skipped unreadable data {skipped}")
            state.update(epoch=epoch + 1, samples=0, micro=micro, step=step)
            if epoch + 1 == cfg.optim.epochs or (epoch + 1) % cfg.eval.every_epochs == 0:
                metrics = _evaluate_and_select(cfg, engine, selection, epoch + 1, step, dtype, preprocess, monitor, run_dir)
                metrics["train_skipped"] = skipped
            stopped_early = selection.should_stop() and epoch + 1 < cfg.optim.epochs
            state["selection"] = selection.state()
            saved = checkpoint.save(engine, run_dir / "checkpoints", step, epoch, dict(state), cfg.checkpoint.keep)
            if epoch + 1 < cfg.optim.epochs and not stopped_early and stop.agreed(device):
                _stop(stop, saved, step, cfg, monitor, rank)
            if stopped_early:
                monitor.say(f"stopping early after epoch {epoch + 1}: validation R@1 has not improved for "
                            f"{selection.stale} evaluations (best {100 * selection.best_val_r1:.2f})")
                break
        if not metrics:  # no epoch evaluated here (optim.epochs 0, or a finished run resumed): the model as it is
            metrics = _evaluate_and_select(cfg, engine, selection, state["epoch"], step, dtype, preprocess, monitor,
                                           run_dir)
    except BaseException:
        monitor.close(finished=False)  # the progress bar and event files closed before the error is shown
        raise
    finally:
        stop.restore()
    monitor.close()
    kept = selection.best
    return {**kept["test"], "val": kept["val"], "final": {**summary(metrics), "epoch": state["epoch"]},
            "select": selection.select, "selected_epoch": kept["epoch"], "epochs_run": state["epoch"],
            "stopped_early": stopped_early, "best_r1": selection.score, "skipped": metrics.get("skipped"),
            "train_skipped": metrics.get("train_skipped")}
