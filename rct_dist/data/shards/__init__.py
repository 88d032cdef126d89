"""`make-shards`: convert a dataset into webdataset shards (format "rct-dist-shards/1") for the streaming loader.

Layout: `{out}/{split}/{split}-{i:06d}.tar` plus `{out}/{split}/index.json`, train and test with disjoint classes.
`--val-classes K` moves K of the training classes (after `--limit-classes`; a choice seeded by `--val-seed`) into
a third split, `--val-split` (default `val`), for checkpoint selection and early stopping: train, val and test
classes are disjoint, and each split's labels are 0..C-1 in its own class order.
Unreadable images are skipped, logged and listed under "skipped" in the index and the summary, rather than
failing a long run on one bad file; a split where every image is unreadable is an error.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import rct_dist
from rct_dist.data.shards.omniglot import omniglot
from rct_dist.data.shards.plan import Listing, SplitPlan, first_classes, hold_out, make_plan
from rct_dist.data.shards.sources import cars, cub, digits, folder, sop, split_names
from rct_dist.data.shards.writer import (
    FORMAT,
    clean_temp_files,
    has_all_shards,
    read_index,
    remove_split,
    same_args,
    summarize,
    write_split,
)

__all__ = ["SOURCES", "add_arguments", "make_shards", "run"]

SOURCES: dict[str, Callable[[argparse.Namespace], list[Listing]]] = {
    "folder": folder,
    "cub": cub,
    "cars": cars,
    "sop": sop,
    "omniglot": omniglot,
    "digits": digits,
}
DEFAULT_WORKERS = min(4, os.cpu_count() or 1)
VAL_SPLIT = "val"
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")  # a folder name and the prefix of the samples' keys


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of the `make-shards` subcommand."""
    parser.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset layout to read")
    parser.add_argument("--root", type=Path, help="dataset folder (not needed for digits)")
    parser.add_argument("--out", type=Path, required=True, help="output folder; one subfolder per split")
    parser.add_argument(
        "--split-classes", choices=("half", "none"), default="half",
        help="folder source: first half of the sorted classes -> train, second half -> test; or one split",
    )
    parser.add_argument("--split", default="train", help="folder source with --split-classes none: the split name")
    parser.add_argument("--shard-size", type=positive_int, default=1000, help="samples per shard")
    parser.add_argument("--limit-classes", type=positive_int, help="keep the first N classes per split (quick runs)")
    parser.add_argument(
        "--val-classes", type=positive_int, metavar="K",
        help="move K of the training classes, a seeded random choice, into a validation split with classes "
        "disjoint from train and test (for checkpoint selection and early stopping); applied after "
        "--limit-classes: --limit-classes 100 --val-classes 20 gives 80 train + 20 val classes",
    )
    parser.add_argument(
        "--val-split", metavar="NAME", help=f"with --val-classes: the validation split's name (default {VAL_SPLIT})"
    )
    parser.add_argument(
        "--val-seed", type=int, metavar="SEED", help="with --val-classes: seed of the choice of classes (default 0)"
    )
    parser.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS, help="writer processes")
    parser.add_argument("--overwrite", action="store_true", help="replace splits made with different arguments")


@dataclass(frozen=True)
class Validation:
    classes: int
    split: str
    seed: int


def check_args(args: argparse.Namespace) -> None:
    """What the parser checks, again for callers that build the Namespace themselves (see `make_shards`)."""
    if args.source not in SOURCES:
        raise ValueError(f"unknown source {args.source!r}: choose one of {', '.join(sorted(SOURCES))}")
    for name in ("shard_size", "workers", "limit_classes"):
        value = getattr(args, name)
        if not (value is None and name == "limit_classes") and (not isinstance(value, int) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if getattr(args, "split_classes", "half") not in ("half", "none"):
        raise ValueError(f"--split-classes must be half or none, got {args.split_classes!r}")


def validation(args: argparse.Namespace) -> Validation | None:
    """The validation split asked for, checked before anything is read; None without --val-classes."""
    classes, split, seed = (getattr(args, name, None) for name in ("val_classes", "val_split", "val_seed"))
    if classes is None:
        if split is not None or seed is not None:
            raise ValueError("--val-split and --val-seed apply only with --val-classes K")
        return None
    if not isinstance(classes, int) or classes < 1:
        raise ValueError(f"--val-classes must be an integer >= 1, got {classes!r}")
    split = VAL_SPLIT if split is None else split
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"--val-split {split!r}: use letters, digits, '_' and '-' (it names the split's folder)")
    splits = split_names(args)
    if "train" not in splits:
        raise ValueError(
            "--val-classes takes its classes from the train split, but this run writes only "
            + ", ".join(map(repr, splits))
            + (" (use --split train or --split-classes half)" if args.source == "folder" else "")
        )
    if split in splits:
        raise ValueError(f"--val-split {split}: this run already writes a split of that name ({', '.join(splits)})")
    return Validation(classes, split, 0 if seed is None else int(seed))


def recorded_args(args: argparse.Namespace) -> dict:
    """The arguments that determine the shards' content; a finished split is reused only if they match."""
    record = {
        "source": args.source,
        "root": str(args.root.resolve()) if args.root is not None else None,
        "shard_size": args.shard_size,
        "limit_classes": args.limit_classes,
        "order": "shuffled runs of 4 same-class images, seed 0",  # see plan.make_plan
    }
    if args.source == "folder":
        record.update(split_classes=args.split_classes, split=args.split)
    val = validation(args)
    if val is not None:  # absent otherwise, so shards made before --val-classes existed are still reused
        record.update(
            val_classes=val.classes, val_split=val.split, val_seed=val.seed,
            val_choice="random.Random(val_seed).sample of the train classes after limit_classes",  # see plan.hold_out
        )
    return record


def split_plans(listing: Listing, limit: int | None, val: Validation | None) -> list[SplitPlan]:
    """The listing's plan; the train listing gives two, train and val, when a validation split is asked for."""
    if val is None or listing.split != "train":
        return [make_plan(listing, limit)]
    train = first_classes(listing, limit)
    if val.classes >= len(train.class_names):
        after = f", after --limit-classes {limit}" if limit else ""
        raise ValueError(
            f"--val-classes {val.classes}: validation split larger than the training classes ({val.classes} >= "
            f"{len(train.class_names)} training classes{after}); at least one class must stay in train"
        )
    rest, held = hold_out(train, val.classes, val.seed, val.split)
    return [make_plan(rest), make_plan(held)]


def stale_val_splits(out: Path, dirs: dict[str, Path]) -> dict[Path, str]:
    """Validation splits in `out` made by an earlier run that this run does not write: left in place, their
    classes could overlap this run's train split. {folder: split name}."""
    if not out.is_dir():
        return {}
    stale = {}
    for path in sorted(out.iterdir()):
        if not path.is_dir() or path.name in dirs:
            continue
        index = read_index(path)
        if index and index.get("format") == FORMAT and index.get("split") == path.name and \
                index.get("made_by", {}).get("args", {}).get("val_split") == path.name:
            stale[path] = path.name
    return stale


def run(args: argparse.Namespace) -> dict:
    """Write every split not already finished with the same arguments; return a summary per split."""
    check_args(args)
    val = validation(args)
    record = recorded_args(args)
    dirs = {split: args.out / split for split in [*split_names(args), *([val.split] if val else [])]}
    indexes = {split: read_index(d) for split, d in dirs.items()}
    conflicts = [str(dirs[s]) for s, index in indexes.items() if index is not None and not same_args(index, record)]
    stale = stale_val_splits(args.out, dirs)
    if (conflicts or stale) and not args.overwrite:
        raise FileExistsError(
            f"{', '.join([*conflicts, *map(str, stale)])} already hold shards made with other arguments (see "
            f"made_by.args in their index.json; this run: {record})"
            + (f"; {', '.join(map(str, stale))}: validation split(s) this run would leave behind, whose classes "
               "may overlap its train split (--overwrite deletes them)" if stale else "")
            + "; pass --overwrite to replace them or choose another --out"
        )
    finished = {}
    for split, index in indexes.items():
        # Same arguments but a shard missing: rewritten even without --overwrite, nothing of value is lost.
        if index is not None and same_args(index, record) and has_all_shards(index, dirs[split]):
            finished[split] = index
    plans = []
    if len(finished) < len(dirs):
        # Every plan before anything is written or deleted: a bad --val-classes leaves the output as it was.
        listings = SOURCES[args.source](args)
        plans = [plan for listing in listings for plan in split_plans(listing, args.limit_classes, val)]
    for path, split in stale.items():
        remove_split(path, split)
    splits = {}
    for split, index in finished.items():
        clean_temp_files(dirs[split])
        splits[split] = summarize(index, "already done")
    made_by = {"version": rct_dist.__version__, "args": record}
    for plan in plans:
        if plan.split not in finished:
            index = write_split(plan, dirs[plan.split], args.shard_size, args.workers, made_by, args.source)
            splits[plan.split] = summarize(index, "written")
    return {"out": str(args.out), "source": args.source, "splits": {s: splits[s] for s in dirs if s in splits}}


def make_shards(
    source: str,
    out: str | Path,
    *,
    root: str | Path | None = None,
    limit_classes: int | None = None,
    val_classes: int | None = None,
    val_split: str | None = None,
    val_seed: int | None = None,
    split_classes: str = "half",
    split: str = "train",
    shard_size: int = 1000,
    workers: int = DEFAULT_WORKERS,
    overwrite: bool = False,
) -> dict:
    """`rct-dist make-shards` without a parser: the keywords are its options (`val_split` defaults to "val" and
    `val_seed` to 0, both with `val_classes` only). Returns `run`'s summary; bad values raise ValueError."""
    return run(
        argparse.Namespace(
            source=source, out=Path(out), root=None if root is None else Path(root), limit_classes=limit_classes,
            val_classes=val_classes, val_split=val_split, val_seed=val_seed, split_classes=split_classes,
            split=split, shard_size=shard_size, workers=workers, overwrite=overwrite,
        )
    )
