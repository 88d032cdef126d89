"""`rct-dist demo`: the paper's comparison in miniature, offline, on real data, through the real trainer.

A 4-block CNN teacher learns Omniglot's training alphabets with Proxy-Anchor; a 3-block student
(16/32/32 channels, 64-d) then learns from labels, and from the teacher alone with RC and with RKD.
All are evaluated on held-out classes, and one table of Recall@K and times is printed.

Data: Omniglot from `--data` or `$RCT_DIST_DATA/omniglot` (the official zips or their npz repack),
else downloaded from the official repository when the network allows, else the Omniglot copy that ships
with the package (`demo_data/omniglot28.npz`: every class, 28 x 28, 1 bit per pixel; see its README).
scikit-learn's digits remain an explicit choice (`--dataset digits`); they cannot show transfer (an
untrained CNN already retrieves held-out digits well).
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
DATASETS = ("auto", "omniglot", "embedded", "digits")
EMBEDDED = Path(__file__).resolve().parent / "demo_data"  # holds omniglot28.npz, its LICENSE and README
LEVEL = 1.0  # R@1 points: differences smaller than this are called level (runs differ by about a point)


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

    `dataset`: "auto" (full Omniglot if found or downloadable, else the embedded copy), "omniglot" (full
    Omniglot or an error), "embedded" (the copy in the package) or "digits" (scikit-learn's digits).
    Defaults fit 10 minutes on 2 CPU cores: on Omniglot 100 training and 100 held-out classes, a teacher
    of 12 epochs and students of 10; on digits 3 epochs, where more would show nothing more.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    out_dir = Path(out)
    omniglot = None
    if dataset in ("auto", "omniglot"):
        omniglot = find_omniglot(data) or download_omniglot(out_dir / "omniglot", say)
        if omniglot is None and dataset == "omniglot":
            raise FileNotFoundError("Omniglot not found under --data or $RCT_DIST_DATA and not downloadable")
        if omniglot is None:
            say("full Omniglot not found: using the 28 x 28 copy that ships with the package")
    if dataset in ("auto", "embedded") and omniglot is None:
        omniglot = EMBEDDED
    epochs = epochs or (10 if omniglot is not None else 3)
    teacher_epochs = teacher_epochs or (12 if omniglot is not None else epochs)
    if omniglot is not None:
        source, argv = "omniglot", ["--source", "omniglot", "--root", str(omniglot), "--limit-classes", str(classes)]
        p = min(45, classes)  # the paper's 45 classes x 2 images, fewer on a tiny subset
        # Characters: no flips (a mirrored character is another one), no crops small enough to lose strokes.
        data_overrides = [f"data.pk=[{p},2]", f"data.batch_size={2 * p}", "data.image_size=28",
                          "data.crop_scale=[0.5,1.0]", "data.hflip=0"]
        what = "embedded Omniglot (28 x 28, 1 bit)" if omniglot == EMBEDDED else f"Omniglot from {omniglot}"
        say(f"{what}: first {classes} training and {classes} held-out classes")
    else:
        source, argv = "digits", ["--source", "digits"]
        data_overrides = ["data.pk=[5,18]", "data.batch_size=90", "data.image_size=28"]
        say("scikit-learn's digits: digits cannot show transfer (an untrained CNN already retrieves held-out "
            "digit classes well), so read this table as a check that the pipeline runs.")
    # One folder per data choice: make-shards refuses to mix shards made with other arguments in one folder.
    shard_dir = out_dir / ("shards-digits" if omniglot is None else
                           f"shards-{'embedded' if omniglot == EMBEDDED else 'omniglot'}-{classes}")
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
    say(conclusion(rows))
    say(f"TensorBoard: tensorboard --logdir {out_dir}")
    return rows


def format_table(rows: list[tuple[str, dict, float]]) -> str:
    width = max(len(r[0]) for r in rows)
    head = f"{'model':<{width}}  " + "  ".join(f"R@{k:<4}" for k in KS) + "  seconds"
    lines = [head, "-" * len(head)]
    for name, recall, seconds in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{100 * recall[k]:5.1f}" for k in KS) + f"  {seconds:7.1f}")
    return "\n".join(lines)


def verdict(difference: float, level: float = LEVEL) -> str:
    return "above" if difference >= level else "below" if difference <= -level else "level with"


def conclusion(rows: list[tuple[str, dict, float]], level: float = LEVEL) -> str:
    """One line comparing RC with the labels and RKD students, from the rows' R@1 as the table prints them."""
    r1 = {name: round(100 * recall[1], 1) for name, recall, _ in rows}
    labels, rc, rkd = (r1[name] for name, _, _ in RUNS[1:])
    vs_labels, vs_rkd = round(rc - labels, 1), round(rc - rkd, 1)
    return (f"RC from the teacher alone: R@1 {rc:.1f} vs {labels:.1f} from labels ({vs_labels:+.1f}) and "
            f"{rkd:.1f} with RKD ({vs_rkd:+.1f}): {verdict(vs_labels, level)} labels, {verdict(vs_rkd, level)} RKD "
            f"(differences under {level:g} point count as level)")
