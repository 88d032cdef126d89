"""The README's main job: `rct-dist demo`, single process and on 2 gloo processes under torchrun."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from rct_dist.demo import run_demo

ROOT = Path(__file__).resolve().parents[1]
MODELS = 8  # pixels, teacher, random student, labels student, RC, RKD, PKT, DarkRank


def test_demo_trains_and_evaluates_every_model():
    rows = run_demo(steps=60, batch=60, say=lambda _: None)
    assert len(rows) == MODELS
    recall = {name: r for name, r, _ in rows}
    assert all(0.0 < r[1] <= r[8] <= 1.0 for r in recall.values())
    # Transfer really trained the student: a no-op would leave the untrained student's retrieval.
    assert recall["student <- teacher, RC"] != recall["student 64-32-16, random init"]


def test_demo_runs_on_two_processes_with_torchrun():
    env = {**os.environ, "NPROC": "2", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        ["bash", str(ROOT / "launch" / "torchrun.sh"), "demo", "--steps", "20", "--batch", "40"],
        capture_output=True, text=True, env=env, timeout=300, check=False, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    table = out.stdout[out.stdout.index("model "):]
    assert len(table.strip().splitlines()) == MODELS + 2  # header, rule, one line per model
