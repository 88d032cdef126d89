"""Model selection (last / validation / test), early stopping, optim.epochs 0, the warm-up of the new
layers, the step-decay schedule and the named parameter groups: unit checks, then real runs on digits
with a validation split of training classes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rct_dist.config import ConfigError, load_config
from rct_dist.data import shards
from rct_dist.models import load_exported
from rct_dist.train.engine import param_groups, warmup_step_decay
from rct_dist.train.loop import build_task, train
from rct_dist.train.selection import Selection, resolve_select


def m(r1: float) -> dict:
    return {"recall": {1: r1, 2: min(1.0, r1 + 0.1)}, "map_at_r": r1 / 2}


def test_selection_rules():
    last = Selection("last")
    assert [last.consider(e, m(r), None) for e, r in [(1, 0.5), (2, 0.3)]] == [True, True]
    assert last.best == {"epoch": 2, "test": {"recall": {1: 0.3, 2: 0.4}, "map_at_r": 0.15}, "val": None}

    val = Selection("val", patience=2)
    kept = [val.consider(e, m(t), m(v)) for e, t, v in [(1, 0.9, 0.4), (2, 0.2, 0.6), (3, 0.99, 0.5), (4, 0.1, 0.55)]]
    assert kept == [True, True, False, False]  # the test R@1 (0.99 at epoch 3) never decides
    assert val.best["epoch"] == 2 and val.best["test"]["recall"][1] == 0.2 and val.score == 0.6
    assert val.stale == 2 and val.should_stop()

    test = Selection("test")
    assert [test.consider(e, m(r), None) for e, r in [(1, 0.5), (2, 0.7), (3, 0.6)]] == [True, True, False]
    assert test.best["epoch"] == 2
    with pytest.raises(ValueError, match="validation"):
        Selection("val").consider(1, m(0.5), None)


def test_selection_restore_and_auto():
    saved = Selection("val", 3)
    saved.consider(1, m(0.5), m(0.4))
    state = json.loads(json.dumps(saved.state()))  # what survives a checkpoint (plain data)
    again = Selection.restore(saved.state(), "val", 5)
    assert again.score == 0.4 and again.patience == 5 and again.best == saved.best
    other = Selection.restore(state, "last", 0)  # another rule: nothing kept under the old one counts
    assert other.score == -math.inf and other.best == {} and other.best_val_r1 == 0.4
    assert resolve_select("auto", "val") == "val" and resolve_select("auto", None) == "last"
    assert resolve_select("test", "val") == "test"


def test_step_decay_schedule():
    factor = warmup_step_decay(warmup_steps=2, steps_per_epoch=5, decay_epochs=2, gamma=0.5)
    assert [factor(s) for s in (0, 1)] == [0.5, 1.0]
    assert [factor(s) for s in (2, 9, 10, 19, 20, 30)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.125]


def test_parameter_groups_are_named(monkeypatch):
    monkeypatch.setenv("RCT_DIST_DATA", "/nonexistent")
    cfg = load_config("omniglot/teacher", ["model.backbone=rct_cnn3_small", "model.embedding_size=8"])
    task = build_task(cfg, num_classes=7)
    groups = {g["name"]: g for g in param_groups(task, lr=1e-3, criterion_lr_multiplier=100)}
    assert set(groups) == {"backbone", "backbone_no_decay", "new", "new_no_decay", "proxies"}

    def ids(*names):
        return {id(p) for name in names for p in groups[name]["params"]}
    assert ids("backbone", "backbone_no_decay") == {id(p) for p in task.net.backbone.parameters()}
    assert ids("new", "new_no_decay") == {id(p) for p in task.net.head.parameters()}
    assert groups["proxies"]["lr"] == pytest.approx(0.1) and groups["new"]["lr"] == 1e-3


@pytest.mark.parametrize("overrides, message", [
    (["eval.select=val"], "needs data.val_split"),
    (["optim.early_stop_patience=2"], "needs data.val_split"),
    (["data.val_split=test"], "must differ"),
    (["optim.decay_gamma=2"], "decay_gamma"),
    (["optim.epochs=-1"], "optim.epochs must be >= 0"),
    (["optim.schedule=linear"], "optim.schedule must be one of"),
])
def test_bad_selection_config(overrides, message, monkeypatch):
    monkeypatch.setenv("RCT_DIST_DATA", "/nonexistent")
    with pytest.raises(ConfigError, match=message):
        load_config("omniglot/rc", overrides)


@pytest.fixture(scope="module")
def digits_val(tmp_path_factory) -> Path:
    """digits: train 4 classes, val 1 class (of the 5 training classes), test 5 classes."""
    out = tmp_path_factory.mktemp("digits-val")
    shards.make_shards("digits", out, shard_size=100, workers=1, val_classes=1)
    return out


def run_cfg(root: Path, out: Path, name: str, *overrides: str):
    return load_config(None, [
        "job=train-teacher", "loss.name=proxy_anchor", f"run.name={name}", f"run.out_dir={out}",
        f"data.root={root}", "data.val_split=val", "data.image_size=16", "data.views=1", "data.pk=[4,5]", "data.batch_size=20",
        "data.workers=0", "model.backbone=rct_cnn3_small", "model.embedding_size=16",
        "optim.lr=1e-3", "deepspeed.config=zero2_fp32", "eval.batch_size=256", "log.tensorboard=false",
        "log.retrieval_images=0", *overrides,
    ])


def results(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def test_selection_on_validation_with_early_stopping(digits_val, tmp_path):
    cfg = run_cfg(digits_val, tmp_path, "val", "optim.epochs=6", "optim.early_stop_patience=1", "optim.lr=3e-2")
    got = train(cfg)
    lines = results(tmp_path / "val")
    val = [line for line in lines if line["split"] == "val"]
    test = [line for line in lines if line["split"] == "test"]
    assert got["select"] == "val" and len(val) == len(test) == got["epochs_run"]
    r1 = [line["recall"]["1"] for line in val]
    best = max(range(len(r1)), key=lambda i: (r1[i], -i))  # the first epoch with the best validation R@1
    assert got["selected_epoch"] == best + 1
    assert got["recall"][1] == pytest.approx(test[best]["recall"]["1"])  # test metrics of the kept model
    assert got["val"]["recall"][1] == pytest.approx(r1[best])
    assert got["final"]["recall"][1] == pytest.approx(test[-1]["recall"]["1"])
    if got["stopped_early"]:  # patience 1: the run stops at the first evaluation without improvement
        assert got["epochs_run"] < 6 and r1[-1] <= max(r1[:-1])
    else:
        assert got["epochs_run"] == 6 and all(b > a for a, b in zip(r1, r1[1:]))


def test_epochs_zero_evaluates_the_initial_model(digits_val, tmp_path):
    got = train(run_cfg(digits_val, tmp_path, "raw", "optim.epochs=0"))
    assert got["epochs_run"] == 0 and got["selected_epoch"] == 0 and 0 < got["recall"][1] <= 1
    exported = load_exported(tmp_path / "raw" / "export")
    assert exported.config["backbone"] == "rct_cnn3_small"
    assert not (tmp_path / "raw" / "checkpoints").exists() or not any((tmp_path / "raw" / "checkpoints").iterdir())


def test_warmup_trains_only_the_new_layers_and_freeze_bn_keeps_statistics(digits_val, tmp_path):
    cfg = run_cfg(digits_val, tmp_path, "warm", "optim.epochs=1", "optim.warmup_epochs_new_layers=1",
                  "model.freeze_bn=true", "eval.select=last")
    torch.manual_seed(cfg.run.seed)
    initial = build_task(cfg, 4).net.state_dict()  # the same seed builds the same initial student
    train(cfg)
    after = load_exported(tmp_path / "warm" / "export").state_dict()
    backbone = [k for k in initial if k.startswith("backbone.")]
    head = [k for k in initial if k.startswith("head.")]
    assert backbone and head
    for key in backbone:  # weights, BatchNorm running statistics and all
        torch.testing.assert_close(after[key], initial[key], rtol=0, atol=0, msg=key)
    assert any(not torch.equal(after[k], initial[k]) for k in head)
