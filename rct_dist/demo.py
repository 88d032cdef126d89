"""`rct-dist demo`: the paper's comparison in miniature, offline, on real data, through the real trainer.

A 4-block CNN teacher learns Omniglot's training alphabets with Proxy-Anchor; a 3-block student
(16/32/32 channels, 64-d) then learns from labels, and from the teacher alone with RC and with RKD.
All are evaluated on held-out classes, and one table of Recall@K and times is printed.

Data: Omniglot from `--data` or `$RCT_DIST_DATA/omniglot` (the official zips or their npz repack),
else downloaded from the official repository when the network allows, else scikit-learn's digits,
which ship with scikit-learn but cannot show transfer (an untrained CNN already retrieves held-out
digits well).
"""

from __future__ import annotations

import argparse
import os
import time
import urllib.request
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from rct_dist.atomic import atomic_write
from rct_dist.config import load_config
from rct_dist.data import shards
from rct_dist.distributed import world_rank
from rct_dist.train.engine import init_distributed
from rct_dist.train.loop import train

OMNIGLOT_FILES = ("images_background.zip", "images_evaluation.zip")
OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}"
KS = (1, 2, 4, 8)


def has_omniglot(folder: Path) -> bool:
    return all((folder / f).is_file() for f in OMNIGLOT_FILES) or all(
        (folder / f.replace(".zip", ".npz")).is_file() for f in OMNIGLOT_FILES
    )


def find_omniglot(data: str | None) -> Path | None:
    """The Omniglot folder under --data or $RCT_DIST_DATA (the folder itself or its `omniglot/`)."""
    for base in filter(None, (data, os.environ.get("RCT_DIST_DATA"))):
        for folder in (Path(base), Path(base) / "omniglot"):
            if has_omniglot(folder):
                return folder
    return None


def download_omniglot(folder: Path, say: Callable[[str], None]) -> Path | None:
    """The official zips into `folder`, or None (with the reason said) when they cannot be fetched."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        for name in OMNIGLOT_FILES:
            target = folder / name
            if not target.exists():
                with urllib.request.urlopen(OMNIGLOT_URL.format(name), timeout=30) as response:
                    atomic_write(target, lambda stream: stream.write(response.read()))
        return folder
    except OSError as error:
        say(f"could not download Omniglot ({error})")
        return None


# (name, job, overrides): the runs of the comparison, in order; students share one architecture.
STUDENT = ["model.backbone=rct_cnn3_small", "model.embedding_size=64"]
RUNS = (
    ("teacher 4-block CNN, labels", "train-teacher", ["model.backbone=rct_cnn4", "model.embedding_size=128"]),
    ("student, labels", "train-teacher", STUDENT),
    ("student <- teacher, RC", "transfer", [*STUDENT, "loss.name=rc"]),
    ("student <- teacher, RKD", "transfer", [*STUDENT, "loss.name=rkd"]),
)


def run_demo(data: str | None = None, out: str = "runs/demo", epochs: int | None = None,
             teacher_epochs: int | None = None, classes: int = 100, dataset: str = "auto",
             say: Callable[[str], None] = print) -> list[tuple[str, dict, float]]:
    """Train and evaluate every run; returns rows (name, {k: recall}, seconds) and says a table.

    `dataset`: "auto" (Omniglot if found or downloadable, else digits), "omniglot" or "digits".
    Defaults fit 10 minutes on 2 CPU cores: on Omniglot 100 training and 100 held-out classes, a teacher
    of 12 epochs and students of 10; on digits 3 epochs, where more would show nothing more.
    """
    out_dir = Path(out)
    omniglot = None
    if dataset != "digits":
        omniglot = find_omniglot(data) or download_omniglot(out_dir / "omniglot", say)
        if omniglot is None and dataset == "omniglot":
            raise FileNotFoundError("Omniglot not found under --data or $RCT_DIST_DATA and not downloadable")
    epochs = epochs or (10 if omniglot is not None else 3)
    teacher_epochs = teacher_epochs or (12 if omniglot is not None else epochs)
    if omniglot is not None:
        source, argv = "omniglot", ["--source", "omniglot", "--root", str(omniglot), "--limit-classes", str(classes)]
        p = min(45, classes)  # the paper's 45 classes x 2 images, fewer on a tiny subset
        # Characters: no flips (a mirrored character is another one), no crops small enough to lose strokes.
        data_overrides = [f"data.pk=[{p},2]", f"data.batch_size={2 * p}", "data.image_size=28",
                          "data.crop_scale=[0.5,1.0]", "data.hflip=0"]
        say(f"Omniglot from {omniglot}: first {classes} training and {classes} held-out classes")
    else:
        source, argv = "digits", ["--source", "digits"]
        data_overrides = ["data.pk=[5,18]", "data.batch_size=90", "data.image_size=28"]
        say("Omniglot not found: falling back to scikit-learn's digits. Digits cannot show transfer: an untrained "
            "CNN already retrieves held-out digit classes well, so read this table as a check that the pipeline "
            "runs. Pass --data (or set RCT_DIST_DATA) to a folder holding Omniglot for the real comparison.")
    shard_dir = out_dir / f"shards-{source}"
    init_distributed()
    if world_rank() == 0:
        parser = argparse.ArgumentParser()
        shards.add_arguments(parser)
        shards.run(parser.parse_args([*argv, "--out", str(shard_dir), "--shard-size", "50", "--workers", "2"]))
    if dist.is_initialized():
        dist.barrier()

    rows = []
    teacher_export = out_dir / "teacher" / "export"
    for (name, job, overrides), run_name in zip(RUNS, ("teacher", "student-labels", "rc", "rkd")):
        cfg = load_config(None, [
            f"job={job}", f"run.name={run_name}", f"run.out_dir={out_dir}", "run.overwrite=true",
            f"data.root={shard_dir}", "data.views=2", "data.workers=2", *data_overrides,
            "loss.name=proxy_anchor" if job == "train-teacher" else "teacher.source=export",
            *([f"teacher.export={teacher_export}"] if job == "transfer" else []),
            "optim.lr=1e-3", f"optim.epochs={teacher_epochs if run_name == 'teacher' else epochs}",
            f"eval.every_epochs={max(epochs, teacher_epochs)}", "deepspeed.config=zero2_fp32",  # CPU-safe: no bf16/fp16 mode
            *overrides,
        ])
        say(f"training {name} ({cfg.optim.epochs} epochs)")
        start = time.perf_counter()
        metrics = train(cfg)
        rows.append((name, metrics["recall"], time.perf_counter() - start))
        say(f"  R@1 {100 * metrics['recall'][1]:.1f}")
    say(format_table(rows))
    say(f"TensorBoard: tensorboard --logdir {out_dir}")
    return rows


def format_table(rows: list[tuple[str, dict, float]]) -> str:
    width = max(len(r[0]) for r in rows)
    head = f"{'model':<{width}}  " + "  ".join(f"R@{k:<4}" for k in KS) + "  seconds"
    lines = [head, "-" * len(head)]
    for name, recall, seconds in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * recall[k]:5.1f}" for k in KS) + f"  {seconds:7.1f}")
    return "\n".join(lines)
