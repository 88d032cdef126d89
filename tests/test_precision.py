"""Every shipped precision trains: each DeepSpeed config that ships and that DeepSpeed accepts on a CPU
(ZeRO 0-3 x fp32, bf16, and the bf16 autocast variants) runs, as shipped, the whole user pipeline on the
digits shards: `train-teacher`, the teacher's export embedded into stored-teacher shards, and `transfer`
from each teacher source (`export`, `model`, `shards`), each to the end with its evaluation. ZeRO 2 and 3
run on 2 gloo ranks, ZeRO 0 and 1 on one.

Each run must have a finite loss that falls (the mean of the last quarter of its logged steps below the
first quarter's by a margin) and a test R@1 well above chance (5 test classes: chance is 0.2).

fp16 cannot run on a CPU (DeepSpeed refuses it): the command-line refusal is one line, and the dtype
plumbing an fp16 engine relies on (teacher input cast, BatchNorm statistics, the feed's cast) is
unit-tested here instead.
"""

from __future__ import annotations

import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from multiprocess import run_ranks
from rct_dist.config import builtin_deepspeed_configs, load_config

ROOT = Path(__file__).resolve().parents[1]
CPU_PRECISIONS = ("fp32", "bf16", "bf16_autocast")
SHIPPED = sorted(builtin_deepspeed_configs())
ON_CPU = [name for name in SHIPPED if name.split("_", 1)[1] in CPU_PRECISIONS]
CHANCE = 0.2  # digits test split: 5 classes of about the same size
CONFIG = """
run: {{name: {name}, out_dir: {out}}}
data: {{root: {data}, eval_split: {eval_split}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0}}
model: {{backbone: {backbone}, embedding_size: {dim}}}
teacher: {teacher}
loss: {{name: {loss}}}
optim: {{lr: {lr}, epochs: 1}}
deepspeed: {{config: {ds}}}
eval: {{batch_size: 128}}
log: {{every_steps: 1}}
"""


def test_every_shipped_config_is_covered():
    """Every shipped DeepSpeed config is either trained below or is fp16 (GPU only); a new precision
    added to the package must come with its own test here."""
    assert set(SHIPPED) - set(ON_CPU) == {name for name in SHIPPED if name.endswith("_fp16")}
    assert {"zero0_fp32", "zero1_bf16", "zero2_bf16", "zero3_bf16_autocast"} <= set(ON_CPU)


def _losses(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("loss/total")]


def _pipeline(rank: int, world: int, tmp: str, data: str, ds: str) -> dict[str, dict]:
    """teacher -> export -> stored shards -> a transfer from each teacher source, all under `ds`."""
    from rct_dist.jobs import run_embed
    from rct_dist.train.loop import train

    tmp_path, data_path = Path(tmp), Path(data)
    runs = tmp_path / "runs"

    def run(name: str, job: str, **values) -> dict:
        fields = dict(name=name, out=runs, data=data_path, eval_split="test", backbone="rct_cnn3_small", dim=16,
                      teacher="{source: model, backbone: rct_cnn4, embedding_size: 32}", loss="rc", lr="1.0e-3",
                      ds=ds)
        path = tmp_path / f"{name}.rank{rank}.yaml"  # each rank its own file: no rank reads another's write
        path.write_text(CONFIG.format(**{**fields, **values}))
        metrics = train(load_config(str(path), [f"job={job}"]))
        return {"r1": metrics["recall"][1], "losses": _losses(runs / name) if rank == 0 else []}

    results = {"teacher": run("teacher", "train-teacher", backbone="rct_cnn4", dim=32, loss="proxy_anchor",
                              teacher="{}", lr="3.0e-3")}
    export = runs / "teacher" / "export"
    cfg = load_config(str(tmp_path / f"teacher.rank{rank}.yaml"), ["job=train-teacher"])
    run_embed(cfg, export, data_path / "train", tmp_path / "embedded", into_shards=tmp_path / "stored" / "train")
    results["export"] = run("from_export", "transfer", teacher=f"{{source: export, export: {export}}}")
    results["model"] = run("from_model", "transfer")
    results["shards"] = run("from_shards", "transfer", data=tmp_path / "stored", eval_split=data_path / "test",
                            teacher="{source: shards}")
    return results


def _falls(losses: list[float]) -> tuple[float, float]:
    quarter = max(1, len(losses) // 4)
    return statistics.fmean(losses[:quarter]), statistics.fmean(losses[-quarter:])


@pytest.mark.parametrize("ds", ON_CPU)
def test_shipped_precision_trains_every_job(ds, digits_shards, tmp_path):
    stage = int(ds[len("zero")])
    world = 2 if stage >= 2 else 1
    results = run_ranks(_pipeline, world, str(tmp_path), str(digits_shards), ds, timeout=600)
    first = results[0]
    for rank_result in results[1:]:  # every rank evaluated the same model
        assert {k: v["r1"] for k, v in rank_result.items()} == {k: v["r1"] for k, v in first.items()}
    report = []
    for job, result in first.items():
        losses = result["losses"]
        start, end = _falls(losses)
        report.append(f"{job}: R@1 {result['r1']:.3f}, loss {start:.4f} -> {end:.4f} over {len(losses)} steps")
        assert len(losses) >= 20 and all(math.isfinite(v) for v in losses), report[-1]
        assert end < start * 0.995, report[-1]  # noise between quarters is about 0.2% of the RC loss here
        assert result["r1"] > CHANCE + 0.4, report[-1]
    print(f"{ds} on {world} rank(s): " + "; ".join(report))


def test_fp16_on_a_cpu_is_one_line(digits_shards, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: fp16 is allowed")
    path = tmp_path / "c.yaml"
    path.write_text(CONFIG.format(name="fp16", out=tmp_path / "runs", data=digits_shards, eval_split="test",
                                  backbone="rct_cnn3_small", dim=16, teacher="{source: model, backbone: rct_cnn4, embedding_size: 32}",
                                  loss="rc", lr="1.0e-3", ds="zero2_fp16"))
    out = subprocess.run([sys.executable, "-m", "rct_dist.cli", "transfer", "--config", str(path)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "zero2_fp16 trains in fp16, which needs a CUDA GPU" in lines[0], out.stderr
    assert not (tmp_path / "runs").exists()


# --- the dtype plumbing of a low-precision engine, without DeepSpeed ---


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_teacher_runs_in_its_own_dtype_whatever_the_input(low):
    from rct_dist.models.embedding import build_model
    from rct_dist.models.teacher import FrozenTeacher

    teacher = FrozenTeacher(build_model("rct_cnn4", 8, pretrained=False, in_chans=3))
    images = torch.randn(6, 3, 16, 16).to(low)
    out = teacher(images)  # the student's dtype in, the teacher's fp32 maths inside
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, teacher(images.float()), rtol=0, atol=0)
    # With a re-normalisation, the affine map is taken in fp32 from the low-precision pixels.
    scale, shift = torch.full((1, 3, 1, 1), 2.0), torch.full((1, 3, 1, 1), -0.5)
    teacher.normalize_inputs(scale, shift)
    torch.testing.assert_close(teacher(images), teacher.model(images.float() * 2.0 - 0.5).float(), rtol=0, atol=0)
    # A bf16 teacher (dtype="bf16": autocast) gives fp32 embeddings too.
    fast = FrozenTeacher(build_model("rct_cnn4", 8, pretrained=False, in_chans=3), dtype="bf16")
    assert fast(images).dtype == torch.float32


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_norm_statistics_follow_low_precision_weights(low):
    from rct_dist.train.engine import norm_statistics_to

    net = _net()
    images = torch.randn(4, 3, 8, 8)
    for p in net.parameters():  # what DeepSpeed's bf16/fp16 modes do: parameters only
        p.data = p.data.to(low)
    with pytest.raises(RuntimeError):
        net(images.to(low))
    norm_statistics_to(net, low)
    bn = net[1]
    assert bn.running_mean.dtype == bn.running_var.dtype == low and bn.num_batches_tracked.dtype == torch.int64
    tracked = bn.num_batches_tracked.item()
    assert net(images.to(low)).dtype == low  # and it trains: statistics updated in the low dtype
    assert bn.num_batches_tracked.item() == tracked + 1 and bn.running_mean.abs().sum() > 0


@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_feed_casts_images_to_the_engine_dtype(low):
    from rct_dist.train.feed import DeviceFeed

    feed = DeviceFeed(torch.device("cpu"), low)
    images, labels, stored, count, views = feed(torch.randn(3, 2, 3, 8, 8), torch.arange(3), torch.randn(3, 5))
    assert images.dtype == low and images.shape == (6, 3, 8, 8) and (count, views) == (3, 6)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2] and stored[0].dtype == torch.float32  # teacher rows stay fp32
