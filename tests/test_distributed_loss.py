"""The distributed contract: ranks fed slices of a global batch get the single-process gradient.

A model wrapped in DDP, and the same model in a DeepSpeed engine, each rank fed its slice of a
global batch (slices of unequal size included), must get the parameter gradient that one process
computes on the whole batch, and the same parameters after 3 SGD steps; the value each rank reports
is the global loss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from multiprocess import run_ranks
from rct_dist.train.task import WithLoss
from rct_dist.losses import (
    DarkRankLoss,
    PKTLoss,
    ProxyAnchorLoss,
    RelaxedContrastiveLoss,
    RKDAngleLoss,
    RKDDistanceLoss,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"
STEPS = 3
IN_DIM, STUDENT_DIM, TEACHER_DIM, CLASSES = 6, 5, 9, 4

# name -> criterion(student output, target); Proxy-Anchor's target is labels, the others' a teacher.
LOSSES = {
    "rc": lambda: RelaxedContrastiveLoss(),
    "rc_mean_pairs_sigma": lambda: RelaxedContrastiveLoss(sigma=0.5, delta=1.2, reduction="mean_pairs"),
    "rkd_distance": lambda: RKDDistanceLoss(),
    "rkd_angle": lambda: RKDAngleLoss(chunk_elements=200),  # several chunks per rank
    "pkt": lambda: PKTLoss(),
    "darkrank": lambda: DarkRankLoss(),
    "proxy_anchor": lambda: ProxyAnchorLoss(CLASSES, STUDENT_DIM),
}

# DarkRank's cubic scores diverge at lr 0.1 (loss 1e9 by step 3), which would compare noise.
LEARNING_RATES = {"darkrank": 1e-3}


def make_student(loss_name: str, dtype: torch.dtype) -> nn.Module:
    """Student network and criterion in one module, so the engine also averages the proxies' gradient."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(IN_DIM, 12), nn.Tanh(), nn.Linear(12, STUDENT_DIM))
    return WithLoss(net, LOSSES[loss_name]()).to(dtype)


def make_batches(loss_name: str, n: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(STEPS):
        x = torch.randn(n, IN_DIM, generator=g, dtype=dtype)
        if loss_name == "proxy_anchor":
            target = torch.randint(0, CLASSES, (n,), generator=g)
        else:
            target = torch.randn(n, TEACHER_DIM, generator=g, dtype=dtype)
        batches.append((x, target))
    return batches


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors])


def run_steps(forward, backward, step, grads, params, batches, rows=slice(None)) -> dict:
    """STEPS training steps; records the reported loss, the parameter gradient and the parameters."""
    record = {"losses": [], "grads": [], "params": []}
    for x, target in batches:
        loss = forward(x[rows], target[rows])
        loss_dtype = str(loss.dtype)
        backward(loss)
        record["losses"].append(loss.detach().double().reshape(1))
        record["grads"].append(flat(grads()))
        step()
        record["params"].append(flat(params()))
    return {**{k: torch.stack(v) for k, v in record.items()}, "dtype": loss_dtype}


def sgd_run(model: nn.Module, loss_name: str, counts: list[int], dtype: torch.dtype, rows=slice(None),
            autocast: bool = False) -> dict:
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATES.get(loss_name, 0.1))

    def forward(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return model(x, target)

    def backward(loss: torch.Tensor) -> None:
        opt.zero_grad()
        loss.backward()

    return run_steps(forward, backward, opt.step, lambda: [p.grad for p in model.parameters()], model.parameters,
                     make_batches(loss_name, sum(counts), dtype), rows)


def rank_rows(rank: int, counts: list[int]) -> slice:
    start = sum(counts[:rank])
    return slice(start, start + counts[rank])


def single_process(loss_name: str, counts: list[int], dtype: torch.dtype, autocast: bool = False) -> dict:
    return sgd_run(make_student(loss_name, dtype), loss_name, counts, dtype, autocast=autocast)


def ddp_rank(rank: int, world: int, loss_name: str, counts: list[int], dtype: torch.dtype) -> dict:
    model = nn.parallel.DistributedDataParallel(make_student(loss_name, dtype))
    return sgd_run(model, loss_name, counts, dtype, rank_rows(rank, counts))


def deepspeed_rank(rank: int, world: int, loss_name: str, counts: list[int], dtype: torch.dtype, config_name: str) -> dict:
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    model = make_student(loss_name, dtype)
    config = json.loads((CONFIGS / config_name).read_text())
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LEARNING_RATES.get(loss_name, 0.1)), config=config
    )
    params = lambda: list(engine.module.parameters())  # noqa: E731
    return run_steps(engine, engine.backward, engine.step, lambda: [safe_get_full_grad(p) for p in params()], params,
                     make_batches(loss_name, sum(counts), dtype), rank_rows(rank, counts))


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error: elementwise ratios of near-zero gradient entries mean nothing."""
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def assert_matches(results: list[dict], reference: dict, rtol: float) -> None:
    for rank, got in enumerate(results):
        for key in ("losses", "grads", "params"):
            for step, (g, r) in enumerate(zip(got[key], reference[key])):
                err = relative_error(g, r)
                assert err <= rtol, f"rank {rank} {key} step {step}: relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize(
    "counts,dtype,rtol",
    [
        ([6, 6], torch.float64, 1e-10),
        ([7, 4], torch.float64, 1e-10),
        ([5, 4, 2], torch.float64, 1e-10),
        ([6, 0, 5], torch.float64, 1e-10),
        ([4, 4, 3], torch.float32, 1e-5),
    ],
    ids=["w2-equal-f64", "w2-unequal-f64", "w3-unequal-f64", "w3-empty-rank-f64", "w3-unequal-f32"],
)
def test_ddp_matches_single_process(loss_name: str, counts: list[int], dtype: torch.dtype, rtol: float) -> None:
    reference = single_process(loss_name, counts, dtype)
    results = run_ranks(ddp_rank, len(counts), loss_name, counts, dtype)
    assert_matches(results, reference, rtol)


@pytest.mark.parametrize("config_name", ["zero0_fp32.json", "zero2_fp32.json"])
@pytest.mark.parametrize("counts", [[5, 3], [4, 3, 3]], ids=["w2", "w3"])
def test_deepspeed_matches_single_process(config_name: str, counts: list[int]) -> None:
    reference = single_process("rc", counts, torch.float32)
    results = run_ranks(deepspeed_rank, len(counts), "rc", counts, torch.float32, config_name)
    assert_matches(results, reference, 1e-5)


def test_deepspeed_bf16_autocast_keeps_the_loss_in_fp32() -> None:
    """Under DeepSpeed's bf16 autocast the model runs in bf16 and the loss in fp32: the run matches
    a single process under the same autocast, to bf16 rounding of the per-rank forward passes."""
    counts = [5, 3]
    reference = single_process("rc", counts, torch.float32, autocast=True)
    results = run_ranks(deepspeed_rank, 2, "rc", counts, torch.float32, "zero2_bf16_autocast.json")
    assert all(r["dtype"] == "torch.float32" for r in results)
    assert_matches(results, reference, 2e-2)
    fp32 = single_process("rc", counts, torch.float32)
    assert relative_error(results[0]["grads"][0], fp32["grads"][0]) > 1e-4  # bf16 really was used


def test_without_gather_each_rank_uses_its_own_batch() -> None:
    """gather=False: each rank's value is its local loss, which differs from the global one."""
    counts = [5, 4]
    results = run_ranks(_local_loss_rank, 2, counts)
    x, t = make_batches("rc", sum(counts), torch.float64)[0]
    for rank, got in enumerate(results):
        expected = RelaxedContrastiveLoss()(x[rank_rows(rank, counts)], t[rank_rows(rank, counts)])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert not torch.allclose(results[0], RelaxedContrastiveLoss()(x, t))


def _local_loss_rank(rank: int, world: int, counts: list[int]) -> torch.Tensor:
    x, t = make_batches("rc", sum(counts), torch.float64)[0]
    return RelaxedContrastiveLoss(gather=False)(x[rank_rows(rank, counts)], t[rank_rows(rank, counts)]).detach()


def _bad_input_rank(rank: int, world: int) -> str:
    torch.manual_seed(rank)
    student, teacher = torch.randn(4, 3), torch.randn(4, 5)
    if rank == 1:
        student[2, 0] = float("nan")
    try:
        RelaxedContrastiveLoss()(student, teacher)
    except ValueError as e:
        return str(e)
    return "no error"


def test_nan_on_one_rank_raises_on_every_rank() -> None:
    messages = run_ranks(_bad_input_rank, 2)
    assert messages[0] == "rank 1: student contains NaN or Inf"
    assert messages[1].startswith("student contains NaN or Inf (rows [2])")
