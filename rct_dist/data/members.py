"""Where every sample of a split lies inside its shards: a table built by reading tar headers only.

The loader reads samples by byte offset (`os.pread`) instead of streaming whole shards, which is what
makes an epoch's plan independent of the world size and the worker count, and a mid-epoch resume
free: the samples before the resume point are never read. Building the table reads each member's
512-byte header and the few bytes of its `.cls` member; images are never decoded here.

A sample is the run of consecutive members sharing a key (webdataset's convention: the basename up
to its first dot), with an image (`png`, `jpg`, `jpeg` or `webp`) and a `cls` holding its integer label, and
optionally `teacher.npy`. Every other member (`json`, anything else, a pickle) is ignored: never
read, never unpickled. Damage is counted, not fatal:

* `damaged_shards`: shards that end early (truncated, a corrupt header) or cannot be opened;
* `lost_samples`: samples the index announces but the table could not take: behind a shard's
  damage, or without a readable image member or label.

The table is cached in memory and in `.rct-members.npz` beside the split's index.json (numeric and
string arrays, loaded without pickle), both keyed by every shard's size and modification time: a
rewritten shard rebuilds it, a read-only data folder only costs each process its own scan.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
TEACHER_FIELD = "teacher.npy"  # a sample's stored teacher embedding


@dataclass(frozen=True)
class ShardTable:
    """The readable samples of one shard file, in file order."""

    keys: tuple[str, ...]
    labels: np.ndarray  # int64
    image: np.ndarray  # (n, 2) int64: byte offset and size of the image member
    image_ext: tuple[str, ...]
    teacher: np.ndarray  # (n, 2) int64; (-1, 0) where the sample has no teacher.npy
    complete: bool  # False: the file ends early or a header is corrupt (later samples unreachable)
    error: str | None = None


@dataclass
class SampleTable:
    """Every readable sample of a split: sample i lives in `paths[shard[i]]` at `image[i]`."""

    paths: tuple[str, ...]
    shard: np.ndarray  # int64 shard number of each sample
    keys: tuple[str, ...]
    labels: np.ndarray
    image: np.ndarray
    image_ext: tuple[str, ...]
    teacher: np.ndarray
    damage: dict[str, int] = field(default_factory=dict)  # damaged_shards, lost_samples

    def __len__(self) -> int:
        return len(self.keys)


def _sample_key(name: str) -> tuple[str, str]:
    """webdataset's split of a member name into (key, extension): the basename's first dot."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def read_exact(fd: int, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` (os.pread: no shared file position), or EOFError when the file is shorter."""
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise EOFError(f"{size} bytes at {offset}, the file holds {len(data)}")
    return data


class DamagedTar(ValueError):
    """A tar file that cannot be read past some point: a corrupt header or a truncated member."""


_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b" \0").strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise DamagedTar(f"bad number field {field!r}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    records, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] not in (b"", b"\0"):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space]) if space > pos else 0
        except ValueError:
            length = 0
        if length <= space - pos:
            raise DamagedTar("corrupt pax header")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        pos += length
    return records


def tar_members(fd: int, size: int) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, data size) of every regular file of an uncompressed tar, from its headers
    alone (each checked against its checksum); pax (`x`) and GNU long-name (`L`) headers are applied to
    the member they precede. Raises DamagedTar where the archive stops being readable."""
    offset, name_override, size_override = 0, None, None
    while offset + _BLOCK <= size:
        block = os.pread(fd, _BLOCK, offset)
        if block == _ZERO_BLOCK:
            return
        if _octal(block[148:156]) != sum(block[:148]) + 256 + sum(block[156:]):
            raise DamagedTar(f"corrupt tar header at byte {offset} (checksum)")
        kind = block[156:157]
        meta = kind in (b"x", b"g", b"L")
        length = _octal(block[124:136]) if meta or size_override is None else size_override
        data_offset = offset + _BLOCK
        if data_offset + length > size:
            raise DamagedTar(f"truncated: a member at byte {offset} runs past the end of the file")
        if meta:
            data = os.pread(fd, length, data_offset)
            if kind == b"x":
                records = _pax_records(data)
                name_override = records.get("path", name_override)
                size_override = int(records["size"]) if records.get("size", "").isdigit() else None
            elif kind == b"L":
                name_override = data.rstrip(b"\0").decode("utf-8", "replace")
        else:
            if kind in (b"0", b"\0", b"7"):
                name = block[:100].rstrip(b"\0").decode("utf-8", "replace")
                prefix = block[345:500].rstrip(b"\0").decode("utf-8", "replace") if block[257:262] == b"ustar" else ""
                yield name_override or (f"{prefix}/{name}" if prefix else name), data_offset, length
            name_override, size_override = None, None
        offset = data_offset + -(-length // _BLOCK) * _BLOCK
    raise DamagedTar("truncated: the file ends without the tar end-of-archive blocks")


def scan_shard(path: str, classes: int) -> ShardTable:
    """The table of one shard; members past a damage are unreachable and left out (`complete` False)."""
    keys: list[str] = []
    labels: list[int] = []
    image: list[tuple[int, int]] = []
    exts: list[str] = []
    teacher: list[tuple[int, int]] = []
    complete, error = True, None
    try:
        size = os.path.getsize(path)
        fd = os.open(path, os.O_RDONLY)
    except OSError as exn:
        return ShardTable((), np.zeros(0, np.int64), np.zeros((0, 2), np.int64), (), np.zeros((0, 2), np.int64),
                          False, f"cannot open: {exn}")
    current: dict[str, tuple[int, int]] = {}
    current_key: str | None = None

    def close_sample() -> None:
        if current_key is None:
            return
        ext = next((e for e in IMAGE_EXTENSIONS if e in current), None)
        label = None
        if "cls" in current:
            try:
                label = int(read_exact(fd, *current["cls"]).decode("ascii").strip())
            except (ValueError, UnicodeDecodeError, EOFError):
                label = None
        if ext is None or label is None or not 0 <= label < classes:
            return  # counted by the caller as lost (index count minus readable samples)
        keys.append(current_key)
        labels.append(label)
        image.append(current[ext])
        exts.append(ext)
        teacher.append(current.get(TEACHER_FIELD, (-1, 0)))

    try:
        for name, offset, length in tar_members(fd, size):
            key, ext = _sample_key(name)
            if key != current_key:
                close_sample()
                current, current_key = {}, key
            current[ext] = (offset, length)
    except (DamagedTar, OSError, ValueError) as exn:
        complete, error = False, str(exn)
    finally:
        close_sample()  # the members read before a damage still make their sample
        os.close(fd)
    return ShardTable(tuple(keys), np.asarray(labels, np.int64), np.asarray(image, np.int64).reshape(-1, 2),
                      tuple(exts), np.asarray(teacher, np.int64).reshape(-1, 2), complete, error)


CACHE_NAME = ".rct-members.npz"  # beside index.json: the split's table, valid while its shards are unchanged
_tables: dict[tuple, SampleTable] = {}  # this process's tables, by the same signature


def _signature(paths: tuple[str, ...], classes: int) -> tuple:
    stats = []
    for path in paths:
        try:
            stat = os.stat(path)
            stats.append((os.path.basename(path), stat.st_size, stat.st_mtime_ns))
        except OSError:
            stats.append((os.path.basename(path), -1, -1))
    return (classes, tuple(stats))


def _load_cache(file: Path, signature: tuple, paths: tuple[str, ...]) -> SampleTable | None:
    try:
        with np.load(file, allow_pickle=False) as saved:
            if saved["signature"].item() != repr(signature):
                return None
            return SampleTable(paths, saved["shard"], tuple(saved["keys"].tolist()), saved["labels"], saved["image"],
                               tuple(saved["image_ext"].tolist()), saved["teacher"],
                               dict(zip(("damaged_shards", "lost_samples"), saved["damage"].tolist())))
    except (OSError, KeyError, ValueError) as exn:  # absent, or unreadable: it is only a cache
        if file.exists():
            log.warning("ignoring the sample table cache %s (%s); rebuilding it", file, exn)
        return None


def _save_cache(file: Path, signature: tuple, table: SampleTable) -> None:
    temporary = file.with_name(f".{file.name}.tmp-{os.getpid()}.npz")
    try:
        np.savez(temporary, signature=np.array(repr(signature)), shard=table.shard, keys=np.array(table.keys, dtype=str),
                 labels=table.labels, image=table.image, image_ext=np.array(table.image_ext, dtype=str),
                 teacher=table.teacher, damage=np.array([table.damage["damaged_shards"], table.damage["lost_samples"]]))
        os.replace(temporary, file)
    except OSError as exn:  # a read-only data folder: every process builds its own table
        log.info("could not write the sample table cache %s: %s", file, exn)
        temporary.unlink(missing_ok=True)


def build_table(directory: Path, shards: tuple[str, ...], shard_samples: tuple[int, ...], classes: int,
                signature: tuple | None = None, prepare: Callable[[int], Any] | None = None) -> SampleTable:
    """The table of a split (see the module docstring): kept in memory, and in `CACHE_NAME` beside the
    index for later processes, both checked against every shard's size and modification time (or against
    `signature`, for shards that are not all on disk: a remote split's cache). `prepare(i)`, when given,
    makes shard i's file present before it is scanned and returns something with `release()`."""
    paths = tuple(str(directory / name) for name in shards)
    signature = _signature(paths, classes) if signature is None else signature
    key = (str(directory), signature)
    if key in _tables:
        return _tables[key]
    cache = Path(directory) / CACHE_NAME
    table = _load_cache(cache, signature, paths)
    if table is None:
        table = _scan_split(paths, shard_samples, classes, prepare)
        _save_cache(cache, signature, table)
    if any(table.damage.values()):
        log.warning("split %s: %d damaged shard(s), %d sample(s) of index.json unreadable", directory,
                    table.damage["damaged_shards"], table.damage["lost_samples"])
    _tables[key] = table
    return table


def _scan_split(paths: tuple[str, ...], shard_samples: tuple[int, ...], classes: int,
                prepare: Callable[[int], Any] | None = None) -> SampleTable:
    tables = []
    for i, path in enumerate(paths):
        held = prepare(i) if prepare is not None else None
        try:
            tables.append(scan_shard(path, classes))
        finally:
            if held is not None:
                held.release()
    damage = {"damaged_shards": 0, "lost_samples": 0}
    for path, table, announced in zip(paths, tables, shard_samples):
        lost = max(0, announced - len(table.keys))
        if not table.complete or lost:
            damage["damaged_shards"] += int(not table.complete)
            damage["lost_samples"] += lost
            log.warning("shard %s: %d of %d samples readable (%s)", path, len(table.keys), announced,
                        table.error or "samples without a readable image or label")
    return SampleTable(
        paths=paths,
        shard=np.concatenate([np.full(len(t.keys), s, np.int64) for s, t in enumerate(tables)] or [np.zeros(0, np.int64)]),
        keys=tuple(k for t in tables for k in t.keys),
        labels=np.concatenate([t.labels for t in tables] or [np.zeros(0, np.int64)]),
        image=np.concatenate([t.image for t in tables] or [np.zeros((0, 2), np.int64)]),
        image_ext=tuple(e for t in tables for e in t.image_ext),
        teacher=np.concatenate([t.teacher for t in tables] or [np.zeros((0, 2), np.int64)]),
        damage=damage,
    )
