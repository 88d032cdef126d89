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
