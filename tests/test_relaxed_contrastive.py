"""RelaxedContrastiveLoss against an independent float64 computation, numerics and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from rct_dist.losses import RelaxedContrastiveLoss


def reference_rc(student, teacher, sigma=1.0, delta=1.0, per_pair=False):
    """The paper's formula, written out with explicit difference vectors in float64."""
    s = student.double()
    t = teacher.double()
    t = t / t.norm(dim=1, keepdim=True)
    n = s.shape[0]
    w = torch.exp(-((t[:, None] - t[None]) ** 2).sum(-1) / sigma)
    diff = s[:, None] - s[None]
    sq = (diff**2).sum(-1)
    off = ~torch.eye(n, dtype=torch.bool)
    dist = torch.zeros_like(sq)
    dist[off] = sq[off].sqrt()  # the self distance is exactly zero
    d = dist / dist.mean(1, keepdim=True)
    pull = (w * d**2)[off].sum()
    push = ((1 - w) * torch.clamp(delta - d, min=0) ** 2)[off].sum()
    norm = n * (n - 1) if per_pair else n
    return pull / norm, push / norm


def inputs(n=11, ds=6, dt=10, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, ds, generator=g, dtype=dtype), torch.randn(n, dt, generator=g, dtype=dtype)


@pytest.mark.parametrize("sigma,delta", [(1.0, 1.0), (0.5, 1.3), (2.0, 0.7)])
def test_value_parts_and_gradient_match_reference(sigma, delta):
    s, t = inputs()
    s.requires_grad_(True)
    loss, parts = RelaxedContrastiveLoss(sigma=sigma, delta=delta)(s, t, return_parts=True)
    (grad,) = torch.autograd.grad(loss, s)
    s_ref = s.detach().clone().requires_grad_(True)
    pull, push = reference_rc(s_ref, t, sigma, delta)
    (grad_ref,) = torch.autograd.grad(pull + push, s_ref)
    torch.testing.assert_close(loss, pull + push, rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["pull"], pull.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(parts["push"], push.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-13)
    assert parts["pull"] > 0 and parts["push"] > 0


def test_mean_pairs_reduction_divides_by_pairs():
    s, t = inputs(n=9)
    pull, push = reference_rc(s, t, per_pair=True)
    torch.testing.assert_close(RelaxedContrastiveLoss(reduction="mean_pairs")(s, t), pull + push, rtol=1e-12, atol=0)


def test_gradcheck():
    s, t = inputs(n=6, ds=3, dt=4)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: RelaxedContrastiveLoss(sigma=0.7)(x, t), (s,))


def test_teacher_gets_no_gradient_and_is_normalised():
    s, t = inputs()
    t.requires_grad_(True)
    loss = RelaxedContrastiveLoss()(s, t)
    assert not loss.requires_grad  # nothing but the teacher needs gradient here, and it gets none
    torch.testing.assert_close(RelaxedContrastiveLoss()(s, 7.0 * t.detach()), loss, rtol=1e-12, atol=0)


def test_student_scale_does_not_matter_but_is_not_normalised():
    s, t = inputs()
    loss = RelaxedContrastiveLoss()
    torch.testing.assert_close(loss(3.0 * s, t), loss(s, t), rtol=1e-12, atol=0)
    # Rescaling single rows changes distances: the student is not L2-normalised by default...
    scaled = s * torch.linspace(0.5, 2.0, s.shape[0], dtype=s.dtype)[:, None]
    assert not torch.isclose(loss(scaled, t), loss(s, t))
    # ...unless asked to be.
    normalised = RelaxedContrastiveLoss(normalize_student=True)
    torch.testing.assert_close(normalised(scaled, t), normalised(s, t), rtol=1e-12, atol=0)
    unit = s / s.norm(dim=1, keepdim=True)
    torch.testing.assert_close(normalised(s, t), sum(reference_rc(unit, t)), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_are_computed_in_fp32(dtype):
    s, t = inputs(dtype=torch.float32)
    s_half = s.to(dtype).requires_grad_(True)
    loss = RelaxedContrastiveLoss()(s_half, t.to(dtype))
    assert loss.dtype == torch.float32
    loss.backward()
    assert s_half.grad.dtype == dtype and torch.isfinite(s_half.grad.float()).all()
    expected = sum(reference_rc(s_half.detach().float(), t.to(dtype).float()))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)


def test_autocast_does_not_lower_the_loss_precision():
    s, t = inputs(dtype=torch.float32)
    plain = RelaxedContrastiveLoss()(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = RelaxedContrastiveLoss()(s, t)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, plain, rtol=1e-6, atol=0)


def test_float32_matches_float64():
    s, t = inputs(n=64, ds=32, dt=48)
    torch.testing.assert_close(
        RelaxedContrastiveLoss()(s.float(), t.float()).double(), RelaxedContrastiveLoss()(s, t), rtol=1e-5, atol=0
    )


def test_duplicate_student_rows_give_finite_gradients():
    s, t = inputs()
    s[3] = s[7]
    s[5] = s[7]
    s.requires_grad_(True)
    loss = RelaxedContrastiveLoss()(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    assert torch.isfinite(grad).all()
    # Gram-form distances of identical rows are sqrt(rounding) ~ 1e-8 (float64), not exactly 0.
    torch.testing.assert_close(loss, sum(reference_rc(s.detach(), t)), rtol=1e-7, atol=0)


def test_collapsed_student_stays_finite():
    _, t = inputs()
    s = torch.ones(t.shape[0], 4, dtype=torch.float64, requires_grad=True)
    loss = RelaxedContrastiveLoss()(s, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.grad).all()
    # every off-diagonal distance is zero: only the push term, (1 - w) * delta^2, remains
    tn = t / t.norm(dim=1, keepdim=True)
    w = torch.exp(-torch.cdist(tn, tn) ** 2)
    expected = (1 - w).fill_diagonal_(0).sum() / t.shape[0]
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=0)


def test_huge_norms_keep_small_distances():
    """A large common offset must not cancel the small distances in fp32 (the Gram form would)."""
    s, t = inputs(n=32, ds=16, dt=16)
    offset = 1e4 * torch.randn(1, 16, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    far = (offset + 1e-2 * s).float().double()  # exactly representable in fp32
    expected = sum(reference_rc(far, t))
    got = RelaxedContrastiveLoss()(far.float(), t.float())
    assert abs(got.item() - expected.item()) / expected.item() < 1e-4
    # The naive Gram form in fp32 does lose them, so the check above can fail.
    x = far.float()
    naive = (x.square().sum(1, keepdim=True) + x.square().sum(1) - 2 * x @ x.T).clamp_min(0)
    exact = torch.cdist(far, far).square()
    off = ~torch.eye(32, dtype=torch.bool)
    assert ((naive.double() - exact)[off].abs() / exact[off]).max() > 0.5


@pytest.mark.parametrize(
    "student,teacher,message",
    [
        (torch.randn(5, 3), torch.randn(4, 3), "same number of rows"),
        (torch.randn(1, 3), torch.randn(1, 3), "at least 2 rows"),
        (torch.randn(5), torch.randn(5, 3), "student must be a 2-D floating-point tensor"),
        (torch.randn(5, 3), torch.randn(5, 3, 2), "teacher must be a 2-D floating-point tensor"),
        (torch.ones(5, 3, dtype=torch.int64), torch.randn(5, 3), "student must be a 2-D floating-point tensor"),
        (torch.randn(5, 3).index_fill(0, torch.tensor([2]), math.nan), torch.randn(5, 3),
         r"student contains NaN or Inf \(rows \[2\]\)"),
        (torch.randn(5, 3), torch.randn(5, 3).index_fill(0, torch.tensor([1]), math.inf),
         r"teacher contains NaN or Inf \(rows \[1\]\)"),
        (torch.randn(5, 3), torch.randn(5, 3).index_fill(0, torch.tensor([4]), 0.0),
         r"teacher has a row of zero norm.*\(rows \[4\]\)"),
    ],
)
def test_bad_input_is_named(student, teacher, message):
    with pytest.raises(ValueError, match=message):
        RelaxedContrastiveLoss()(student, teacher)


@pytest.mark.parametrize(
    "kwargs,message",
    [({"sigma": 0.0}, "sigma must be positive"), ({"delta": -1.0}, "delta must be positive"),
     ({"reduction": "sum"}, "reduction must be one of")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RelaxedContrastiveLoss(**kwargs)
