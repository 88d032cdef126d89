"""Proxy-Anchor against a float64 reference written here from the definition (no rct_dist helpers)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from rct_dist.losses.proxy_anchor import ProxyAnchorLoss


def rand(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def ref_parts(x, labels, proxies, num_classes, margin=0.1, alpha=32.0):
    """(pos, neg) of the authors' Proxy_Anchor: one-hot masks, plain exp sums, log(1 + .)."""
    cos = (x / x.norm(dim=1, keepdim=True)) @ (proxies / proxies.norm(dim=1, keepdim=True)).T
    one_hot = torch.nn.functional.one_hot(labels, num_classes).to(x.dtype)
    pos_exp = torch.exp(-alpha * (cos - margin))
    neg_exp = torch.exp(alpha * (cos + margin))
    num_valid = (one_hot.sum(0) != 0).sum()
    pos = torch.log(1 + (one_hot * pos_exp).sum(0)).sum() / num_valid
    neg = torch.log(1 + ((1 - one_hot) * neg_exp).sum(0)).sum() / num_classes
    return pos, neg


def ref_loss(x, labels, proxies, num_classes, margin=0.1, alpha=32.0):
    pos, neg = ref_parts(x, labels, proxies, num_classes, margin, alpha)
    return pos + neg


def make(num_classes: int, dim: int, seed: int, **kwargs) -> ProxyAnchorLoss:
    torch.manual_seed(seed)
    return ProxyAnchorLoss(num_classes, dim, **kwargs).double()


@pytest.mark.parametrize(
    "n, num_classes, dim, margin, alpha, seed",
    [(7, 5, 6, 0.1, 32.0, 0), (10, 12, 8, 0.1, 32.0, 1), (12, 4, 3, 0.2, 16.0, 2)],
)
def test_matches_reference(n, num_classes, dim, margin, alpha, seed) -> None:
    loss = make(num_classes, dim, seed, margin=margin, alpha=alpha)
    x = rand((n, dim), seed + 10).requires_grad_(True)
    labels = torch.randint(0, num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    value, parts = loss(x, labels, return_parts=True)
    gx, gp = torch.autograd.grad(value, (x, loss.proxies))

    p = loss.proxies.detach().clone().requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    ref_pos, ref_neg = ref_parts(x_ref, labels, p, num_classes, margin, alpha)
    ref_gx, ref_gp = torch.autograd.grad(ref_pos + ref_neg, (x_ref, p))

    assert value.dtype == torch.float64
    torch.testing.assert_close(value.detach(), (ref_pos + ref_neg).detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(parts["pos"], ref_pos.detach(), rtol=1e-10, atol=0)
    torch.testing.assert_close(parts["neg"], ref_neg.detach(), rtol=1e-10, atol=0)
    assert not parts["pos"].requires_grad and not parts["neg"].requires_grad
    assert gx.abs().max() > 1e-6 and gp.abs().max() > 1e-6
    torch.testing.assert_close(gx, ref_gx, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gp, ref_gp, rtol=1e-10, atol=1e-14)


def test_absent_classes_are_left_out_of_the_positive_mean() -> None:
    loss = make(9, 4, 3)
    x = rand((6, 4), 13)
    labels = torch.tensor([0, 0, 2, 2, 2, 5])  # 3 of 9 classes present
    _, parts = loss(x, labels, return_parts=True)
    pos, _ = ref_parts(x, labels, loss.proxies.detach(), 9)
    torch.testing.assert_close(parts["pos"], pos, rtol=1e-10, atol=0)
    # Dividing by all 9 classes instead of the 3 present would give a third of it.
    assert not torch.allclose(parts["pos"], pos / 3)


def test_gradcheck() -> None:
    loss = make(4, 3, 4, alpha=4.0)
    labels = torch.tensor([0, 1, 1, 3, 0])
    x = rand((5, 3), 14).requires_grad_(True)
    p = loss.proxies.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: functional_call(loss, {"proxies": b}, (a, labels)), (x, p))


def test_float32_agrees_with_float64() -> None:
    loss = make(6, 8, 5)
    x = rand((10, 8), 15)
    labels = torch.randint(0, 6, (10,), generator=torch.Generator().manual_seed(5))
    loss64 = loss(x, labels)
    loss32 = loss.float()(x.float(), labels)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=0)


def test_large_alpha_does_not_overflow_in_fp32() -> None:
    loss = make(5, 8, 6, alpha=100.0).float()
    labels = torch.randint(0, 5, (12,), generator=torch.Generator().manual_seed(6))
    x = rand((12, 8), 16, torch.float32)
    x[0] = 3 * loss.proxies.detach()[(labels[0] + 1) % 5]  # cos 1 with a negative proxy
    x.requires_grad_(True)
    value = loss(x, labels)
    # The plain exp(100 * (1 + 0.1)) overflows fp32; the shifted form stays exact.
    assert not torch.isfinite(ref_loss(x.detach(), labels, loss.proxies.detach(), 5, alpha=100.0))
    expected = ref_loss(x.detach().double(), labels, loss.proxies.detach().double(), 5, alpha=100.0)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(loss.proxies.grad).all()


def test_bf16_embeddings_give_fp32_loss_and_finite_grad() -> None:
    loss = make(6, 8, 7).float()
    x = rand((10, 8), 17, torch.bfloat16).requires_grad_(True)
    labels = torch.randint(0, 6, (10,), generator=torch.Generator().manual_seed(7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = loss(x, labels)
    assert value.dtype == torch.float32
    expected = ref_loss(x.detach().double(), labels, loss.proxies.detach().double(), 6)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=0)
    value.backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() > 0


def test_proxies_use_kaiming_fan_out_init() -> None:
    torch.manual_seed(0)
    loss = ProxyAnchorLoss(100, 512)
    assert isinstance(loss.proxies, torch.nn.Parameter) and loss.proxies.shape == (100, 512)
    # fan_out of a (100, 512) weight is 100: std sqrt(2 / 100); fan_in would give sqrt(2 / 512).
    assert abs(loss.proxies.std().item() / (2 / 100) ** 0.5 - 1) < 0.02
    assert abs(loss.proxies.mean().item()) < 0.005


@pytest.mark.parametrize(
    "x, labels, match",
    [
        (rand((4, 6), 0), torch.tensor([0, 1, 5, 2]), r"labels must lie in \[0, num_classes\).*\[5\]"),
        (rand((4, 6), 0), torch.tensor([0, -1, 1, 2]), r"labels must lie in \[0, num_classes\).*\[-1\]"),
        (rand((4, 7), 0), torch.tensor([0, 1, 2, 3]), "wrong embedding size: expected 6, got 7"),
        (rand((4, 6), 0)[:, 0], torch.tensor([0, 1, 2, 3]), "embeddings must be a 2-D floating-point"),
        (torch.ones(4, 6, dtype=torch.long), torch.tensor([0, 1, 2, 3]), "embeddings must be a 2-D floating-point"),
        (rand((4, 6), 0), torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels must be a 1-D integer tensor"),
        (rand((4, 6), 0), torch.tensor([[0, 1, 2, 3]]), "labels must be a 1-D integer tensor"),
        (rand((4, 6), 0), torch.tensor([0, 1, 2]), "same number of rows, got 3 labels for 4 embeddings"),
        (rand((0, 6), 0), torch.zeros(0, dtype=torch.long), "at least 1 embedding"),
    ],
)
def test_bad_inputs_raise(x, labels, match) -> None:
    with pytest.raises(ValueError, match=match):
        make(5, 6, 8)(x, labels)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_embeddings_raise(value: float) -> None:
    x = rand((4, 6), 9)
    x[2, 3] = value
    with pytest.raises(ValueError, match=r"embeddings contain NaN or Inf \(rows \[2\]\)"):
        make(5, 6, 9)(x, torch.tensor([0, 1, 2, 3]))


def test_non_finite_proxies_raise() -> None:
    loss = make(5, 6, 10)
    with torch.no_grad():
        loss.proxies[1, 0] = float("nan")
    with pytest.raises(ValueError, match="proxies contain NaN or Inf"):
        loss(rand((4, 6), 10), torch.tensor([0, 1, 2, 3]))


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        ProxyAnchorLoss(0, 8)
    with pytest.raises(ValueError, match="embedding_size"):
        ProxyAnchorLoss(3, 0)
    with pytest.raises(ValueError, match="alpha"):
        ProxyAnchorLoss(3, 8, alpha=0)
