"""How each source's image becomes one encoded sample, evaluated inside the writer processes.

Sources only describe where an image is (a file, a zip member, an array); the bytes are read and encoded in the
worker that writes the shard, so reading and PNG encoding run in parallel and the main process stays small.
"""

from __future__ import annotations

import io
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

KEPT_FORMATS = {"PNG": "png", "JPEG": "jpg"}


class CorruptImage(ValueError):
    """An image file that cannot be decoded; the writer skips and reports it instead of aborting the whole run."""


def keep_or_reencode(data: bytes, name: str) -> tuple[str, bytes]:
    """Fully decode `data` to prove it is a valid image; keep PNG/JPEG bytes as they are, re-encode others as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # open() alone reads only the header: a truncated JPEG would pass
            if image.format in KEPT_FORMATS:
                return KEPT_FORMATS[image.format], data
            out = io.BytesIO()
            image.save(out, format="PNG")
            return "png", out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImage(f"{name}: {error}") from error


def png_l(pixels: np.ndarray) -> bytes:
    """PNG-encode a 2-D uint8 array as 8-bit grayscale ("L")."""
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="L").save(out, format="PNG")
    return out.getvalue()


@dataclass(frozen=True)
class FileImage:
    """An image file on disk (folder, CUB, Cars, SOP)."""

    path: Path

    def encode(self) -> tuple[str, bytes]:
        try:
            data = self.path.read_bytes()
        except OSError as error:
            raise CorruptImage(f"{self.path}: {error}") from error
        return keep_or_reencode(data, str(self.path))


@lru_cache(maxsize=4)
def _open_zip(path: Path, pid: int) -> zipfile.ZipFile:
    """One handle per zip and process: re-reading the central directory per member would dominate, and a
    handle inherited through fork shares its file offset with the parent (keyed by pid so it never is reused)."""
    return zipfile.ZipFile(path)


@dataclass(frozen=True)
class ZipImage:
    """A member of a zip archive (official Omniglot)."""

    archive: Path
    member: str

    def encode(self) -> tuple[str, bytes]:
        try:
            data = _open_zip(self.archive, os.getpid()).read(self.member)
        except (OSError, KeyError, zipfile.BadZipFile) as error:
            raise CorruptImage(f"{self.archive}:{self.member}: {error}") from error
        return keep_or_reencode(data, f"{self.archive}:{self.member}")


@dataclass(frozen=True)
class ArrayImage:
    """A 2-D array: uint8 gray levels, or bool binary images where True is white background (Omniglot npz)."""

    pixels: np.ndarray

    def encode(self) -> tuple[str, bytes]:
        pixels = self.pixels.astype(np.uint8) * 255 if self.pixels.dtype == np.bool_ else self.pixels
        return "png", png_l(pixels)
