"""Decoded images per second through `make_loader`, with 0, 1 and 2 workers, in one run.

Ratios are against the 0-worker (main process only) time of the same run, so they stay meaningful on
a shared machine where absolute rates drift. Time to the first batch (worker start-up) is reported
apart from the steady-state rate. `img/s/core` divides by the processes decoding (the main process
with 0 workers, else the workers; the main process still batches); `x16 cores` is that per-core rate
times 16, the cores a GPU gets on a 16-core-per-GPU node, which assumes linear scaling.

Images are dataset images; with `--views 2` each is decoded once and augmented twice.
`--uint8` keeps crops uint8 through collation (data.uint8_batches; normalisation then happens on
the training device, not here). `--decode gpu` (CUDA only) times the loader yielding encoded bytes
plus `DeviceDecode` on the GPU (data.decode: gpu).

    python bench/data_throughput.py --split /data/shards/imagenet/train --samples 20000
    python bench/data_throughput.py --synthetic 2000      # generates JPEGs and shards in a temp dir
    python bench/data_throughput.py --synthetic 2000 --threads 1 --uint8 --views 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from rct_dist.data.shards import make_shards
from rct_dist.data.loader import make_loader
from rct_dist.data.transforms import DeviceDecode, build_transform


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
    make_shards("folder", root / "shards", root=folder, split_classes="none", shard_size=-(-images // shards))
    return root / "shards" / "train"


def measure(split: Path, workers: int, args: argparse.Namespace) -> tuple[int, float, float]:
    """(images, seconds to the first batch, seconds for the rest) for one pass on one rank."""
    gpu = args.decode == "gpu"
    views = 1 if gpu else args.views
    loader = make_loader(split, batch_size=args.batch_size, train=not args.eval, image_size=args.image_size,
                         workers=workers, rank=0, world=1, views=views, decode=args.decode,
                         transform=None if gpu else build_transform(args.image_size, not args.eval, uint8=args.uint8),
                         samples_per_epoch=None if args.eval else args.samples)
    finish = DeviceDecode(args.image_size, "cuda", views=args.views) if gpu else None
    start = time.perf_counter()
    batches = iter(loader)
    images = len(next(batches))
    first = time.perf_counter()
    for batch in batches:
        images += len(batch)
        if finish is not None:
            finish(batch.images)
    if finish is not None:
        torch.cuda.synchronize()
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
    parser.add_argument("--views", type=int, default=1, help="augmented views per image (train)")
    parser.add_argument("--uint8", action="store_true", help="uint8 batches, no normalisation on the CPU")
    parser.add_argument("--decode", choices=("cpu", "gpu"), default="cpu", help="gpu: DeviceDecode on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        split = args.split or synthetic_split(Path(tmp), args.synthetic, shards=max(2, max(args.workers) * 2))
        print(f"{'workers':>7} {'images':>7} {'start s':>8} {'img/s':>8} {'img/s/core':>10} {'x16 cores':>9} "
              f"{'x 0 workers':>11}")
        baseline, rows = None, []
        for workers in [0] + [w for w in args.workers if w != 0]:
            images, startup, seconds = measure(split, workers, args)
            rate = (images - args.batch_size) / seconds if seconds > 0 else float("nan")
            baseline = baseline or rate
            per_core = rate / max(workers, 1)
            rows.append(dict(workers=workers, images=images, startup_s=startup, images_per_s=rate,
                             images_per_s_per_core=per_core, views=args.views, uint8=args.uint8,
                             decode=args.decode))
            print(f"{workers:>7} {images:>7} {startup:>8.2f} {rate:>8.1f} {per_core:>10.1f} {per_core * 16:>9.0f} "
                  f"{rate / baseline:>11.2f}")
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
