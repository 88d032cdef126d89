"""One rule for parameter groups: the task declares each parameter's role (backbone / new / proxies),
the engine splits each role into decayed and not decayed (timm's rule: 1-D tensors and `*.bias` get no
weight decay), the proxies get lr x the multiplier, frozen parameters stay out, and the DeepSpeed
engine's optimizer carries exactly these groups."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from multiprocess import run_ranks
from rct_dist.config import load_config
from rct_dist.losses import ProxyAnchorLoss
from rct_dist.train.build import build_task
from rct_dist.train.engine import param_groups
from rct_dist.train.nonfinite import GuardedAdamW
from rct_dist.train.task import WithLoss

LR, MULTIPLIER, WEIGHT_DECAY = 1e-3, 100.0, 1e-4
OVERRIDES = ["model.backbone=rct_cnn3_small", "model.embedding_size=8", "data.image_size=16"]


def make_task(job: str = "omniglot/teacher", *overrides: str):
    os.environ.setdefault("RCT_DIST_DATA", "/nonexistent")  # the configs' data root; nothing is read
    cfg = load_config(job, [*OVERRIDES, *overrides])
    torch.manual_seed(0)
    return build_task(cfg, num_classes=7)


def by_id(groups: list[dict]) -> dict[int, dict]:
    """id(parameter) -> its group; fails if a parameter is in two groups."""
    seen: dict[int, dict] = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in seen, f"a parameter in {seen[id(p)]['name']} and {g['name']}"
            seen[id(p)] = g
    return seen


@pytest.fixture(autouse=True)
def no_data(monkeypatch):
    monkeypatch.setenv("RCT_DIST_DATA", "/nonexistent")


def test_every_trainable_parameter_is_in_exactly_one_group():
    task = make_task()
    groups = param_groups(task, LR, MULTIPLIER, WEIGHT_DECAY)
    assert [g["name"] for g in groups] == ["backbone", "backbone_no_decay", "new", "new_no_decay", "proxies"]
    owner = by_id(groups)
    assert set(owner) == {id(p) for p in task.parameters() if p.requires_grad}
    roles = task.parameter_roles()
    assert {n for n, _ in roles["proxies"]} == {"criterion.proxies"}  # the checkpoint/export key
    assert {id(p) for _, p in roles["backbone"]} == {id(p) for p in task.net.backbone.parameters()}
    assert {id(p) for _, p in roles["new"]} == {id(p) for p in task.net.head.parameters()}


def test_weight_decay_rule_and_learning_rates():
    task = make_task()
    owner = by_id(param_groups(task, LR, MULTIPLIER, WEIGHT_DECAY))
    checked = {"bn": 0, "weights": 0}
    for module in task.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for p in (module.weight, module.bias):
                assert owner[id(p)]["weight_decay"] == 0.0 and owner[id(p)]["name"] == "backbone_no_decay"
                checked["bn"] += 1
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            assert owner[id(module.weight)]["weight_decay"] == WEIGHT_DECAY
            checked["weights"] += 1
            if module.bias is not None:
                assert owner[id(module.bias)]["weight_decay"] == 0.0
    assert checked["bn"] == 6 and checked["weights"] == 4  # 3 conv + BN blocks, the head's linear
    head_bias = owner[id(task.net.head.fc.bias)]
    assert head_bias["name"] == "new_no_decay" and head_bias["weight_decay"] == 0.0 and head_bias["lr"] == LR
    proxies = owner[id(task.criterion.proxies)]
    # The proxies are decayed, as the Proxy-Anchor authors' code does (their group sets only its lr).
    assert proxies["name"] == "proxies" and proxies["weight_decay"] == WEIGHT_DECAY
    assert proxies["lr"] == pytest.approx(LR * MULTIPLIER)
    assert all(g["lr"] == LR for g in owner.values() if g["name"] != "proxies")


def test_frozen_parameters_are_left_out():
    task = make_task("omniglot/teacher", "model.freeze_bn=true")
    groups = param_groups(task, LR, MULTIPLIER, WEIGHT_DECAY)
    frozen = [p for p in task.parameters() if not p.requires_grad]
    assert len(frozen) == 6  # every BatchNorm weight and bias of the backbone
    owner = by_id(groups)
    assert not {id(p) for p in frozen} & set(owner)
    assert set(owner) == {id(p) for p in task.parameters() if p.requires_grad}
    assert [g["name"] for g in groups] == ["backbone", "new", "new_no_decay", "proxies"]  # empty group dropped


def test_transfer_task_without_proxies():
    task = make_task("omniglot/rc")
    assert task.criterion is None
    assert [g["name"] for g in param_groups(task, LR, MULTIPLIER, WEIGHT_DECAY)] == [
        "backbone", "backbone_no_decay", "new", "new_no_decay"]


def test_with_loss_and_undeclared_modules():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 3))
    declared = WithLoss(net, ProxyAnchorLoss(5, 3))
    groups = {g["name"]: g for g in param_groups(declared, LR, MULTIPLIER, WEIGHT_DECAY)}
    assert set(groups) == {"new", "new_no_decay", "proxies"}  # no `backbone` in a Sequential
    assert [tuple(p.shape) for p in groups["new"]["params"]] == [(6, 4), (3, 6)]
    assert len(groups["new_no_decay"]["params"]) == 4  # two linear biases, BatchNorm weight and bias
    assert groups["proxies"]["params"] == [declared.criterion.proxies]

    plain = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3))  # no parameter_roles: everything is `new`
    groups = param_groups(plain, LR, MULTIPLIER, WEIGHT_DECAY)
    assert [(g["name"], g["weight_decay"], len(g["params"])) for g in groups] == [
        ("new", WEIGHT_DECAY, 2), ("new_no_decay", 0.0, 2)]


def test_the_name_rule_and_bad_declarations():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Module()
            self.layer.bias = nn.Parameter(torch.zeros(2, 2))  # 2-D but a bias: no decay
            self.scale = nn.Parameter(torch.ones(()))  # 0-D: no decay
            self.weight = nn.Parameter(torch.ones(2, 2))
            self.roles = lambda: {"new": list(self.named_parameters())}

        def parameter_roles(self):
            return self.roles()

    odd = Odd()
    groups = {g["name"]: g for g in param_groups(odd, LR, weight_decay=WEIGHT_DECAY)}
    assert groups["new"]["params"] == [odd.weight]
    assert {id(p) for p in groups["new_no_decay"]["params"]} == {id(odd.layer.bias), id(odd.scale)}

    named = dict(odd.named_parameters())
    odd.roles = lambda: {"new": [("weight", named["weight"])]}
    with pytest.raises(ValueError, match="leaves out"):
        param_groups(odd, LR)
    odd.roles = lambda: {"new": list(named.items()), "backbone": [("weight", named["weight"])]}
    with pytest.raises(ValueError, match="weight is in backbone and new"):
        param_groups(odd, LR)
    odd.roles = lambda: {"head": list(named.items())}
    with pytest.raises(ValueError, match="unknown roles"):
        param_groups(odd, LR)


def test_one_adamw_step_decays_only_the_decay_groups():
    """Zero gradients: Adam's update is 0, so a no_decay parameter stays bit-identical and a decayed one
    shrinks by exactly AdamW's factor 1 - lr x weight decay (its group's lr: x 100 for the proxies)."""
    task = make_task()
    with torch.no_grad():
        task.net.head.fc.bias.normal_()  # initialised to 0: make the check mean something
        for module in task.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.bias.normal_()
    lr, wd = 0.1, 0.05
    groups = param_groups(task, lr, 2.0, wd)
    optimizer = GuardedAdamW(groups, lr=lr, weight_decay=wd)
    before = {id(p): p.detach().clone() for g in groups for p in g["params"]}
    for g in groups:
        for p in g["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    for g in groups:
        for p in g["params"]:
            old = before[id(p)]
            if g["name"].endswith("_no_decay"):
                assert torch.equal(p.detach(), old), g["name"]
            else:
                torch.testing.assert_close(p.detach(), old * (1 - g["lr"] * wd), rtol=1e-6, atol=0)
                assert (p.detach().abs() < old.abs()).all(), g["name"]
    assert {g["name"] for g in groups} == {"backbone", "backbone_no_decay", "new", "new_no_decay", "proxies"}


def _engine_groups(rank: int, world: int, new_layers_only_steps: int) -> dict:
    """build_engine with zero0_fp32 on this rank: the optimizer's groups by parameter names, their lr
    (after the schedule's first factor) and weight decay."""
    from rct_dist.train.engine import build_engine, deepspeed_config

    os.environ.setdefault("RCT_DIST_DATA", "/nonexistent")
    task = make_task()
    config = deepspeed_config("zero0_fp32", micro_batch=4, accumulation=1, world=world, grad_clip=1.0)
    engine = build_engine(task, config, LR, WEIGHT_DECAY, warmup_steps=0, total_steps=10,
                          criterion_lr_multiplier=MULTIPLIER, new_layers_only_steps=new_layers_only_steps)
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return {"groups": [(g["name"], [names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
                       for g in optimizer.param_groups],
            "optimizer": type(optimizer).__name__}


def test_the_engine_optimizer_carries_the_same_groups():
    task = make_task()
    names = {id(p): n for n, p in task.named_parameters()}
    expected = [(g["name"], [names[id(p)] for p in g["params"]], g["lr"], g["weight_decay"])
                for g in param_groups(task, LR, MULTIPLIER, WEIGHT_DECAY)]
    got = run_ranks(_engine_groups, 1, 0)[0]
    assert got["optimizer"] == "GuardedAdamW"
    assert [g[:2] for g in got["groups"]] == [g[:2] for g in expected]
    assert [g[3] for g in got["groups"]] == [g[3] for g in expected]
    for (name, _, lr, _), (_, _, want, _) in zip(got["groups"], expected):
        assert lr == pytest.approx(want), name  # warmup_steps 0: the schedule's first factor is 1

    warm = run_ranks(_engine_groups, 1, 2)[0]  # warm-up of the new layers: every backbone group at lr 0
    lrs = {name: lr for name, _, lr, _ in warm["groups"]}
    assert lrs["backbone"] == lrs["backbone_no_decay"] == 0.0
    assert lrs["new"] == lrs["new_no_decay"] == pytest.approx(LR)
    assert lrs["proxies"] == pytest.approx(LR * MULTIPLIER)
