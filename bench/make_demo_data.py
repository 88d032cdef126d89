"""Make `rct_dist/demo_data/omniglot28.npz`, the Omniglot copy that ships with the package for `rct-dist demo`.

Input: the npz repack of the official Omniglot set (`images_background.npz`, `images_evaluation.npz`, arrays
`images` (C, 20, 105, 105) bool with True = white background). Output: every class of both parts, in the
repack's order (964 background, 659 evaluation, all 20 drawers each), each image reduced to S x S (28) by
an area average of the ink (PIL's BOX filter on the 0/1 ink map), then thresholded (ink where at least
25 % of the area is ink), packed to 1 bit per pixel (np.packbits, bit 1 = ink) and zip-deflated.

The zip is written with fixed member timestamps, so the same input gives the same bytes: the script prints
the sha256 of its inputs and of its output, and `--check` compares the output with an existing file.

    python bench/make_demo_data.py --omniglot path/to/omniglot            # writes the package's file
    python bench/make_demo_data.py --omniglot path/to/omniglot --check    # rebuilds in memory and compares
"""

from __future__ import annotations

import argparse
import hashlib
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from rct_dist.data.shards.omniglot import PACKED_NAME, pack

OUT = Path(__file__).resolve().parents[1] / "rct_dist" / "demo_data" / PACKED_NAME
SOURCES = (("background", "images_background.npz"), ("evaluation", "images_evaluation.npz"))
SIZE = 28
INK_THRESHOLD = 0.25


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reduce(images: np.ndarray, size: int = SIZE, threshold: float = INK_THRESHOLD) -> np.ndarray:
    """(C, K, H, W) bool, True = white, to (C, K, size, size) bool: area-averaged ink >= threshold is ink."""
    out = np.empty((*images.shape[:2], size, size), dtype=bool)
    for c in range(images.shape[0]):
        for k in range(images.shape[1]):
            ink = Image.fromarray((~images[c, k]).astype(np.float32))
            out[c, k] = np.asarray(ink.resize((size, size), Image.BOX)) < threshold
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """What np.savez_compressed writes, but with fixed timestamps and member order: reproducible bytes."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            zf.writestr(info, member.getvalue(), compresslevel=9)
    return buffer.getvalue()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot", type=Path, required=True, help="folder with the two npz repack files")
    parser.add_argument("--out", type=Path, default=OUT, help="where to write (default: the package's file)")
    parser.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = parser.parse_args()

    arrays: dict[str, np.ndarray] = {}
    for name, file in SOURCES:
        path = args.omniglot / file
        print(f"{file}: sha256 {sha256(path)}")
        with np.load(path, allow_pickle=False) as npz:
            images = npz["images"]
        arrays[name] = pack(reduce(images))
        print(f"  {name}: {images.shape[0]} classes x {images.shape[1]} drawers -> {arrays[name].shape} uint8")
    arrays["image_size"] = np.array(SIZE, dtype=np.int64)
    data = npz_bytes(arrays)
    digest = hashlib.sha256(data).hexdigest()
    print(f"{PACKED_NAME}: {len(data)} bytes, sha256 {digest}")
    if args.check:
        same = args.out.is_file() and args.out.read_bytes() == data
        print(f"{args.out}: {'identical' if same else 'DIFFERS'}")
        return 0 if same else 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(data)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
