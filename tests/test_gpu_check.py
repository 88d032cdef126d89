"""`bench/gpu_check.py --smoke` on the CPU: the script itself runs end to end and writes its two files."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_summary_leaves_out_the_start_up_window():
    summary = _module().window_summary({"throughput/images_per_s": [(10, 1.0), (20, 100.0), (30, 120.0),
                                                                    (40, 110.0)]})
    assert summary["windows"] == 4 and summary["images_per_s"] == 110.0


def test_smoke_run_writes_summary_and_report(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "OUT": str(out), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["smoke"] and summary["errors"] == {} and summary["missing"] == []
    assert summary["environment"]["torch"] and "deepspeed" in summary["environment"]
    rows = summary["loss"]["rows"]
    assert {r["method"] for r in rows} >= {"naive", "core", "tiled"}
    assert all(r["seconds"] > 0 for r in rows)
    assert set(summary["trainer"]) == set(summary["plain"]) == {"fp32"}
    trainer, plain = summary["trainer"]["fp32"], summary["plain"]["fp32"]
    assert trainer["images_per_s"] > 0 and trainer["views_per_s"] > trainer["images_per_s"]
    assert plain["images_per_s"] > 0 and 0 < plain["loss_share"]["seconds"]
    report = (out / "report.md").read_text()
    assert "| naive | 256 |" in report and "| fp32 |" in report
    assert (out / "logs" / "deepspeed_fp32.log").is_file()
