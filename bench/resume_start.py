"""How long a mid-epoch resume waits for its first batch, against an epoch start, in one run.

The loader reads samples by byte offset from a table of tar headers (rct_dist/data/members.py), so a
resume at 90 % of an epoch asks for its first batch like an epoch start does. The baseline is what a
streaming loader has to do instead: replay the epoch from its start and throw batches away up to the
resume point (what rct-dist did before). Also timed: building the sample table from the shards'
headers (once per split, then cached beside its index.json), and loading it from that cache.

Ratios are against the epoch start measured in the same run.

    python bench/resume_start.py --synthetic 2000
    python bench/resume_start.py --split shards/omniglot/train --batch-size 90
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from data_throughput import synthetic_split

from rct_dist.data import members
from rct_dist.data.loader import ShardIndex, make_loader, sample_table


def first_batch_seconds(split: Path, args: argparse.Namespace, start_samples: int, replay_to: int = 0) -> float:
    """Seconds from building the loader to holding the batch at the resume point."""
    begin = time.perf_counter()
    loader = make_loader(split, batch_size=args.batch_size, train=True, image_size=args.image_size,
                         workers=args.workers, rank=0, world=1, start_samples=start_samples)
    batches = iter(loader)
    for _ in range(replay_to + 1):
        next(batches)
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", type=Path, help="split directory holding index.json and shards")
    source.add_argument("--synthetic", type=int, metavar="IMAGES", help="generate this many JPEGs first")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--at", type=float, default=0.9, help="resume point, as a fraction of the epoch")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        split = args.split or synthetic_split(Path(tmp), args.synthetic, shards=4)
        index = ShardIndex.load(split)
        (split / members.CACHE_NAME).unlink(missing_ok=True)
        members._tables.clear()
        begin = time.perf_counter()
        table = sample_table(index)
        scan = time.perf_counter() - begin
        members._tables.clear()  # a new process: the table from the cache file beside the index
        begin = time.perf_counter()
        sample_table(index)
        cached = time.perf_counter() - begin
        steps = len(table) // args.batch_size
        point = int(args.at * steps)
        start = first_batch_seconds(split, args, 0)
        resume = first_batch_seconds(split, args, point * args.batch_size)
        replay = first_batch_seconds(split, args, 0, replay_to=point)
        print(f"sample table from the shards' headers: {len(table)} samples in {scan:.3f} s "
              f"({len(table) / scan:,.0f} samples/s); from its cache file: {cached:.3f} s")
        print(f"resume point: batch {point} of {steps} (batch size {args.batch_size}, {args.workers} workers)")
        print(f"{'first batch':<34} {'seconds':>8} {'x epoch start':>13}")
        for name, seconds in (("epoch start", start), ("resume by offset (rct-dist)", resume),
                              ("replay to the point (baseline)", replay)):
            print(f"{name:<34} {seconds:>8.3f} {seconds / start:>13.2f}")


if __name__ == "__main__":
    main()
