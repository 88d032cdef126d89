"""What a finished trainer run left behind, read the same way by every test that compares two runs:
its exported parameters, its results.jsonl, its newest complete checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rct_dist.train.checkpoint import complete_checkpoints

RTOL, ATOL = 1e-6, 1e-7  # equal runs on CPU: measured bitwise equal, the margin is for reduction order


def export_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "export" / "model.safetensors"))


def assert_same_weights(a: Path, b: Path, rtol: float = RTOL, atol: float = ATOL) -> None:
    wa, wb = export_weights(a), export_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=rtol, atol=atol, msg=key)


def results(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "results.jsonl").read_text().splitlines()]


def final_r1(run: Path) -> float:
    return [r for r in results(run) if r.get("split") == "test"][-1]["recall"]["1"]


def last_train_step(run: Path) -> int:
    return [r for r in results(run) if r.get("split") == "train"][-1]["step"]


def newest_checkpoint(run: Path) -> int:
    """The step of the run's newest complete checkpoint (0 when there is none)."""
    found = complete_checkpoints(run / "checkpoints") if (run / "checkpoints").exists() else []
    return found[-1][0] if found else 0
