"""The baseline transfer losses (RKD-D, RKD-A, PKT, DarkRank) against float64 references written
here from their definitions (full matrices / n^3 broadcasts / loops, no rct_dist helpers)."""

from __future__ import annotations

import math

import pytest
import torch

from rct_dist.losses import rkd
from rct_dist.losses.darkrank import DarkRankLoss
from rct_dist.losses.pkt import PKTLoss
from rct_dist.losses.rkd import RKDAngleLoss, RKDDistanceLoss


def rand(n: int, d: int, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)


# ---------------------------------------------------------------- references


def ref_pdist(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances; the eye keeps sqrt away from 0 on the diagonal (no NaN gradient)."""
    eye = torch.eye(len(x), dtype=x.dtype)
    sq = (x[:, None, :] - x[None, :, :]).square().sum(-1)
    return (sq + eye).sqrt() * (1 - eye)


def ref_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d**2, d - 0.5)


def ref_rkd_distance(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    n = len(s)
    ds, dt = ref_pdist(s), ref_pdist(t)
    ds = ds / (ds.sum() / (n * (n - 1)))
    dt = dt / (dt.sum() / (n * (n - 1)))
    return ref_huber(ds, dt).mean()


def ref_angles(x: torch.Tensor) -> torch.Tensor:
    """angles[a, b, c] = <unit(x_b - x_a), unit(x_c - x_a)>, zero where x_b == x_a or x_c == x_a."""
    v = x[None, :, :] - x[:, None, :]
    sq = v.square().sum(-1)
    e = v / torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt()[..., None]
    return torch.einsum("abd,acd->abc", e, e)


def ref_rkd_angle(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return ref_huber(ref_angles(s), ref_angles(t)).mean()


def ref_pkt(s: torch.Tensor, t: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    def prob(x):
        xn = x / (x.norm(dim=1, keepdim=True) + eps)
        sim = (xn @ xn.T + 1) / 2
        return sim / sim.sum(1, keepdim=True)

    ps, pt = prob(s), prob(t)
    return (pt * torch.log((pt + eps) / (ps + eps))).mean()


def ref_darkrank(s: torch.Tensor, t: torch.Tensor, alpha=3.0, beta=3.0, permute_len=4) -> torch.Tensor:
    n = len(s)
    total = s.new_zeros(())
    for i in range(n):
        others = [j for j in range(n) if j != i]
        t_score = {j: float(-alpha * (t[i] - t[j]).norm() ** beta) for j in others}
        ranked = sorted(others, key=lambda j: -t_score[j])[:permute_len]
        ss = torch.stack([-alpha * (s[i] - s[j]).norm() ** beta for j in ranked])
        log_prob = sum(ss[m] - torch.logsumexp(ss[m:], 0) for m in range(len(ranked)))
        total = total - log_prob
    return total / n


CASES = {
    "rkd_distance": (RKDDistanceLoss, ref_rkd_distance),
    "rkd_angle": (RKDAngleLoss, ref_rkd_angle),
    "pkt": (PKTLoss, ref_pkt),
    "darkrank": (DarkRankLoss, ref_darkrank),
}


def value_and_grad(fn, s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    loss = fn(s, t)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach(), grad


# ---------------------------------------------------------------- value and gradient


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("n, seed", [(7, 0), (9, 1), (12, 2)])
def test_matches_reference(name: str, n: int, seed: int) -> None:
    cls, ref = CASES[name]
    s, t = rand(n, 5, seed, scale=0.5), rand(n, 8, seed + 100)
    value, grad = value_and_grad(cls(), s, t)
    ref_value, ref_grad = value_and_grad(ref, s, t)
    assert value.dtype == torch.float64
    assert ref_value > 1e-4
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=0)
    assert grad.abs().max() > 1e-6
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(name: str) -> None:
    cls, _ = CASES[name]
    loss = cls()
    s = rand(5, 3, 3, scale=0.5).requires_grad_(True)
    t = rand(5, 4, 4)
    assert torch.autograd.gradcheck(lambda x: loss(x, t), (s,))


@pytest.mark.parametrize("name", CASES)
def test_parts_sum_to_loss(name: str) -> None:
    cls, ref = CASES[name]
    s, t = rand(8, 5, 5), rand(8, 6, 6)
    loss, parts = cls()(s, t, return_parts=True)
    assert len(parts) == 1
    torch.testing.assert_close(next(iter(parts.values())), ref(s, t), rtol=1e-10, atol=0)
    assert not next(iter(parts.values())).requires_grad


# ---------------------------------------------------------------- dtypes and degenerate inputs


@pytest.mark.parametrize("name", CASES)
def test_float32_agrees_with_float64(name: str) -> None:
    cls, _ = CASES[name]
    s, t = rand(10, 5, 7, scale=0.5), rand(10, 8, 8)
    loss64 = cls()(s, t)
    loss32 = cls()(s.float(), t.float())
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32.double(), loss64, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_bf16_inputs_give_fp32_loss_and_finite_grad(name: str) -> None:
    cls, ref = CASES[name]
    s = rand(10, 5, 9, scale=0.5, dtype=torch.bfloat16).requires_grad_(True)
    t = rand(10, 8, 10, dtype=torch.bfloat16)
    loss = cls()(s, t)
    assert loss.dtype == torch.float32
    # The loss of the bf16 values themselves, computed in float64.
    torch.testing.assert_close(loss.double(), ref(s.detach().double(), t.double()), rtol=1e-5, atol=0)
    loss.backward()
    assert s.grad.dtype == torch.bfloat16
    assert torch.isfinite(s.grad).all() and s.grad.abs().max() > 0


@pytest.mark.parametrize("name", CASES)
def test_autocast_is_disabled_inside(name: str) -> None:
    cls, _ = CASES[name]
    s, t = rand(10, 5, 11, scale=0.5, dtype=torch.float32), rand(10, 8, 12, dtype=torch.float32)
    plain = cls()(s, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = cls()(s, t)
    assert autocast.dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", CASES)
def test_duplicate_student_rows_give_finite_gradients(name: str) -> None:
    cls, ref = CASES[name]
    s, t = rand(8, 5, 13, scale=0.5), rand(8, 6, 14)
    s[3] = s[1]
    s[6] = s[1]
    value, grad = value_and_grad(cls(), s, t)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 1e-6
    torch.testing.assert_close(value, ref(s, t), rtol=1e-10, atol=0)


def test_rkd_distance_collapsed_student_is_finite() -> None:
    s = torch.ones(6, 4, dtype=torch.float64, requires_grad=True)
    t = rand(6, 5, 15)
    loss = RKDDistanceLoss()(s, t)
    loss.backward()
    # Every normalised student distance is 0; the teacher's have mean 1 over 30 off-diagonal pairs.
    expected = ref_huber(torch.zeros(6, 6, dtype=torch.float64), ref_pdist(t) / (ref_pdist(t).sum() / 30)).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=0)
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- RKD angle chunking


def test_rkd_angle_chunk_size() -> None:
    loss = RKDAngleLoss(chunk_elements=3 * 10 * (10 + 8))
    assert loss.chunk_size(10, 8) == 3
    assert RKDAngleLoss(chunk_elements=1).chunk_size(10, 8) == 1
    assert RKDAngleLoss().chunk_size(10, 8) == 2**22 // 180
    with pytest.raises(ValueError, match="chunk_elements"):
        RKDAngleLoss(chunk_elements=0)


@pytest.mark.parametrize("chunk_elements", [1, 3 * 11 * (11 + 8), 5 * 11 * (11 + 8)])
def test_rkd_angle_chunks_match_unchunked(chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    s, t = rand(11, 5, 16, scale=0.5), rand(11, 8, 17)
    whole_value, whole_grad = value_and_grad(RKDAngleLoss(), s, t)
    anchors_seen: list[int] = []
    original = rkd._angles

    def counting(anchors, cols):
        anchors_seen.append(anchors.shape[0])
        return original(anchors, cols)

    monkeypatch.setattr(rkd, "_angles", counting)
    loss = RKDAngleLoss(chunk_elements=chunk_elements)
    c = loss.chunk_size(11, 8)
    value, grad = value_and_grad(loss, s, t)
    chunks = math.ceil(11 / c)
    # Forward: student + teacher per chunk; backward recomputes both (checkpointing).
    assert len(anchors_seen) == 4 * chunks
    assert max(anchors_seen) == c
    torch.testing.assert_close(value, whole_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-12, atol=1e-15)


def test_rkd_angle_keeps_no_cubic_tensor_for_backward() -> None:
    n, dim = 12, 3
    s, t = rand(n, dim, 18, scale=0.5).requires_grad_(True), rand(n, 4, 19)
    saved: list[int] = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = RKDAngleLoss()(s, t)  # default budget: all 12 anchors in one chunk
    # Without the checkpoint, the (n, n, n) angles and (n, n, dim) unit vectors would be saved.
    assert saved and max(saved) < n * n
    loss.backward()
    assert torch.isfinite(s.grad).all()


# ---------------------------------------------------------------- DarkRank specifics


def test_darkrank_short_list_when_batch_is_smaller_than_permute_len() -> None:
    s, t = rand(4, 5, 20, scale=0.5), rand(4, 6, 21)
    loss = DarkRankLoss(permute_len=6)
    value, grad = value_and_grad(loss, s, t)
    ref_value, ref_grad = value_and_grad(lambda a, b: ref_darkrank(a, b, permute_len=6), s, t)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-14)
    # The full list of the 3 other rows differs from a list of 2.
    assert not torch.allclose(value, DarkRankLoss(permute_len=2)(s, t))


def test_darkrank_never_ranks_the_row_itself_with_duplicate_teacher_rows() -> None:
    s, t = rand(9, 5, 22, scale=0.5), rand(9, 6, 23)
    t[4] = t[2]
    # Student rows 2 and 4 mirror each other across the hyperplane of all other rows: every other
    # row sees them at equal distance (the teacher tie between them cannot change the value), but
    # they differ, so ranking row 2 itself (score 0) instead of row 4 would change the loss.
    s[:, -1] = 0
    s[4] = s[2]
    s[2, -1], s[4, -1] = -0.3, 0.3
    loss = DarkRankLoss(alpha=1.5, beta=2.0, permute_len=3)
    torch.testing.assert_close(
        loss(s, t), ref_darkrank(s, t, alpha=1.5, beta=2.0, permute_len=3), rtol=1e-10, atol=0
    )


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="permute_len"):
        DarkRankLoss(permute_len=0)
    with pytest.raises(ValueError, match="alpha"):
        DarkRankLoss(alpha=0)
    with pytest.raises(ValueError, match="beta"):
        DarkRankLoss(beta=-1)
    with pytest.raises(ValueError, match="eps"):
        PKTLoss(eps=0)
