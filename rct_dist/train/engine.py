"""DeepSpeed set-up: process group, ds_config arithmetic, AdamW with warmup + cosine, the engine.

With checkpoint.py, the only place that touches DeepSpeed. The same code runs on CPU (gloo) and
GPU (nccl): DeepSpeed picks its accelerator, we pick the backend.
"""

from __future__ import annotations

import datetime

import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from rct_dist.config import resolve_deepspeed_config
from rct_dist.distributed.world import World, discover_world
from rct_dist.train.nonfinite import GuardedAdamW, NonFiniteGuard, attach


def init_distributed(timeout: float | None = None) -> World:
    """Join the job the launcher describes (torchrun, deepspeed, accelerate, srun, OpenMPI's mpirun, or
    none: one process), read by `discover_world`, which refuses a half-described job.

    The world is written back as the torch.distributed variables and DeepSpeed's own MPI discovery
    is off: it needs mpi4py, and it would be skipped anyway once the variables are there.
    """
    world = discover_world()  # before importing DeepSpeed: a refusal should be quick
    world.export()
    import deepspeed

    extra = {}
    if timeout:
        extra["timeout"] = datetime.timedelta(seconds=timeout)
        # DeepSpeed makes its own groups (data parallel, ZeRO's) with `new_group(ranks)`, no timeout, and
        # torch gives such groups its module default (30 minutes for gloo), not the world's: the gradient
        # all-reduce would wait half an hour for a lost rank. Every group made from here on gets ours.
        import torch.distributed.distributed_c10d as c10d

        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = extra["timeout"]
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, **extra)
    return world


def deepspeed_config(name_or_path: str | Path, micro_batch: int, accumulation: int, world: int, grad_clip: float) -> dict:
    """The ds_config file with the batch arithmetic and clipping of this run written in.

    `name_or_path`: a built-in name (`zero2_bf16`) or a ds_config JSON file.
    DeepSpeed requires train_batch_size = micro x accumulation x world. The run config owns micro
    batch and accumulation (they replace the file's placeholders); a file that pins a different
    train_batch_size is refused here, before start, rather than silently overridden.
    """
    path = resolve_deepspeed_config(name_or_path)
    config = json.loads(path.read_text())
    total = micro_batch * accumulation * world
    if config.get("train_batch_size", total) != total:
        raise ValueError(
            f"{path}: train_batch_size {config['train_batch_size']} != micro batch {micro_batch} x accumulation "
            f"{accumulation} x world size {world} = {total}; remove it from the file"
        )
    config.update(
        train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=accumulation, train_batch_size=total
    )
    config["gradient_clipping"] = grad_clip  # DeepSpeed's own default is 1.0
    config.setdefault("steps_per_print", 2**31 - 1)  # the trainer logs for itself
    return config


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR factor: linear warmup to 1, then cosine to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def warmup_step_decay(warmup_steps: int, steps_per_epoch: int, decay_epochs: int, gamma: float) -> Callable[[int], float]:
    """LR factor: linear warmup to 1, then x gamma every `decay_epochs` epochs (Proxy-Anchor's StepLR,
    which steps once per epoch)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return gamma ** ((step // max(1, steps_per_epoch)) // decay_epochs)

    return factor


ROLES = ("backbone", "new", "proxies")


def _no_decay(name: str, p: nn.Parameter) -> bool:
    """timm's `param_groups_weight_decay` rule: 1-D tensors (BatchNorm/LayerNorm weights and biases,
    biases) and anything named `*.bias` get no weight decay."""
    return p.ndim <= 1 or name.endswith(".bias")


def param_groups(
    module: nn.Module, lr: float, criterion_lr_multiplier: float = 1.0, weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Trainable parameters as named optimizer groups, from the roles the module declares.

    Roles: `module.parameter_roles()` (rct_dist/train/task.py) -> {role: [(name, parameter)]} with roles
    `backbone` (the pretrained network), `new` (the embedding head, a loss's own layers) and `proxies`
    (Proxy-Anchor's proxies, at `criterion_lr_multiplier` x lr, as in the Proxy-Anchor paper). A module
    without `parameter_roles` has all its parameters in `new`. The declaration must cover every
    trainable parameter exactly once (a ValueError otherwise: nothing is left out of the optimizer).

    Weight decay: each role splits into `<role>` (weight decay `weight_decay`) and `<role>_no_decay`
    (weight decay 0) by timm's rule: 1-D tensors (BatchNorm weights and biases) and `*.bias` get none.
    The proxies are a (classes x dim) matrix, so they are decayed: as in the Proxy-Anchor authors'
    code (tjddus9597/Proxy-Anchor-CVPR2020 code/train.py), whose proxy group sets only its lr (x 100)
    and so takes the optimizer's weight decay (their 1e-4, AdamW). Unlike that code, which decays every
    parameter, biases and BatchNorm are not decayed here.

    Order: backbone, backbone_no_decay, new, new_no_decay, proxies, proxies_no_decay; frozen
    parameters (requires_grad False, e.g. `model.freeze_bn`) and empty groups are left out.
    """
    declare = getattr(module, "parameter_roles", None)
    roles = declare() if callable(declare) else {"new": list(module.named_parameters())}
    unknown = set(roles) - set(ROLES)
    if unknown:
        raise ValueError(f"{type(module).__name__}.parameter_roles: unknown roles {sorted(unknown)} (use {ROLES})")
    seen: dict[int, str] = {}
    groups: list[dict[str, Any]] = []
    rates = {"backbone": lr, "new": lr, "proxies": lr * criterion_lr_multiplier}
    for role in ROLES:
        split: dict[bool, list[nn.Parameter]] = {False: [], True: []}
        for name, p in roles.get(role, []):
            if id(p) in seen:
                raise ValueError(f"{type(module).__name__}.parameter_roles: {name} is in {seen[id(p)]} and {role}")
            seen[id(p)] = role
            if p.requires_grad:
                split[_no_decay(name, p)].append(p)
        for no_decay, params in split.items():
            if params:
                groups.append({"name": f"{role}_no_decay" if no_decay else role, "params": params,
                               "lr": rates[role], "weight_decay": 0.0 if no_decay else weight_decay})
    missing = [name for name, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{type(module).__name__}.parameter_roles leaves out trainable parameters: {missing}")
    return groups


def group_role(group: dict[str, Any]) -> str:
    """The role of a group `param_groups` made: `backbone_no_decay` -> `backbone`."""
    return group["name"].removesuffix("_no_decay")


def build_engine(
    module: nn.Module,
    ds_config: dict[str, Any],
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    criterion_lr_multiplier: float = 1.0,
    schedule: Callable[[int], float] | None = None,
    new_layers_only_steps: int = 0,
    skip_nonfinite: bool = True,
    max_nonfinite_steps: int = 5,
):
    """deepspeed.initialize with a torch AdamW (no op build needed) and an LR schedule per step.

    `schedule`: the LR factor per optimizer step (default: `warmup_cosine(warmup_steps, total_steps)`).
    `new_layers_only_steps`: the backbone groups' LR (decayed and not) is 0 for that many first steps,
    so only the new layers learn (Proxy-Anchor's warm-up epoch; the task also stops gradients into the
    backbone then). Groups and weight decay: `param_groups` (no decay for biases and 1-D parameters).
    `skip_nonfinite`, `max_nonfinite_steps`: the AdamW is a `GuardedAdamW`, which skips a step with a
    NaN/Inf loss or gradient on any rank and stops the job after more than that many in a row; the loop
    hands it each loss (`nonfinite_guard(engine).note_loss(loss)`). Off under fp16 loss scaling, which
    skips overflowing steps itself (rct_dist/train/nonfinite.py).
    """
    import deepspeed

    schedule = schedule or warmup_cosine(warmup_steps, total_steps)
    groups = param_groups(module, lr, criterion_lr_multiplier, weight_decay)

    def frozen_first(factor: Callable[[int], float]) -> Callable[[int], float]:
        return lambda step: 0.0 if step < new_layers_only_steps else factor(step)

    factors = [frozen_first(schedule) if group_role(g) == "backbone" else schedule for g in groups]
    optimizer = GuardedAdamW(groups, lr=lr, weight_decay=weight_decay, skip_nonfinite=skip_nonfinite,
                             max_nonfinite_steps=max_nonfinite_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    attach(engine, optimizer)
    low = torch.bfloat16 if engine.bfloat16_enabled() else torch.float16 if engine.fp16_enabled() else None
    if low is not None:
        norm_statistics_to(engine.module, low)
    return engine


def norm_statistics_to(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast every BatchNorm's running mean and variance to `dtype`, the dtype of its weights.

    DeepSpeed's `bf16`/`fp16` modes cast parameters to the low dtype; 0.19.8 (tested here) keeps buffers
    as loaded (fp32), where a blanket `module.bfloat16()` of older releases cast them too. A BatchNorm
    with bf16 weights and fp32 running statistics is refused by `batch_norm` ("expected scalar type
    BFloat16 but found Float"), so every backbone with BatchNorm (ResNets, MobileNets, EfficientNets)
    would stop at its first step. Here the statistics follow the weights whatever the release does.
    """
    for layer in module.modules():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            for name in ("running_mean", "running_var"):
                stat = getattr(layer, name)
                if stat is not None and stat.is_floating_point() and stat.dtype != dtype:
                    setattr(layer, name, stat.to(dtype))


def replicate_buffers(module: nn.Module, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics and counters); a collective.

    DeepSpeed keeps parameters the same on every rank (broadcast once, then averaged gradients) but, unlike
    DDP's default `broadcast_buffers`, never buffers: in training mode each rank's BatchNorm updates its
    running statistics from its own batches, so the ranks' statistics drift apart. A checkpoint and an
    export hold rank 0's, and a resume gives rank 0's to every rank; an evaluation where each rank embeds
    its share of a split with its own statistics would neither evaluate the exported model nor give a
    resumed run the uninterrupted run's numbers. Call this before anything reads the buffers on every rank.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        data = buffer.data
        if not data.is_contiguous():
            data = data.contiguous()
        dist.broadcast(data.reshape(-1).view(torch.uint8), src)  # bytes: any dtype, on any backend
        if data is not buffer.data:
            buffer.data.copy_(data)


def continue_micro_steps(engine, micro: int) -> None:
    """Set DeepSpeed's micro-step counter, which it does not checkpoint, to the run's: its gradient
    accumulation boundaries ((micro_steps + 1) % accumulation == 0) then fall where the loop's do."""
    engine.micro_steps = micro


def nonfinite_guard(engine) -> NonFiniteGuard:
    """The engine's optimizer guard: `note_loss(loss)` before `engine.step()`, counters to log."""
    return engine.nonfinite_guard
