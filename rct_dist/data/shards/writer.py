"""Shard and index writing: worker processes write whole shards, every file appears atomically under its name.

A shard is written to `.{name}.tmp-{pid}` in its own folder and `os.replace`d, so a crash never leaves a
half-written file under a final name; `index.json` is written last the same way, so its presence means the
split is complete. Runs into the same split folder must not overlap (temp files of other runs are deleted).
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import re
import sys
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TypeVar

from tqdm import tqdm
from webdataset import TarWriter

from rct_dist.atomic import atomic_write, file_sha256, is_temp_name
from rct_dist.data.shards.images import CorruptImage
from rct_dist.data.shards.plan import Sample, SplitPlan

FORMAT = "rct-dist-shards/1"
INDEX = "index.json"
log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
ShardTask = tuple[Path, list[Sample]]
ShardResult = tuple[str, int, list[dict[str, str]]]


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def is_shard_name(split: str, name: str) -> bool:
    return re.fullmatch(rf"{re.escape(split)}-\d{{6}}\.tar", name) is not None


def write_shard(task: ShardTask) -> ShardResult:
    """Encode and write one shard; unreadable images are skipped and returned as {source, error}."""
    path, samples = task
    skipped: list[dict[str, str]] = []

    def fill(stream: BinaryIO) -> None:
        sink = TarWriter(stream, mtime=0.0)  # fixed mtime: same input, byte-identical shards
        try:
            for sample in samples:
                try:
                    ext, data = sample.image.encode()
                except CorruptImage as error:
                    skipped.append({"source": sample.source, "error": str(error)})
                    continue
                meta = {"class": sample.class_name, "source": sample.source}
                sink.write(
                    {
                        "__key__": sample.key,
                        ext: data,
                        "cls": str(sample.label).encode("ascii"),
                        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
                    }
                )
        finally:
            sink.close()  # also on failure: an unclosed tar stream would write into the closed temp file later

    atomic_write(path, fill)
    return path.name, len(samples) - len(skipped), skipped


def parallel_map(fn: Callable[[T], R], tasks: list[T], workers: int) -> Iterator[R]:
    """Results in completion order; in-process for one worker or one task (no fork cost for tiny splits)."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    with multiprocessing.Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(fn, tasks)


def read_index(split_dir: Path) -> dict | None:
    """The split's index; None when absent, {} when unreadable (not ours: treated as made with other arguments)."""
    try:
        return json.loads((split_dir / INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def same_args(index: dict, args: dict) -> bool:
    return index.get("format") == FORMAT and index.get("made_by", {}).get("args") == args


def has_all_shards(index: dict, split_dir: Path) -> bool:
    return all((split_dir / name).is_file() for name in index["shards"])


def clean_temp_files(split_dir: Path) -> None:
    for path in split_dir.glob(".*.tmp-*"):
        if is_temp_name(path.name):
            path.unlink(missing_ok=True)


def remove_split(split_dir: Path, split: str) -> None:
    """Delete a split's index (first: the folder then reads as unfinished), shards and temp files; the folder too
    when nothing else is left in it."""
    (split_dir / INDEX).unlink(missing_ok=True)
    clean_temp_files(split_dir)
    for path in split_dir.iterdir():
        if is_shard_name(split, path.name):
            path.unlink()
    if not any(split_dir.iterdir()):
        split_dir.rmdir()


def write_split(plan: SplitPlan, split_dir: Path, shard_size: int, workers: int, made_by: dict, source: str) -> dict:
    """Write all shards of a split, drop shards of an earlier run beyond the new count, then write the index."""
    split_dir.mkdir(parents=True, exist_ok=True)
    clean_temp_files(split_dir)
    (split_dir / INDEX).unlink(missing_ok=True)  # from here on the folder is "unfinished" until the new index lands
    starts = range(0, len(plan.samples), shard_size)
    tasks = [(split_dir / shard_name(plan.split, i), plan.samples[s : s + shard_size]) for i, s in enumerate(starts)]
    results: list[ShardResult] = []
    with tqdm(total=len(plan.samples), desc=plan.split, unit="img", file=sys.stderr, disable=None) as bar:
        for result in parallel_map(write_shard, tasks, workers):
            results.append(result)
            bar.update(result[1] + len(result[2]))
    results.sort()
    names = {name for name, _, _ in results}
    for path in split_dir.iterdir():
        if is_shard_name(plan.split, path.name) and path.name not in names:
            path.unlink()
    skipped = [entry for _, _, entries in results for entry in entries]
    for entry in skipped:
        log.warning("skipped unreadable image %s", entry["error"])
    samples = sum(count for _, count, _ in results)
    if samples == 0:
        raise ValueError(f"split {plan.split!r}: every image was unreadable ({len(skipped)} skipped)")
    names = [name for name, _, _ in results]
    index = {
        "format": FORMAT,
        "split": plan.split,
        "shards": names,
        "shard_samples": [count for _, count, _ in results],
        # What a download of each shard from object storage is checked against (rct_dist/data/shard_cache.py).
        "shard_bytes": [(split_dir / name).stat().st_size for name in names],
        "shard_sha256": [file_sha256(split_dir / name) for name in names],
        "samples": samples,
        "classes": len(plan.class_names),
        "class_names": plan.class_names,
        "source": source,
        "made_by": made_by,
        "skipped": skipped,
    }
    text = json.dumps(index, indent=1, ensure_ascii=False).encode("utf-8")
    atomic_write(split_dir / INDEX, lambda stream: stream.write(text))
    return index


def summarize(index: dict, status: str) -> dict:
    return {
        "status": status,
        "samples": index["samples"],
        "classes": index["classes"],
        "shards": len(index["shards"]),
        "skipped": len(index.get("skipped", [])),
    }
