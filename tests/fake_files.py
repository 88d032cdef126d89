"""Small files for tests that build dataset layouts: random images in a given format, and a tree of files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(fmt: str, seed: int, size: tuple[int, int] = (6, 5)) -> bytes:
    """A random RGB image of `size` (height, width), encoded as `fmt` (PNG, JPEG, ...)."""
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(out, format=fmt)
    return out.getvalue()


def write_files(root: Path, files: dict[str, bytes | str]) -> None:
    """Write {relative path: content} under `root`, creating folders."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)


def fake_cub(root: Path, size: tuple[int, int] = (6, 5)) -> None:
    """A CUB-200-2011 layout of classes 99-102, two JPEGs each (so 99-100 train and 101-102 test)."""
    ids, files = [99, 100, 101, 102], {}
    files["classes.txt"] = "".join(f"{i} {i:03d}.Bird_{i}\n" for i in ids)
    listed = [(n + 1, i, f"{i:03d}.Bird_{i}/img_{n}.jpg") for n, i in enumerate(ids * 2)]
    files["images.txt"] = "".join(f"{n} {p}\n" for n, _, p in listed)
    files["image_class_labels.txt"] = "".join(f"{n} {i}\n" for n, i, _ in listed)
    files.update({f"images/{p}": image_bytes("JPEG", n, size) for n, _, p in listed})
    write_files(root, files)
