"""`make-shards`: convert a dataset into webdataset shards (format "rct-dist-shards/1") for the loader.

Layout: `{out}/{split}/{split}-{i:06d}.tar` plus `{out}/{split}/index.json`, train and test with disjoint classes.
`--val-classes K` moves K of the training classes (after `--limit-classes`; a choice seeded by `--val-seed`) into
a third split, `--val-split` (default `val`), for checkpoint selection and early stopping: train, val and test
classes are disjoint, and each split's labels are 0..C-1 in its own class order.
Unreadable images are skipped, logged and listed under "skipped" in the index and the summary, rather than
failing a long run on one bad file; a split where every image is unreadable is an error.

`--out` may be a bucket or URL prefix (`s3://bucket/prefix`, `gs://...`; rct_dist/data/stores.py): the splits are
written to a local staging folder (`--stage`, default a folder in the shard cache's root), then each split's shards,
its sample table and, last, its index are uploaded; the staging copy is deleted after the upload. A split already in
the bucket with the same arguments is left alone; one made with other arguments needs `--overwrite`.

From Python: `make_shards(source, out, **keywords)`, or `run(ShardOptions(...))`; the command line
(rct_dist/cli.py) parses its flags into a `ShardOptions`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import rct_dist
from rct_dist.data.stores import is_remote
from rct_dist.data.shards.omniglot import omniglot
from rct_dist.data.shards.plan import Listing, SplitPlan, first_classes, hold_out, make_plan
from rct_dist.data.shards.sources import cars, cub, digits, folder, sop, split_names
from rct_dist.data.shards.upload import upload_run
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

__all__ = ["SOURCES", "ShardOptions", "make_shards", "run"]

SOURCES: dict[str, Callable[["ShardOptions"], list[Listing]]] = {
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


@dataclass(frozen=True)
class Validation:
    classes: int
    split: str
    seed: int


@dataclass(frozen=True)
class ShardOptions:
    """The options of `rct-dist make-shards` (field = flag without the dashes, `-` as `_`), checked when made:
    a bad value raises ValueError naming the option. `out` and `root` take a str or a Path (kept as Path)."""

    source: str
    out: Path | str  # a local folder (kept as Path) or a URL prefix (kept as str)
    root: Path | None = None
    split_classes: str = "half"  # folder source: "half" (train/test by class halves) or "none" (one split)
    split: str = "train"  # folder source with split_classes "none": the split's name
    shard_size: int = 1000
    limit_classes: int | None = None
    val_classes: int | None = None
    val_split: str | None = None  # default VAL_SPLIT, with val_classes only
    val_seed: int | None = None  # default 0, with val_classes only
    workers: int = DEFAULT_WORKERS
    overwrite: bool = False
    stage: Path | None = None  # remote --out: the local folder the splits are written to before the upload

    def __post_init__(self) -> None:
        for name in ("out", "root", "stage"):
            value = getattr(self, name)
            if value is None and name != "out":
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"--{name} must be a path{' or a URL' if name == 'out' else ''}, got {value!r}")
            try:
                remote = is_remote(value)
            except ValueError as error:
                raise ValueError(f"--{name}: {error}") from None
            if remote and name != "out":
                raise ValueError(f"--{name} must be a local path, got {value!r}")
            object.__setattr__(self, name, str(value).rstrip("/") if remote else Path(value))
        check_args(self)
        validation(self)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_args(options: ShardOptions) -> None:
    """Each option's type and range (what the command line's parser checks for its flags)."""
    if options.source not in SOURCES:
        raise ValueError(
            f"argument --source: invalid choice: {options.source!r} (choose from {', '.join(sorted(SOURCES))})"
        )
    for name in ("shard_size", "workers", "limit_classes"):
        value = getattr(options, name)
        if not (value is None and name == "limit_classes") and (not _is_int(value) or value < 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
    if options.split_classes not in ("half", "none"):
        raise ValueError(f"--split-classes must be half or none, got {options.split_classes!r}")
    if not isinstance(options.split, str):
        raise ValueError(f"--split must be a string, got {options.split!r}")
    if options.val_seed is not None and not _is_int(options.val_seed):
        raise ValueError(f"--val-seed must be an integer, got {options.val_seed!r}")
    if not isinstance(options.overwrite, bool):
        raise ValueError(f"--overwrite must be True or False, got {options.overwrite!r}")


def validation(options: ShardOptions) -> Validation | None:
    """The validation split asked for, checked before anything is read; None without --val-classes."""
    classes, split, seed = options.val_classes, options.val_split, options.val_seed
    if classes is None:
        if split is not None or seed is not None:
            raise ValueError("--val-split and --val-seed apply only with --val-classes K")
        return None
    if not _is_int(classes) or classes < 1:
        raise ValueError(f"--val-classes must be an integer >= 1, got {classes!r}")
    split = VAL_SPLIT if split is None else split
    if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
        raise ValueError(f"--val-split {split!r}: use letters, digits, '_' and '-' (it names the split's folder)")
    splits = split_names(options)
    if "train" not in splits:
        raise ValueError(
            "--val-classes takes its classes from the train split, but this run writes only "
            + ", ".join(map(repr, splits))
            + (" (use --split train or --split-classes half)" if options.source == "folder" else "")
        )
    if split in splits:
        raise ValueError(f"--val-split {split}: this run already writes a split of that name ({', '.join(splits)})")
    return Validation(classes, split, 0 if seed is None else int(seed))


def recorded_args(args: ShardOptions) -> dict:
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


def run(args: ShardOptions) -> dict:
    """Write every split not already finished with the same arguments; return a summary per split."""
    if not isinstance(args, ShardOptions):
        raise TypeError(f"run takes a ShardOptions (see make_shards for keywords), got {type(args).__name__}")
    if isinstance(args.out, str):
        return upload_run(args, run)
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


def make_shards(source: str, out: str | Path, **keywords) -> dict:
    """`rct-dist make-shards` from Python: the keywords are `ShardOptions`' fields, the command's options
    (`root`, `limit_classes`, `val_classes`, `val_split` (default "val") and `val_seed` (default 0) with
    `val_classes` only, `split_classes`, `split`, `shard_size`, `workers`, `overwrite`). Returns `run`'s
    summary; bad values raise ValueError."""
    return run(ShardOptions(source=source, out=out, **keywords))
