"""Atomic file writes: through a temporary name in the same folder, then renamed into place, so a crash
or a concurrent reader sees the old file or the whole new one, never half of it."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import BinaryIO, Callable


def is_temp_name(name: str) -> bool:
    """True for the temporary names `atomic_write` uses (left behind only by a killed process)."""
    return re.fullmatch(r"\..+\.tmp-\d+", name) is not None


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it, a new file) durable: fsync the folder itself."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """`fill` writes the content to a binary stream; it is fsynced, renamed to `path`, and the rename
    made durable by an fsync of the folder (without it, a power loss can forget the rename)."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as stream:
            fill(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file, read in chunks (checkpoint markers, shard downloads, shard indexes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
