"""Non-finite optimizer steps: skipped whole (parameters and Adam state), on every rank alike, counted,
and more than `max_nonfinite_steps` in a row stop the job."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from multiprocess import run_ranks
from rct_dist.train.nonfinite import GuardedAdamW, NonFiniteStepError
from rct_dist.train.task import WithLoss

NAN, INF = float("nan"), float("inf")


def make_params() -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(5, generator=g)), nn.Parameter(torch.randn(3, 4, generator=g))]


def grads(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(5, generator=g), torch.randn(3, 4, generator=g)]


def set_grads(params: list[nn.Parameter], values: list[torch.Tensor]) -> None:
    for p, v in zip(params, values):
        p.grad = v.clone()


def snapshot(params: list[nn.Parameter], optimizer: torch.optim.Optimizer) -> tuple[list[torch.Tensor], dict]:
    return [p.detach().clone() for p in params], copy.deepcopy(optimizer.state_dict()["state"])


def assert_same(a: tuple[list[torch.Tensor], dict], b: tuple[list[torch.Tensor], dict]) -> None:
    """Parameters and optimizer state bitwise equal (NaN where NaN)."""
    for x, y in zip(a[0], b[0]):
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    assert a[1].keys() == b[1].keys()
    for i in a[1]:
        assert a[1][i].keys() == b[1][i].keys()
        for k in a[1][i]:
            torch.testing.assert_close(a[1][i][k], b[1][i][k], rtol=0, atol=0, equal_nan=True)


def guarded(params: list[nn.Parameter], **kwargs) -> GuardedAdamW:
    return GuardedAdamW(params, lr=0.1, weight_decay=0.01, **kwargs)


@pytest.mark.parametrize("bad", [NAN, INF, -INF])
def test_a_nonfinite_gradient_skips_the_step_and_the_next_one_is_adamws(bad):
    params, reference = make_params(), make_params()
    opt, plain = guarded(params), torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01)
    set_grads(params, grads(1)), set_grads(reference, grads(1))
    opt.step(), plain.step()
    before = snapshot(params, opt)
    poisoned = grads(2)
    poisoned[1][2, 1] = bad  # one entry of one parameter
    set_grads(params, poisoned)
    opt.step()
    assert_same(snapshot(params, opt), before)  # nothing moved, Adam's step count included
    assert (opt.skipped_total, opt.consecutive, opt.steps, opt.last_finite_step) == (1, 1, 2, 1)
    assert float(opt.state[params[0]]["step"]) == 1.0
    set_grads(params, grads(3)), set_grads(reference, grads(3))
    opt.step(), plain.step()  # the guarded run's 3rd step is AdamW's 2nd
    assert_same(snapshot(params, opt), snapshot(reference, plain))
    assert not torch.equal(params[0], before[0][0])
    assert (opt.skipped_total, opt.consecutive, opt.steps, opt.last_finite_step) == (1, 0, 3, 3)


def test_a_nonfinite_loss_skips_even_with_finite_gradients():
    params, reference = make_params(), make_params()
    opt, plain = guarded(params), torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01)
    opt.note_loss(torch.tensor(0.5))  # accumulated micro-batches: one bad loss is enough
    opt.note_loss(torch.tensor([1.0, NAN]))
    opt.note_loss(torch.tensor(2.0))
    set_grads(params, grads(1))
    before = snapshot(params, opt)
    opt.step()
    assert_same(snapshot(params, opt), before)
    assert opt.state == {} and opt.skipped_total == 1
    opt.note_loss(torch.tensor(0.25))  # the flag was used up by the skipped step
    set_grads(params, grads(1)), set_grads(reference, grads(1))
    opt.step(), plain.step()
    assert_same(snapshot(params, opt), snapshot(reference, plain))
    assert (opt.skipped_total, opt.consecutive, opt.last_finite_step) == (1, 0, 2)


def test_without_skipping_it_is_adamw_and_nan_propagates(monkeypatch):
    params, reference = make_params(), make_params()
    opt, plain = guarded(params, skip_nonfinite=False), torch.optim.AdamW(reference, lr=0.1, weight_decay=0.01)
    monkeypatch.setattr(GuardedAdamW, "_decide", lambda self: pytest.fail("checked with skipping off"))
    for seed in (1, 2, 3):
        values = grads(seed)
        if seed == 2:
            values[0][3] = NAN
        opt.note_loss(torch.tensor(NAN))
        set_grads(params, values), set_grads(reference, values)
        opt.step(), plain.step()
        assert_same(snapshot(params, opt), snapshot(reference, plain))
    assert torch.isnan(params[0]).tolist() == [False, False, False, True, False]  # applied: the NaN stays
    assert torch.isfinite(params[1]).all()
    assert (opt.skipped_total, opt.consecutive, opt._loss_bad) == (0, 0, None)


def test_more_skips_in_a_row_than_allowed_stop_with_a_clear_message():
    params = make_params()
    opt = guarded(params, max_nonfinite_steps=2)
    poisoned = grads(0)
    poisoned[0][0] = NAN
    # finite, skip, skip, finite (resets), skip, skip: within the limit
    for step, values in enumerate([grads(1), poisoned, poisoned, grads(2), poisoned, poisoned], start=1):
        set_grads(params, values)
        opt.step()
    assert (opt.skipped_total, opt.consecutive, opt.steps, opt.last_finite_step) == (4, 2, 6, 4)
    before = snapshot(params, opt)
    set_grads(params, poisoned)
    with pytest.raises(NonFiniteStepError, match="3 optimizer steps in a row") as error:
        opt.step()
    assert "last finite step was 4" in str(error.value) and "optim.max_nonfinite_steps=2" in str(error.value)
    assert "5 skipped in all" in str(error.value)
    assert_same(snapshot(params, opt), before)  # the stopping step did not apply either
    assert isinstance(error.value, RuntimeError)


def test_a_limit_of_zero_stops_at_the_first_skip():
    params = make_params()
    opt = guarded(params, max_nonfinite_steps=0)
    set_grads(params, grads(1))
    opt.step()
    opt.note_loss(torch.tensor(INF))
    set_grads(params, grads(2))
    with pytest.raises(NonFiniteStepError, match="^1 optimizer steps in a row.*last finite step was 1"):
        opt.step()
    with pytest.raises(ValueError, match="max_nonfinite_steps"):
        guarded(make_params(), max_nonfinite_steps=-1)


# Distributed: rank 1 alone goes wrong. Step 2: a NaN loss with finite gradients (only the guard's
# all-reduce tells rank 0); steps 4 and 5: NaN gradients (ZeRO 0: the guard sees them after the
# all-reduce; ZeRO 2: DeepSpeed skips them itself and the guard counts them). Limit 1: step 5 stops.
# Under ZeRO 2 each step accumulates 2 micro-batches and only the first one goes wrong.
PLAN = ["finite", "nan_loss", "finite", "nan_grad", "nan_grad"]


class TwoGroups(nn.Module):
    """A backbone and a head: two param groups, so ZeRO calls the inner step twice per step."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone, self.head = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.backbone(x)))


def _guarded_rank(rank: int, world: int, config_name: str, accumulation: int) -> dict:
    from rct_dist.train.engine import build_engine, deepspeed_config, nonfinite_guard

    torch.manual_seed(0)
    module = WithLoss(TwoGroups(), nn.MSELoss())
    config = deepspeed_config(config_name, micro_batch=4, accumulation=accumulation, world=world, grad_clip=0.0)
    engine = build_engine(module, config, lr=0.05, weight_decay=0.0, warmup_steps=0, total_steps=100,
                          max_nonfinite_steps=1)
    guard = nonfinite_guard(engine)
    record: dict = {"params": [], "counters": [], "error": "", "decisions": 0}
    decide = guard._decide

    def counted_decide() -> bool:  # one all-reduce and sync each
        record["decisions"] += 1
        return decide()

    guard._decide = counted_decide
    g = torch.Generator().manual_seed(rank)
    flat = lambda: torch.cat([p.detach().flatten().clone() for p in engine.module.parameters()])  # noqa: E731
    record["params"].append(flat())
    for kind in PLAN:
        for micro in range(accumulation):
            loss = engine(torch.randn(4, 4, generator=g), torch.randn(4, 3, generator=g))
            if rank == 1 and micro == 0 and kind == "nan_loss":
                loss = loss + torch.tensor(NAN)  # the gradients stay finite
            elif rank == 1 and micro == 0 and kind == "nan_grad":
                loss = loss * torch.tensor(NAN)
            guard.note_loss(loss)
            engine.backward(loss)
            try:
                engine.step()
            except NonFiniteStepError as e:
                record["error"] = str(e)
        record["params"].append(flat())
        record["counters"].append((guard.skipped_total, guard.consecutive, guard.last_finite_step, guard.steps,
                                   engine.global_steps))
    record["params"] = torch.stack(record["params"])
    record["ds_skipped"] = engine.skipped_steps
    return record


# ZeRO 2 calls the inner step once per param group but decides once per step, and never reaches it on
# the steps DeepSpeed skipped itself.
@pytest.mark.parametrize("config_name,accumulation,ds_skipped,decisions",
                         [("zero0_fp32", 1, 0, 5), ("zero2_fp32", 2, 2, 3)])
def test_a_nan_on_one_rank_skips_the_step_on_every_rank(config_name, accumulation, ds_skipped, decisions):
    results = run_ranks(_guarded_rank, 2, config_name, accumulation)
    for rank, r in enumerate(results):
        p = r["params"]  # p[k]: after step k
        moved = [not torch.equal(p[k], p[k - 1]) for k in range(1, len(PLAN) + 1)]
        assert moved == [True, False, True, False, False], f"rank {rank}"
        assert torch.isfinite(p).all()
        # (skipped_total, consecutive, last finite step, guard's step, engine's step) after each step
        assert r["counters"] == [(0, 0, 1, 1, 1), (1, 1, 1, 2, 2), (1, 0, 3, 3, 3), (2, 1, 3, 4, 4),
                                 (3, 2, 3, 5, 5)], f"rank {rank}"
        assert r["error"].startswith("2 optimizer steps in a row") and "last finite step was 3" in r["error"]
        assert r["ds_skipped"] == ds_skipped  # DeepSpeed's own count: the steps it caught itself
        assert r["decisions"] == decisions
    assert torch.equal(results[0]["params"], results[1]["params"])  # the replicas never drifted apart
