"""The embedding-regression baseline against a float64 loop written from its definition, with gradients."""

from __future__ import annotations

import pytest
import torch

from rct_dist.losses import EmbeddingRegressionLoss


def reference(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(s)):
        target = t[i] / t[i].norm()
        total = total + ((w @ s[i] + b) - target).square().sum()
    return total / len(s)


def test_value_and_gradients_match_a_float64_loop():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(7, 9, generator=g, dtype=torch.float64) * 3
    loss_fn = EmbeddingRegressionLoss(5, 9).double()
    loss, parts = loss_fn(s, t, return_parts=True)
    ws, bs = loss_fn.map.weight.detach().clone().requires_grad_(), loss_fn.map.bias.detach().clone().requires_grad_()
    s_ref = s.detach().clone().requires_grad_()
    expected = reference(s_ref, t, ws, bs)
    assert loss.dtype == torch.float32  # the loss is computed in fp32 (mixed precision safe)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert parts["mse"].item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    expected.backward()
    assert torch.allclose(s.grad, s_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(loss_fn.map.weight.grad.double(), ws.grad, rtol=1e-5, atol=1e-7)
    assert torch.allclose(loss_fn.map.bias.grad.double(), bs.grad, rtol=1e-5, atol=1e-7)


def test_zero_when_the_map_reproduces_the_unit_teacher():
    s = torch.eye(4)
    t = torch.randn(4, 4) * 5
    loss_fn = EmbeddingRegressionLoss(4, 4)
    with torch.no_grad():
        loss_fn.map.weight.copy_(torch.nn.functional.normalize(t, dim=1).T)
        loss_fn.map.bias.zero_()
    assert loss_fn(s, t).item() == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("s_shape, t_shape, match", [
    ((4, 5), (3, 9), "same N"), ((4, 6), (4, 9), "5-d students"), ((4, 5), (4, 8), "9-d teachers"),
])
def test_bad_shapes_are_named(s_shape, t_shape, match):
    with pytest.raises(ValueError, match=match):
        EmbeddingRegressionLoss(5, 9)(torch.zeros(s_shape), torch.zeros(t_shape))
