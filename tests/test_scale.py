"""Scale-out with the trainer's own pieces: world sizes 1, 2 and 4 (and 8, opt-in) reproduce one process.

What the training loop builds (`build_task` from a run config: the student and the RC transfer loss in
one module; `deepspeed_config` + `build_engine`: ZeRO 2, fp32, torch AdamW with warmup + cosine and
gradient clipping) is run on W gloo ranks, each fed its slice of a global batch of (image, 2 views)
through `views_flat`, as the loop feeds it. Against one plain PyTorch process on the whole batch (the
same optimizer, schedule and clipping written out by hand), every rank must report the same loss and
hold the same full parameter gradient before each step and the same parameters after it.

The student's BatchNorm is the one thing that is per rank: in train mode each rank normalises with
its own rows' statistics (no SyncBatchNorm on CPU). So the exact comparison runs the network in eval
mode (running statistics), and a second comparison in train mode checks the precise claim "the loss is
global, BatchNorm is local": one process that runs the network on each rank's slice separately and the
loss on the concatenation gets what the ranks get.

The optimizer is the one piece swapped: `build_engine` gets plain SGD (same learning rate, weight
decay, param groups, schedule and clipping) in place of AdamW. The RC loss depends on student distances
only, so it does not see a shift of every embedding: the embedding head's bias, and the last BatchNorm
bias of every channel that is active at every position, get gradients that are zero up to rounding,
and AdamW, which divides each gradient by its own running size, turns that rounding noise into
full-size steps that differ between any two summation orders (measured: 3e-4 relative on the
parameters after 2 steps at world 1, all of it in such entries). SGD's step is linear in the
gradient, so equal gradients give equal parameters, to rounding.

World 8 runs only with RCT_TEST_WORLD8=1 (8 processes take minutes on 2 cores). There, ZeRO 2 with an
empty rank is a known, strict expected failure (WORLD8_EMPTY_RANK; at 4 ranks EMPTY_RANK_ZERO2, the
other empty-rank cases run ZeRO 1); ZeRO 1 on the same batch passes.

DeepSpeed's ZeRO optimizers take fp32 (or bf16/fp16) parameters, not float64, so this runs in fp32 and
compares norm-wise with the same 1e-5 tolerance as tests/test_distributed_loss.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from multiprocess import run_ranks
from rct_dist.config import load_config
from rct_dist.train import engine as engine_module
from rct_dist.train.engine import build_engine, deepspeed_config, warmup_cosine
from rct_dist.train.feed import views_flat
from rct_dist.train.loop import build_task
from rct_dist.train.nonfinite import NonFiniteGuard

STEPS = 2
VIEWS = 2
IMAGE = 16
TEACHER_DIM = 24
CLASSES = 5
LR, WEIGHT_DECAY, WARMUP, TOTAL, GRAD_CLIP = 1e-2, 1e-4, 1, 10, 0.5
RTOL = 1e-5
OVERRIDES = [
    "model.backbone=rct_cnn3_small", "model.embedding_size=16", f"data.image_size={IMAGE}",
    f"data.views={VIEWS}", "data.root=unused", f"optim.lr={LR}", f"optim.weight_decay={WEIGHT_DECAY}",
    f"optim.warmup_steps={WARMUP}", f"optim.grad_clip={GRAD_CLIP}",
]


def make_task(chunk_size: int | None, ds_name: str = "zero2_fp32"):
    """The loop's transfer task for the omniglot/rc config, at 16x16 px; `chunk_size` forces the tiled loss."""
    cfg = load_config("omniglot/rc", [*OVERRIDES, f"deepspeed.config={ds_name}"])
    torch.manual_seed(0)
    task = build_task(cfg, CLASSES)
    if chunk_size is not None:
        task.transfer.chunk_size = chunk_size
    return cfg, task


class SGDForAdamW(NonFiniteGuard, torch.optim.SGD):
    """Takes GuardedAdamW's place in build_engine: the same call, a step linear in the gradient."""

    def __init__(self, params, lr: float, weight_decay: float, **guard) -> None:
        super().__init__(params, lr=lr, weight_decay=weight_decay, **guard)


def make_batches(images: int) -> list[tuple[torch.Tensor, ...]]:
    """STEPS global batches: (images, views, 3, H, W), labels and one stored teacher row per image."""
    g = torch.Generator().manual_seed(1)
    return [
        (torch.randn(images, VIEWS, 3, IMAGE, IMAGE, generator=g), torch.randint(0, CLASSES, (images,), generator=g),
         torch.randn(images, TEACHER_DIM, generator=g))
        for _ in range(STEPS)
    ]


def slices(counts: list[int]) -> list[slice]:
    starts = [sum(counts[:r]) for r in range(len(counts))]
    return [slice(s, s + n) for s, n in zip(starts, counts)]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().double().flatten() for t in tensors])


def reference(counts: list[int], train_mode: bool, chunk_size: int | None) -> dict:
    """One process, no DeepSpeed, on the whole global batch; in train mode the network sees each rank's
    slice separately (per-rank BatchNorm statistics), the loss the concatenation."""
    _, task = make_task(chunk_size)
    task.train(train_mode)
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = SGDForAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(WARMUP, TOTAL))
    record = {"losses": [], "grads": [], "params": []}
    for images, labels, teacher in make_batches(sum(counts)):
        images, labels, teacher = views_flat(images, labels, teacher)
        if train_mode:
            parts = [images[s] for s in slices([n * VIEWS for n in counts]) if s.stop > s.start]
            embeddings = torch.cat([task.net(x) for x in parts])
            loss = task.transfer(embeddings, teacher)
        else:
            loss = task(images, labels, teacher)[0]
        optimizer.zero_grad()
        loss.backward()
        record["losses"].append(loss.detach().double().reshape(1))
        record["grads"].append(flat(p.grad for p in params))
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        schedule.step()
        record["params"].append(flat(params))
    return {k: torch.stack(v) for k, v in record.items()}


def engine_rank(rank: int, world: int, counts: list[int], train_mode: bool, chunk_size: int | None,
                ds_name: str = "zero2_fp32") -> dict:
    """The loop's step on this rank's slice: engine(images, labels, teacher), backward, step."""
    from deepspeed.utils import safe_get_full_grad

    cfg, task = make_task(chunk_size, ds_name)
    ds_config = deepspeed_config(cfg.deepspeed.config, max(counts) * VIEWS, 1, world, cfg.optim.grad_clip)
    adamw, engine_module.GuardedAdamW = engine_module.GuardedAdamW, SGDForAdamW
    try:
        engine = build_engine(task, ds_config, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.warmup_steps, TOTAL)
    finally:
        engine_module.GuardedAdamW = adamw
    assert type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer") else engine.optimizer) is SGDForAdamW
    engine.train(train_mode)
    params = [p for p in engine.module.parameters() if p.requires_grad]
    mine = slices(counts)[rank]
    record = {"losses": [], "grads": [], "params": []}
    for images, labels, teacher in make_batches(sum(counts)):
        images, labels, teacher = views_flat(images[mine], labels[mine], teacher[mine])
        loss, _, _ = engine(images, labels, teacher)
        engine.backward(loss)
        record["losses"].append(loss.detach().double().reshape(1))
        record["grads"].append(flat(safe_get_full_grad(p) for p in params))
        engine.step()
        record["params"].append(flat(params))
    return {k: torch.stack(v) for k, v in record.items()}


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got - ref).norm() / ref.norm()).item()


def assert_matches(results: list[dict], ref: dict) -> None:
    for rank, got in enumerate(results):
        for key in ("losses", "grads", "params"):
            for step in range(STEPS):
                err = relative_error(got[key][step], ref[key][step])
                assert err <= RTOL, f"rank {rank} {key} step {step}: relative error {err:.3g} > {RTOL}"


def engine_cases(rank: int, world: int, cases: list[tuple]) -> list[dict]:
    """Every case of one world size in the same processes (starting the ranks costs far more than a case)."""
    return [engine_rank(rank, world, *case) for case in cases]


# id -> (images per rank, train mode, chunk_size); each rank gets 2 views of each of its images.
CASES = {
    "w1": ([6], False, None),
    "w2-equal": ([3, 3], False, None),
    "w2-train-bn": ([4, 2], True, None),
    "w4-equal": ([2, 2, 2, 2], False, None),
    # An empty rank under ZeRO 1 (ZeRO 2: EMPTY_RANK_ZERO2 below)
    "w4-unequal-empty": ([7, 5, 0, 3], False, None, "zero1_fp32"),
    "w4-unequal-empty-tiled": ([7, 5, 0, 3], False, 4, "zero1_fp32"),
    "w4-unequal-empty-train-bn": ([7, 5, 0, 3], True, None, "zero1_fp32"),
    "w4-unequal-empty-zero2": ([7, 5, 0, 3], False, None),
}
EMPTY_RANK_ZERO2 = (
    "DeepSpeed ZeRO 2 with an empty rank: autograd hands BatchNorm's weight and bias gradients over in another "
    "order on the rank with no rows, and ZeRO 2 assumes every rank's order is the same (DeepSpeed issue 2343); "
    "with weight decay groups split by timm's rule those parameters fall in the empty rank's partition at 4 ranks. "
    "The trainer's loader never gives a rank an empty batch; ZeRO 0 and 1 are exact here."
)
WORLD8 = {
    "w8-unequal": ([3, 1, 1, 2, 4, 1, 2, 2], False, None),
    "w8-unequal-empty": ([3, 1, 0, 2, 4, 1, 2, 2], False, None),
    "w8-unequal-empty-zero1": ([3, 1, 0, 2, 4, 1, 2, 2], False, None, "zero1_fp32"),
}
_runs: dict[int, dict[str, dict]] = {}


def ranks_of(case_id: str) -> list[dict]:
    """Each rank's record for `case_id`, running every case of its world size on first use."""
    cases = {**CASES, **WORLD8}
    world = len(cases[case_id][0])
    if world not in _runs:
        ids = [k for k, v in cases.items() if len(v[0]) == world]
        per_rank = run_ranks(engine_cases, world, [cases[k] for k in ids])
        _runs[world] = {k: [rank[i] for rank in per_rank] for i, k in enumerate(ids)}
    return _runs[world][case_id]


@pytest.mark.parametrize("case_id", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=EMPTY_RANK_ZERO2)) if c == "w4-unequal-empty-zero2" else c
    for c in CASES
])
def test_engine_matches_one_process(case_id: str) -> None:
    counts, train_mode, chunk_size, *_ = CASES[case_id]
    assert_matches(ranks_of(case_id), reference(counts, train_mode, chunk_size))


WORLD8_EMPTY_RANK = (
    "DeepSpeed ZeRO 2 at 8 ranks with an empty rank: the full gradient of a few parameters in the empty rank's "
    "partition (features.1.bn weight and bias here) is wrong (6e-2 relative overall) and so is the step "
    "(3e-5 on the parameters); ZeRO 0 and 1 on the same batch are exact; the cause is the one of "
    "w4-unequal-empty-zero2 (measured with DeepSpeed 0.19.8 on gloo)"
)


@pytest.mark.skipif(os.environ.get("RCT_TEST_WORLD8") != "1", reason="8 ranks take minutes on 2 cores; RCT_TEST_WORLD8=1")
@pytest.mark.parametrize("case_id", [
    "w8-unequal",
    "w8-unequal-empty-zero1",
    pytest.param("w8-unequal-empty", marks=pytest.mark.xfail(strict=True, reason=WORLD8_EMPTY_RANK)),
])
def test_world8_matches_one_process(case_id: str) -> None:
    counts, train_mode, chunk_size, *_ = WORLD8[case_id]
    assert_matches(ranks_of(case_id), reference(counts, train_mode, chunk_size))
