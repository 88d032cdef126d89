"""The tiled RC loss equals the untiled one (value, parts, gradient), keeps nothing of size B x N,
and meets the distributed contract of tests/test_distributed_loss.py."""

from __future__ import annotations

import pytest
import torch
from loss_inputs import inputs, loss_parts_grad

from multiprocess import run_ranks
from rct_dist.losses import RelaxedContrastiveLoss, tiled
from test_distributed_loss import LOSSES, assert_matches, ddp_rank, single_process

# Registered here so that the spawned ranks, which import this module, build the same losses.
LOSSES.update(
    rc_tiled=lambda: RelaxedContrastiveLoss(chunk_size=3),  # several tiles on every rank
    rc_tiled_mean_pairs_sigma=lambda: RelaxedContrastiveLoss(
        sigma=0.5, delta=1.2, reduction="mean_pairs", chunk_size=2
    ),
    rc_normalized=lambda: RelaxedContrastiveLoss(normalize_student=True, chunk_size=0),
    rc_tiled_normalized=lambda: RelaxedContrastiveLoss(normalize_student=True, chunk_size=4),
)


def assert_same(tiled_result, core_result, rtol: float) -> None:
    (loss, parts, grad), (loss0, parts0, grad0) = tiled_result, core_result
    for got, ref in ((loss, loss0), (parts["pull"], parts0["pull"]), (parts["push"], parts0["push"]), (grad, grad0)):
        err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err <= rtol, f"relative error {err:.3g} > {rtol}"


@pytest.mark.parametrize("n,chunk", [(37, 8), (200, 64), (9, 100)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"sigma": 0.5, "delta": 1.3, "reduction": "mean_pairs"}, {"normalize_student": True}],
    ids=["paper", "mean_pairs", "normalize_student"],
)
def test_tiled_equals_core(n, chunk, dtype, rtol, kwargs):
    s, t = inputs(n, dtype=dtype)
    assert_same(loss_parts_grad(s, t, chunk_size=chunk, **kwargs), loss_parts_grad(s, t, chunk_size=0, **kwargs), rtol)


@pytest.mark.parametrize("n,chunk", [(37, 8), (9, 100)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-7), (torch.float32, 1e-3)])
@pytest.mark.parametrize("normalize_student", [False, True])
def test_tiled_equals_core_with_duplicate_rows(n, chunk, dtype, rtol, normalize_student):
    """Gram-form distances of identical rows are rounding noise of size sqrt(eps) x spread (README,
    Numerics), different in every summation order; so are their gradient terms. Both paths agree to
    that level, not to eps."""
    s, t = inputs(n, dtype=dtype, duplicates=True)
    tiled_result = loss_parts_grad(s, t, chunk_size=chunk, normalize_student=normalize_student)
    assert torch.isfinite(tiled_result[2]).all()
    assert_same(tiled_result, loss_parts_grad(s, t, chunk_size=0, normalize_student=normalize_student), rtol)


def test_tiled_equals_core_with_a_collapsed_student_and_huge_offset():
    _, t = inputs(20)
    collapsed = torch.ones(20, 4, dtype=torch.float64)
    collapsed[:10] += 1.0  # two clusters: every row mean is positive, many distances are zero
    assert_same(loss_parts_grad(collapsed, t, chunk_size=6), loss_parts_grad(collapsed, t, chunk_size=0), 1e-10)
    s, t = inputs(40, dtype=torch.float32)
    far = 1e4 + 1e-2 * s  # fp32: the centring must keep the small distances
    assert_same(loss_parts_grad(far, t, chunk_size=16), loss_parts_grad(far, t, chunk_size=0), 1e-5)


def test_gradcheck():
    s, t = inputs(7, ds=3, dt=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: RelaxedContrastiveLoss(sigma=0.7, chunk_size=3)(x, t), (s,))
    loss = RelaxedContrastiveLoss(normalize_student=True, reduction="mean_pairs", chunk_size=2)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,))


def test_half_inputs_are_computed_in_fp32():
    s, t = inputs(30, dtype=torch.float32)
    x = s.bfloat16().requires_grad_(True)
    loss = RelaxedContrastiveLoss(chunk_size=8)(x, t.bfloat16())
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, RelaxedContrastiveLoss(chunk_size=0)(x.detach(), t.bfloat16()), rtol=1e-5, atol=0)


def test_automatic_choice():
    limit = tiled.AUTO_MIN_ELEMENTS
    n = int(limit**0.5)  # n * n == limit: not above it
    assert tiled.tile_size(None, n, 1) == 0
    assert tiled.tile_size(None, n + 1, 1) == tiled.AUTO_TILE
    assert tiled.tile_size(None, 2 * n, 4) == 0  # 4 ranks: n/2 rows each, 2n columns
    assert tiled.tile_size(None, 2 * n + 4, 4) == tiled.AUTO_TILE
    assert tiled.tile_size(0, 10 * n, 1) == 0 and tiled.tile_size(5, 3, 1) == 5
    with pytest.raises(ValueError, match="chunk_size must be None or a non-negative integer"):
        RelaxedContrastiveLoss(chunk_size=-1)


def largest_saved(loss: RelaxedContrastiveLoss, student: torch.Tensor, teacher: torch.Tensor) -> int:
    """Elements of the largest tensor autograd keeps for the backward of `loss`."""
    sizes = [0]

    def pack(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.numel())
        return x

    x = student.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss(x, teacher).backward()
    return max(sizes)


def test_backward_keeps_nothing_of_b_by_n(monkeypatch):
    n, dim = 200, 8
    s, t = inputs(n, ds=dim, dt=dim, duplicates=False)
    monkeypatch.setattr(tiled, "AUTO_MIN_ELEMENTS", n * n - 1)  # the automatic choice tiles this batch
    assert largest_saved(RelaxedContrastiveLoss(), s, t) == n * dim  # the embeddings, nothing of n x n
    assert largest_saved(RelaxedContrastiveLoss(chunk_size=32), s, t) == n * dim
    monkeypatch.setattr(tiled, "AUTO_MIN_ELEMENTS", n * n)  # ...and this one not
    assert largest_saved(RelaxedContrastiveLoss(), s, t) >= n * n  # the check above can fail


@pytest.mark.parametrize(
    "core,tiled_name,counts,dtype,rtol",
    [
        ("rc", "rc_tiled", [7, 4], torch.float64, 1e-10),
        ("rc_mean_pairs_sigma", "rc_tiled_mean_pairs_sigma", [5, 4, 2], torch.float64, 1e-10),
        ("rc_normalized", "rc_tiled_normalized", [6, 0, 5], torch.float64, 1e-10),
        ("rc", "rc_tiled", [4, 4, 3], torch.float32, 1e-5),
    ],
    ids=["w2-unequal-f64", "w3-unequal-mean-pairs-f64", "w3-empty-rank-normalized-f64", "w3-unequal-f32"],
)
def test_ddp_tiled_matches_single_process_core(core, tiled_name, counts, dtype, rtol):
    """DDP-averaged gradients and parameters after 3 SGD steps of the tiled loss equal one process's core loss."""
    reference = single_process(core, counts, dtype)
    assert_matches(run_ranks(tiled_ddp_rank, len(counts), tiled_name, counts, dtype), reference, rtol)


def tiled_ddp_rank(rank: int, world: int, *args) -> dict:
    """`ddp_rank`, run from this module so that the spawned rank registers the losses above."""
    return ddp_rank(rank, world, *args)
