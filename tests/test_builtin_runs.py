"""Every built-in run config starts as shipped: each `--config NAME` the package lists trains at least one
optimizer step and evaluates, with its own precision, ZeRO stage, loss, backbone and embedding size.

What is overridden, and why (nothing else is):
- data: the location (`RCT_DIST_DATA` points at a folder whose `<dataset>-shards` are the digits shards)
  and the size: 32 px images, P x K = 5 x 2 (the digits have 5 training classes) or batches of 10, two
  batches an epoch, one epoch, no loader workers (CI has 2 cores); the loss logged every step. The paper's backbones (ResNet-18/50)
  are kept: at 32 px they run on a CPU in seconds, so no stand-in backbone is needed.
- `model.pretrained=false`: ImageNet weights come from the model hub, which a test machine cannot
  reach; the architecture is the same.
Teachers run first, so each transfer config reads the export its own teacher config wrote
(`runs/<dataset>-teacher/export`, relative to the working folder, as shipped).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from multiprocess import run_ranks
from rct_dist.config import builtin_configs, load_config

FAMILIES = sorted({name.split("/")[0] for name in builtin_configs()})
SIZE = ["data.image_size=32", "data.batch_size=10", "data.samples_per_epoch=20", "data.workers=0",
        "optim.epochs=1", "model.pretrained=false", "log.every_steps=1"]
KEPT = ("job", "deepspeed.config", "loss.name", "model.backbone", "model.embedding_size", "model.freeze_bn",
        "teacher.source", "optim.lr", "optim.schedule")


def _get(cfg, dotted: str):
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _overrides(name: str) -> list[str]:
    shipped = load_config(name)
    return SIZE + (["data.pk=[5,2]"] if shipped.data.pk is not None else [])


def _run_family(rank: int, world: int, work: str, names: list[str]) -> dict[str, dict]:
    from rct_dist.train.loop import train

    os.chdir(work)  # the configs' relative paths (runs/, the teachers' exports) resolve here, as for a user
    results = {}
    for name in names:
        cfg = load_config(name, _overrides(name))
        metrics = train(cfg)
        run_dir = Path(cfg.run.out_dir) / cfg.run.name
        results[name] = {"kept": {key: _get(cfg, key) for key in KEPT}, "r1": metrics["recall"][1],
                         "steps": _steps(run_dir), "losses": _losses(run_dir)}
    return results


def _steps(run_dir: Path) -> tuple[int, int]:
    """Optimizer steps taken, and how many of them were skipped as non-finite (results.jsonl)."""
    import json

    lines = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["split"] == "train"]
    return max(line["step"] for line in lines), max(line["nonfinite_steps"] for line in train_lines)


def _losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("loss/total")] if "loss/total" in events.Tags()["scalars"] else []


@pytest.fixture()
def data_home(digits_shards, tmp_path, monkeypatch) -> Path:
    """RCT_DIST_DATA with every dataset's shard folder made of the digits splits (train, test, and val for
    ImageNet's eval split)."""
    home = tmp_path / "data"
    for family in FAMILIES:
        folder = home / f"{family}-shards"
        folder.mkdir(parents=True)
        (folder / "train").symlink_to(digits_shards / "train")
        (folder / "test").symlink_to(digits_shards / "test")
        (folder / "val").symlink_to(digits_shards / "test")
    monkeypatch.setenv("RCT_DIST_DATA", str(home))
    return home


def test_every_listed_config_is_in_a_family():
    assert FAMILIES == ["cars", "cub", "imagenet", "omniglot", "sop"]
    assert all(name.count("/") == 1 for name in builtin_configs())


@pytest.mark.parametrize("family", FAMILIES)
def test_builtin_configs_train_as_shipped(family, data_home, tmp_path):
    names = sorted((n for n in builtin_configs() if n.startswith(family + "/")),
                   key=lambda n: (load_config(n).job != "train-teacher", n))  # teachers first: their exports
    work = tmp_path / "work"
    work.mkdir()
    results = run_ranks(_run_family, 1, str(work), names, timeout=900)[0]
    assert sorted(results) == sorted(names)
    for name in names:
        shipped, result = load_config(name), results[name]
        assert result["kept"] == {key: _get(shipped, key) for key in KEPT}, name  # run as shipped
        steps, skipped = result["steps"]
        assert steps >= 1 and skipped == 0, (name, steps, skipped)  # real steps, none skipped as non-finite
        assert result["losses"] and all(math.isfinite(v) for v in result["losses"]), (name, result["losses"])
        # Random-initialised backbones after two steps retrieve at about chance: only a valid evaluation is asked.
        assert 0 < result["r1"] <= 1, (name, result["r1"])
        print(f"{name}: {shipped.deepspeed.config}, {shipped.model.backbone} {shipped.model.embedding_size}-d, "
              f"{shipped.loss.name}: {steps} steps, loss {result['losses'][-1]:.4f}, R@1 {result['r1']:.3f}")
