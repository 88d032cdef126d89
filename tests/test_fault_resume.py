"""Faults, for real: processes killed with SIGKILL at random moments, one of two ranks killed, a kill in
the middle of a checkpoint write, a resume on another number of ranks. Each killed run is resumed with
`run.resume=auto` until it finishes, and must end with the uninterrupted run's parameters.

Transfer runs on the digits shards (2 epochs of 45 P x K steps on one process, 22 on two), a step
checkpoint every 5 steps. The uninterrupted references are run once per module."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_outputs import assert_same_weights as _assert_same_weights, final_r1 as _final_r1
from rct_dist.train.checkpoint import MARKER, complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
run: {{name: {name}, out_dir: {out}, seed: 5}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: {workers}}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
optim: {{lr: 1.0e-3, epochs: 2}}
deepspeed: {{config: {ds}}}
eval: {{batch_size: 256}}
log: {{every_steps: 5, tensorboard: false, retrieval_images: 0, projector_samples: 0}}
checkpoint: {{every_steps: 5, keep: 2}}
"""


def _config(tmp: Path, name: str, data: Path, workers: int = 0, ds: str = "zero0_fp32") -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, out=tmp / "runs", data=data, workers=workers, ds=ds))
    return path


def _command(config: Path, procs: int, *overrides: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    return [*launcher, "-m", "rct_dist.cli", "transfer", "--config", str(config), "run.resume=auto", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(config: Path, procs: int = 1, *overrides: str) -> str:
    out = subprocess.run(_command(config, procs, *overrides), capture_output=True, text=True, env=_env(),
                         timeout=600, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def _children(pid: int) -> list[int]:
    """Direct child processes, from /proc (torchrun's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return sorted(found)


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        children = _children(queue.pop())
        found += children
        queue += children
    return found


def _kill_after_progress(proc: subprocess.Popen, checkpoints: Path, rng: random.Random, *, one_rank: bool = False,
                         timeout: float = 300) -> bool:
    """Wait for a new complete checkpoint, then SIGKILL at a random moment soon after: the whole job, or
    (one_rank) one of torchrun's two workers. False when the job finished first."""
    def newest() -> int:
        found = complete_checkpoints(checkpoints) if checkpoints.exists() else []
        return found[-1][0] if found else 0

    before, start = newest(), time.time()
    while proc.poll() is None and time.time() - start < timeout:
        if newest() > before:
            time.sleep(rng.uniform(0.0, 0.8))
            if proc.poll() is not None:
                return False
            if one_rank:
                workers = _children(proc.pid)
                assert workers, "torchrun has no worker processes"
                os.kill(workers[-1], signal.SIGKILL)
            else:  # the launcher and every process under it (torchrun's workers have their own groups)
                for pid in [proc.pid, *_descendants(proc.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            proc.wait(timeout=120)
            return True
        time.sleep(0.05)
    proc.wait(timeout=timeout)
    return False


@pytest.fixture(scope="module")
def references(digits_shards, tmp_path_factory) -> dict[int, Path]:
    """The uninterrupted runs: one process with 0 workers, two processes with 2 workers."""
    tmp = tmp_path_factory.mktemp("reference")
    _run(_config(tmp, "one", digits_shards, workers=0), 1)
    _run(_config(tmp, "two", digits_shards, workers=2), 2)
    return {1: tmp / "runs" / "one", 2: tmp / "runs" / "two"}


def test_kill_at_random_moments_and_resume_equals_the_uninterrupted_run(references, digits_shards, tmp_path):
    config = _config(tmp_path, "killed", digits_shards, workers=0)
    run, rng, kills = tmp_path / "runs" / "killed", random.Random(11), 0
    for _ in range(3):
        proc = subprocess.Popen(_command(config, 1), env=_env(), cwd=ROOT, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kills += _kill_after_progress(proc, run / "checkpoints", rng)
    log = _run(config, 1)
    assert kills >= 2 and "resumed from" in log
    _assert_same_weights(run, references[1])
    assert _final_r1(run) == _final_r1(references[1])


def test_kill_one_of_two_ranks_then_resume_with_another_worker_count(references, digits_shards, tmp_path):
    config = _config(tmp_path, "rank", digits_shards, workers=2)
    run = tmp_path / "runs" / "rank"
    proc = subprocess.Popen(_command(config, 2), env=_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_after_progress(proc, run / "checkpoints", random.Random(3), one_rank=True)
    assert proc.returncode != 0  # torchrun saw its worker die and stopped the other
    log = _run(config, 2, "data.workers=0")
    assert "resumed from" in log
    _assert_same_weights(run, references[2])


def _test_metrics(run: Path) -> dict:
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    final = [r for r in lines if r.get("split") == "test"][-1]
    return {"epoch": final["epoch"], "recall": final["recall"], "map_at_r": final["map_at_r"]}


@pytest.mark.parametrize("tag_step", [40, 44])
def test_two_rank_resume_ends_with_the_uninterrupted_runs_test_metrics(references, digits_shards, tmp_path,
                                                                         tag_step):
    """Two ranks resumed from a mid-epoch checkpoint (step 40 of 44) and from the last one (a finished run,
    evaluated again): the run's own final test metrics, each rank embedding its share of the test split,
    equal the uninterrupted run's, as its exported parameters do. (Each rank's BatchNorm updates its
    running statistics from its own batches, and a checkpoint holds rank 0's: the evaluation must use the
    statistics the checkpoint and the export hold on every rank.)"""
    import shutil

    config = _config(tmp_path, "metrics", digits_shards, workers=2)
    whole, run = references[2], tmp_path / "runs" / "metrics"
    source = dict(complete_checkpoints(whole / "checkpoints"))[tag_step]
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, run / "checkpoints" / source.name)
    shutil.copy(whole / "config.yaml", run / "config.yaml")
    log = _run(config, 2, "data.workers=0")
    assert f"resumed from {run / 'checkpoints' / source.name}" in log
    _assert_same_weights(run, whole)
    assert _test_metrics(run) == _test_metrics(whole)


KILL_DURING_SAVE = """
import io, os, signal, sys
import torch
real_save, calls = torch.save, [0]
def save(obj, f, *args, **kwargs):
    calls[0] += 1
    if calls[0] == int(os.environ["KILL_AT_SAVE"]) and isinstance(f, (str, os.PathLike)):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        with open(f, "wb") as half:  # half the file, on disk, then the kill
            half.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            half.flush()
            os.fsync(half.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
from rct_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_in_the_middle_of_a_checkpoint_write(references, digits_shards, tmp_path):
    config = _config(tmp_path, "torn", digits_shards, workers=2)
    run = tmp_path / "runs" / "torn"
    command = [sys.executable, "-c", KILL_DURING_SAVE, *_command(config, 1)[3:]]
    out = subprocess.run(command, env={**_env(), "KILL_AT_SAVE": "3"}, cwd=ROOT, capture_output=True, timeout=600)
    assert out.returncode == -signal.SIGKILL
    tags = sorted(p for p in (run / "checkpoints").glob("step*") if p.is_dir())
    assert [p.name for p in tags if not (p / MARKER).exists()] == [tags[-1].name]  # the torn one, unmarked
    torn = tags[-1]
    log = _run(config, 1)
    assert f"resumed from {tags[-2]}" in log and not torn.exists()  # passed over, then cleaned up
    _assert_same_weights(run, references[1])


def test_resume_zero2_on_another_number_of_ranks(digits_shards, tmp_path):
    """Two ranks of ZeRO-2 (optimizer state partitioned per rank) killed; resumed on one rank through a
    universal checkpoint; the same global sample sequence continues and the run finishes."""
    config = _config(tmp_path, "elastic", digits_shards, ds="zero2_fp32")
    run = tmp_path / "runs" / "elastic"
    proc = subprocess.Popen(_command(config, 2), env=_env(), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_after_progress(proc, run / "checkpoints", random.Random(5))
    _, last = complete_checkpoints(run / "checkpoints")[-1]
    saved = json.loads((last / MARKER).read_text())
    import shutil

    again = tmp_path / "runs" / "elastic-again"  # the same checkpoint, for a second start on one rank
    (again / "checkpoints").mkdir(parents=True)
    shutil.copytree(last, again / "checkpoints" / last.name)
    shutil.copy(run / "config.yaml", again / "config.yaml")
    log = _run(config, 1)
    assert "resuming a run of 2 ranks on 1" in log and (run / "checkpoints" / "universal" / last.name).is_dir()
    # the epoch's sequence continues at the sample where the two ranks stopped
    resumed = re_search(r"resumed from \S+ at epoch (\d+), sample (\d+)", log)
    assert int(resumed[0]) in (saved["epoch"] + 1, saved["epoch"] + 2) and int(resumed[1]) % 40 == 0
    assert 0.5 < _final_r1(run) <= 1.0
    # What a resume on another world size equals: a run started on that world size from the same checkpoint
    # (not the uninterrupted 2-rank run, whose steps average other global batches from there on).
    _run(config, 1, "run.name=elastic-again")
    _assert_same_weights(run, again)
    assert _final_r1(again) == _final_r1(run)


def re_search(pattern: str, text: str) -> tuple[str, ...]:
    import re

    match = re.search(pattern, text)
    assert match, pattern
    return match.groups()


def test_damaged_shards_are_counted_in_results_and_tensorboard(digits_shards, tmp_path):
    """A truncated shard and an image that is not an image in the training split: the run finishes, and
    the skipped data is reported per kind in results.jsonl and as TensorBoard scalars."""
    import shutil

    import webdataset as wds
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rct_dist.config import load_config
    from rct_dist.train.loop import train

    data = tmp_path / "data"
    shutil.copytree(digits_shards, data)
    shard = data / "train" / "train-000002.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size * 2 // 3])  # truncated
    other = data / "train" / "train-000004.tar"
    members = list(wds.WebDataset(str(other), shardshuffle=False))
    with wds.TarWriter(str(other)) as sink:
        for i, m in enumerate(members):
            sink.write({**m, "png": b"<html>not an image</html>"} if i == 7 else m)
    config = _config(tmp_path, "damaged", data)
    cfg = load_config(str(config), ["optim.epochs=1", "log.tensorboard=true", "checkpoint.every_steps=0"])
    result = train(cfg)
    run = tmp_path / "runs" / "damaged"
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    skipped = [r for r in lines if r["split"] == "train"][0]["skipped"]
    assert skipped["damaged_shards"] == 1 and 0 < skipped["lost_samples"] < 100
    assert skipped["bad_images"] == 1 and result["train_skipped"] == skipped
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.value for e in events.Scalars("data/bad_images")] == [1.0]
    assert [e.value for e in events.Scalars("data/lost_samples")] == [float(skipped["lost_samples"])]


def _nan_loss_on(monkeypatch, calls: set[int]) -> list[int]:
    """The RC loss returns NaN on the given (1-based) calls; returns the running call count."""
    from rct_dist.losses import RelaxedContrastiveLoss

    count = [0]
    forward = RelaxedContrastiveLoss.forward

    def patched(self, *args, **kwargs):
        count[0] += 1
        out = forward(self, *args, **kwargs)
        if count[0] not in calls:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")

    monkeypatch.setattr(RelaxedContrastiveLoss, "forward", patched)
    return count


def test_nonfinite_steps_are_skipped_counted_and_stop_the_job(digits_shards, tmp_path, monkeypatch):
    from rct_dist.config import load_config
    from rct_dist.train.checkpoint import usable_checkpoints
    from rct_dist.train.loop import train
    from rct_dist.train.nonfinite import NonFiniteStepError

    config = _config(tmp_path, "nan", digits_shards)
    _nan_loss_on(monkeypatch, {3, 4})
    result = train(load_config(str(config), ["optim.epochs=1", "checkpoint.every_steps=0"]))
    run = tmp_path / "runs" / "nan"
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in lines if r["split"] == "train"] == [2]
    assert 0.3 < result["recall"][1] <= 1.0  # the run went on after the two skipped steps

    _nan_loss_on(monkeypatch, set(range(7, 1000)))  # every step from the 7th on
    with pytest.raises(NonFiniteStepError, match="3 optimizer steps in a row"):
        train(load_config(str(config), ["run.name=nan_stop", "optim.epochs=1", "optim.max_nonfinite_steps=2",
                                        "checkpoint.every_steps=5"]))
    kept = usable_checkpoints(tmp_path / "runs" / "nan_stop" / "checkpoints")
    assert [step for step, _ in kept] == [5]  # the last good checkpoint, intact; nothing saved after the stop


def test_cli_stops_on_nonfinite_steps_with_one_line(digits_shards, tmp_path, monkeypatch, capsys):
    from rct_dist import cli

    config = _config(tmp_path, "nan_cli", digits_shards)
    _nan_loss_on(monkeypatch, set(range(1, 1000)))
    with pytest.raises(SystemExit) as stop:
        cli.main(["transfer", "--config", str(config), "optim.epochs=1", "optim.max_nonfinite_steps=0"])
    err = [line.split("\r")[-1] for line in capsys.readouterr().err.strip().splitlines()]  # after the bar
    assert stop.value.code == 1 and "Traceback" not in "\n".join(err)
    assert err[-1].startswith("rct-dist transfer: ") and "in a row" in err[-1] and "optim.lr" in err[-1]


def test_resume_with_a_changed_data_plan_is_refused(digits_shards, tmp_path):
    from rct_dist.config import ConfigError, load_config
    from rct_dist.train.loop import train

    config = _config(tmp_path, "plan", digits_shards)
    train(load_config(str(config), ["optim.epochs=1"]))
    changed = r"seed: 5 then, 6 now; batch_size: 20 then, 10 now; pk: \[5, 4\] then, \[5, 2\] now"
    with pytest.raises(ConfigError, match=rf"the data plan changed \({changed}\)"):
        train(load_config(str(config), ["run.resume=auto", "optim.epochs=2", "run.seed=6", "data.batch_size=10",
                                        "data.pk=[5, 2]"]))


def test_steps_are_optimizer_steps_with_gradient_accumulation(digits_shards, tmp_path):
    """With 2 micro-batches per optimizer step, checkpoint tags, checkpoint.every_steps, log.every_steps and
    results.jsonl count optimizer steps: 44 micro-batches make 22 steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rct_dist.config import load_config
    from rct_dist.train.loop import train

    config = _config(tmp_path, "accumulate", digits_shards)
    train(load_config(str(config), ["optim.epochs=1", "deepspeed.gradient_accumulation_steps=2",
                                    "log.tensorboard=true", "checkpoint.every_steps=5", "checkpoint.keep=10"]))
    run = tmp_path / "runs" / "accumulate"
    assert [step for step, _ in complete_checkpoints(run / "checkpoints")] == [5, 10, 15, 20, 22]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/total")] == [5, 10, 15, 20]
    lines = [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]
    assert {r["step"] for r in lines} == {22}


def test_checkpoint_with_other_parameter_groups_is_refused_clearly(digits_shards, tmp_path, monkeypatch):
    """A checkpoint of an earlier version (every parameter in one decayed group) cannot resume: the error says
    why and what still works."""
    from rct_dist.config import load_config
    from rct_dist.train import engine as engine_module
    from rct_dist.train.loop import train

    config = _config(tmp_path, "groups", digits_shards)
    current = engine_module.param_groups
    monkeypatch.setattr(engine_module, "param_groups", lambda module, lr, *a, **k: [
        {"name": "new", "params": [p for p in module.parameters() if p.requires_grad], "lr": lr}])
    train(load_config(str(config), ["optim.epochs=1"]))
    monkeypatch.setattr(engine_module, "param_groups", current)
    with pytest.raises(RuntimeError, match="other parameter groups than this version builds.*cannot resume"):
        train(load_config(str(config), ["run.resume=auto", "optim.epochs=2"]))


def test_resume_with_accumulation_from_every_checkpoint_equals_the_uninterrupted_run(digits_shards, tmp_path):
    """Accumulation 2 with 21 micro-batches an epoch: an optimizer step never spans two epochs (the odd
    micro-batch is left out), so every checkpoint sits at a step boundary, and a resume from the epoch-end
    checkpoint or from a mid-epoch one ends with the uninterrupted run's parameters."""
    import shutil

    from rct_dist.config import load_config
    from rct_dist.train.loop import train

    overrides = ["optim.epochs=2", "deepspeed.gradient_accumulation_steps=2", "data.samples_per_epoch=420",
                 "checkpoint.every_steps=4", "checkpoint.keep=20"]
    config = _config(tmp_path, "whole", digits_shards)
    train(load_config(str(config), overrides))
    whole = tmp_path / "runs" / "whole"
    steps = [step for step, _ in complete_checkpoints(whole / "checkpoints")]
    assert steps == [4, 8, 10, 12, 16, 20]  # 10 whole steps an epoch; the epoch ends are 10 and 20
    for tag_step in (10, 12):  # the epoch-end checkpoint, a mid-epoch one
        name = f"from{tag_step}"
        resumed = tmp_path / "runs" / name
        (resumed / "checkpoints").mkdir(parents=True)
        source = dict((step, path) for step, path in complete_checkpoints(whole / "checkpoints"))[tag_step]
        shutil.copytree(source, resumed / "checkpoints" / source.name)
        shutil.copy(whole / "config.yaml", resumed / "config.yaml")
        train(load_config(str(config), [*overrides, f"run.name={name}", "run.resume=auto"]))
        _assert_same_weights(whole, resumed)
