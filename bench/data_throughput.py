"""Decoded images per second through `make_loader`, with 0, 1 and 2 workers, in one run.

Ratios are against the 0-worker (main process only) time of the same run, so they stay meaningful on
a shared machine where absolute rates drift. Time to the first batch (worker start-up) is reported
apart from the steady-state rate.

    python bench/data_throughput.py --split /data/shards/imagenet/train --samples 20000
    python bench/data_throughput.py --synthetic 2000      # generates JPEGs and shards in a temp dir
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from rct_dist.data import shards as make_shards
from rct_dist.data.loader import make_loader


def synthetic_split(root: Path, images: int, shards: int, classes: int = 10, side: int = 320) -> Path:
    """A folder of random JPEGs (ImageNet-like size and compression) in class folders, sharded by
    `rct-dist make-shards --source folder` (the real writer)."""
    rng = np.random.default_rng(0)
    folder = root / "jpegs"
    for i in range(images):
        pixels = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)  # smooth, so it compresses
        target = folder / f"class{i % classes:03d}"
        target.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).resize((side, side), Image.BILINEAR).save(target / f"{i:07d}.jpg", quality=90)
    parser = argparse.ArgumentParser()
    make_shards.add_arguments(parser)
    make_shards.run(parser.parse_args([
        "--source", "folder", "--root", str(folder), "--out", str(root / "shards"), "--split-classes", "none",
        "--shard-size", str(-(-images // shards)),
    ]))
    return root / "shards" / "train"


def measure(split: Path, workers: int, args: argparse.Namespace) -> tuple[int, float, float]:
    """(images, seconds to the first batch, seconds for the rest) for one pass on one rank."""
    loader = make_loader(split, batch_size=args.batch_size, train=not args.eval, image_size=args.image_size,
                         workers=workers, rank=0, world=1,
                         samples_per_epoch=None if args.eval else args.samples)
    start = time.perf_counter()
    batches = iter(loader)
    images = len(next(batches)[0])
    first = time.perf_counter()
    for batch in batches:
        images += len(batch[0])
    return images, first - start, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--split", type=Path, help="split directory holding index.json and shards")
    source.add_argument("--synthetic", type=int, metavar="IMAGES", help="generate this many JPEGs first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--samples", type=int, help="train: images per pass (default: the whole split)")
    parser.add_argument("--eval", action="store_true", help="eval transform (resize + center crop)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        split = args.split or synthetic_split(Path(tmp), args.synthetic, shards=max(args.workers) * 2)
        print(f"{'workers':>7} {'images':>7} {'start s':>8} {'img/s':>8} {'img/s/worker':>12} {'x 0 workers':>11}")
        baseline = None
        for workers in [0] + [w for w in args.workers if w != 0]:
            images, startup, seconds = measure(split, workers, args)
            rate = (images - args.batch_size) / seconds if seconds > 0 else float("nan")
            baseline = baseline or rate
            print(f"{workers:>7} {images:>7} {startup:>8.2f} {rate:>8.1f} {rate / max(workers, 1):>12.1f} "
                  f"{rate / baseline:>11.2f}")


if __name__ == "__main__":
    main()
