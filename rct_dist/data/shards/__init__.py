"""`make-shards`: convert a dataset into webdataset shards (format "rct-dist-shards/1") for the streaming loader.

Layout: `{out}/{split}/{split}-{i:06d}.tar` plus `{out}/{split}/index.json`, train and test with disjoint classes.
Unreadable images are skipped, logged and listed under "skipped" in the index and the summary, rather than
failing a long run on one bad file; a split where every image is unreadable is an error.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Callable

import rct_dist
from rct_dist.data.shards.omniglot import omniglot
from rct_dist.data.shards.plan import Listing, make_plan
from rct_dist.data.shards.sources import cars, cub, digits, folder, sop, split_names
from rct_dist.data.shards.writer import clean_temp_files, has_all_shards, read_index, same_args, summarize, write_split

__all__ = ["SOURCES", "add_arguments", "run"]

SOURCES: dict[str, Callable[[argparse.Namespace], list[Listing]]] = {
    "folder": folder,
    "cub": cub,
    "cars": cars,
    "sop": sop,
    "omniglot": omniglot,
    "digits": digits,
}


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
        "--workers", type=positive_int, default=min(4, os.cpu_count() or 1), help="writer processes"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace splits made with different arguments")


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
    return record


def run(args: argparse.Namespace) -> dict:
    """Write every split not already finished with the same arguments; return a summary per split."""
    record = recorded_args(args)
    dirs = {split: args.out / split for split in split_names(args)}
    indexes = {split: read_index(d) for split, d in dirs.items()}
    conflicts = [str(dirs[s]) for s, index in indexes.items() if index is not None and not same_args(index, record)]
    if conflicts and not args.overwrite:
        raise FileExistsError(
            f"{', '.join(conflicts)} already hold shards made with other arguments (see made_by.args in their "
            f"index.json; this run: {record}); pass --overwrite to replace them or choose another --out"
        )
    finished = {}
    for split, index in indexes.items():
        # Same arguments but a shard missing: rewritten even without --overwrite, nothing of value is lost.
        if index is not None and same_args(index, record) and has_all_shards(index, dirs[split]):
            finished[split] = index
    splits = {}
    for split, index in finished.items():
        clean_temp_files(dirs[split])
        splits[split] = summarize(index, "already done")
    if len(finished) < len(dirs):
        made_by = {"version": rct_dist.__version__, "args": record}
        for listing in SOURCES[args.source](args):
            if listing.split not in finished:
                plan = make_plan(listing, args.limit_classes)
                index = write_split(plan, dirs[listing.split], args.shard_size, args.workers, made_by, args.source)
                splits[listing.split] = summarize(index, "written")
    return {"out": str(args.out), "source": args.source, "splits": splits}
