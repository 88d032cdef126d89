"""A split's index, wherever the split lives: the one place a shard's location is resolved.

`load_index(location, cache)` takes a local folder or a URL (`stores.py`) and returns a `ShardIndex`
whose `directory` is always local: the folder itself, or the node-local cache folder of a remote
split (`index.remote` then says where the shards come from and how they are cached). Everything above
(the sample table, the plan, the loader's readers) reads local files only.

Splits written by other tools (webdataset tar shards with an image and a `cls` member per sample, no
`index.json`) are indexed from their tar headers on first use: one pass over the shards (downloading
them through the cache for a remote split), the class count taken from the labels, the result kept in
`.rct-index.json` beside the shards (local, when writable) or in the cache folder, keyed by every
shard's name and size (and modification time, locally) so that a changed folder is indexed again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rct_dist.data.members import CACHE_NAME, SampleTable, build_table, scan_shard
from rct_dist.data.prefetch import RemoteSplit
from rct_dist.data.shard_cache import ShardSpec
from rct_dist.data.stores import MissingObject, RemoteStore, is_remote, join

log = logging.getLogger(__name__)

INDEX_FORMAT = "rct-dist-shards/1"
INDEX = "index.json"
FOREIGN_INDEX = ".rct-index.json"
MEMBERS = CACHE_NAME  # the sample table, beside the index (make-shards --out URL uploads it)
_NO_CLASS_LIMIT = 1 << 62


@dataclass(frozen=True)
class CacheSettings:
    """Where a node keeps remote shards (`data.cache_dir`, `data.cache_limit`, `data.retries`)."""

    folder: str | None = None  # None: $RCT_DIST_CACHE, else ~/.cache/rct-dist/shards
    limit: int | None = None  # bytes; None: no limit
    retries: int = 5

    def root(self) -> Path:
        chosen = self.folder or os.environ.get("RCT_DIST_CACHE") or "~/.cache/rct-dist/shards"
        return Path(os.path.expandvars(chosen)).expanduser()

    def split_folder(self, url: str) -> Path:
        """One folder per split URL: readable, and unique by a hash of the whole URL."""
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1]).strip("_")[-80:]
        return self.root() / f"{slug}-{hashlib.sha256(url.encode()).hexdigest()[:10]}"


@dataclass(frozen=True)
class ShardIndex:
    """The index of one split: shard file names and their sample counts (see the module docstring)."""

    directory: Path  # local: holds the shards (or, for a remote split, their cache)
    split: str
    shards: tuple[str, ...]
    shard_samples: tuple[int, ...]
    classes: int
    class_names: tuple[str, ...]
    teacher_dim: int | None = None  # size of the samples' stored teacher embeddings, if they carry one
    remote: RemoteSplit | None = None
    location: str = ""  # as given: a local path or a URL

    @property
    def samples(self) -> int:
        return sum(self.shard_samples)

    @classmethod
    def load(cls, path: str | os.PathLike, cache: CacheSettings | None = None) -> ShardIndex:
        return load_index(path, cache)


def _parse(meta: dict, where: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    if meta.get("format") != INDEX_FORMAT:
        raise ValueError(f"{where}: format {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
    shards, counts = tuple(meta["shards"]), tuple(int(n) for n in meta["shard_samples"])
    if len(shards) != len(counts) or sum(counts) != meta["samples"]:
        raise ValueError(f"{where}: shard_samples do not match shards / samples")
    for key in ("shard_bytes", "shard_sha256"):
        if key in meta and len(meta[key]) != len(shards):
            raise ValueError(f"{where}: {key} has {len(meta[key])} entries for {len(shards)} shards")
    return shards, counts


def _teacher_dim(meta: dict) -> int | None:
    teacher = meta.get("teacher")
    return int(teacher["dim"]) if teacher else None


def load_index(location: str | os.PathLike, cache: CacheSettings | None = None) -> ShardIndex:
    """The index of the split at `location` (a folder or index file, or a URL); see the module docstring."""
    if is_remote(location):
        return _remote_index(str(location), cache or CacheSettings())
    path = Path(location)
    index_file = path / INDEX if path.is_dir() else path
    if not index_file.is_file():
        if path.is_dir() and any(p.suffix == ".tar" for p in path.iterdir()):
            return _local_foreign_index(path)
        raise FileNotFoundError(f"no shard index at {index_file}: write the split's shards first (rct-dist "
                                "make-shards), or point at a folder of webdataset .tar shards")
    meta = json.loads(index_file.read_text())
    shards, counts = _parse(meta, str(index_file))
    directory = index_file.parent
    missing = [s for s in shards if not (directory / s).is_file()]
    if missing:
        raise FileNotFoundError(f"{index_file} lists {len(missing)} missing shard(s): {missing[:5]}")
    return ShardIndex(directory, meta["split"], shards, counts, int(meta["classes"]), tuple(meta["class_names"]),
                      _teacher_dim(meta), None, str(location))


# -- splits of other tools: tar shards without index.json ------------------------------------------------------

def _foreign_meta(split: str, names: list[str], tables: list) -> dict:
    labels = [int(label) for table in tables for label in table.labels]
    if not labels:
        raise ValueError(f"split {split!r}: no sample with an image (png/jpg/jpeg/webp) and an integer `cls` member "
                         f"in its {len(names)} tar file(s)")
    classes = max(labels) + 1
    return {"format": INDEX_FORMAT, "split": split, "shards": names, "shard_samples": [len(t.keys) for t in tables],
            "samples": len(labels), "classes": classes, "class_names": [str(c) for c in range(classes)],
            "source": "webdataset tar shards (indexed from their headers)"}


def _local_foreign_index(folder: Path) -> ShardIndex:
    names = sorted(p.name for p in folder.iterdir() if p.suffix == ".tar" and p.is_file())
    stats = [[n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns] for n in names]
    cached = folder / FOREIGN_INDEX
    meta = _read_json(cached)
    if meta is None or meta.get("signature") != stats:
        log.info("%s has no index.json: indexing its %d tar shard(s) from their headers", folder, len(names))
        meta = {**_foreign_meta(folder.name, names, [scan_shard(str(folder / n), _NO_CLASS_LIMIT) for n in names]),
                "signature": stats}
        _write_json(cached, meta)
    shards, counts = _parse(meta, str(folder))
    return ShardIndex(folder, meta["split"], shards, counts, meta["classes"], tuple(meta["class_names"]), None,
                      None, str(folder))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, meta: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        temporary.write_text(json.dumps(meta), encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exn:  # a read-only folder: indexed again by the next process
        log.info("could not keep the index of the tar shards in %s: %s", path, exn)
        temporary.unlink(missing_ok=True)


# -- remote splits ----------------------------------------------------------------------------------------------

def _remote_index(url: str, cache: CacheSettings) -> ShardIndex:
    store = RemoteStore(url, retries=cache.retries)
    folder = cache.split_folder(url)
    folder.mkdir(parents=True, exist_ok=True)
    split = url.rstrip("/").rsplit("/", 1)[-1]
    try:
        meta = json.loads(store.read(INDEX))
        shards, counts = _parse(meta, store.object_url(INDEX))
        sizes = meta.get("shard_bytes")
        if sizes is None:  # an index of an earlier release or another copy: sizes from the store
            sizes = _sizes(store, shards)
        digests = meta.get("shard_sha256") or [None] * len(shards)
    except MissingObject:
        meta, shards, counts, sizes, digests = _remote_foreign_meta(store, folder, cache, split)
    specs = tuple(ShardSpec(name, int(size), digest) for name, size, digest in zip(shards, sizes, digests))
    _write_json(folder / f".{INDEX}", meta)  # for the curious (loads always read the store's); not a shard
    remote = RemoteSplit(store, folder, cache.limit, specs)
    return ShardIndex(folder, meta["split"], shards, counts, int(meta["classes"]), tuple(meta["class_names"]),
                      _teacher_dim(meta), remote, url)


def _sizes(store: RemoteStore, names: list[str] | tuple[str, ...]) -> list[int]:
    """Each object's size: from one listing where it gives sizes (S3, GCS), else one HEAD each (HTTP)."""
    try:
        listing = store.list()
    except Exception:  # noqa: BLE001 - an HTTP server without a directory listing: HEAD each
        listing = {}
    return [listing.get(name) or store.size(name) for name in names]


def _remote_foreign_meta(store: RemoteStore, folder: Path, cache: CacheSettings, split: str):
    try:
        listing = store.list()
    except MissingObject:
        listing = {}
    names = sorted(n for n in listing if n.endswith(".tar"))
    if not names and (bucket := store.missing_bucket()):
        endpoint = " and the endpoint (AWS_ENDPOINT_URL)" if store.scheme == "s3" else ""
        raise MissingObject(f"{store.url}: bucket {bucket!r} does not exist (404): check data.root (or --out){endpoint}")
    if not names:
        raise FileNotFoundError(f"no shard index at {store.object_url(INDEX)} and no .tar shards under {store.url}: "
                                "write the split's shards first (rct-dist make-shards --out URL)")
    sizes = dict(zip(names, _sizes(store, names)))
    signature = [[n, sizes[n]] for n in names]
    meta = _read_json(folder / FOREIGN_INDEX)
    if meta is None or meta.get("signature") != signature:
        log.info("%s has no index.json: indexing its %d tar shard(s) from their headers (one download each)",
                 store.url, len(names))
        specs = [ShardSpec(n, sizes[n]) for n in names]
        shard_cache = RemoteSplit(store, folder, cache.limit, tuple(specs)).cache()
        tables = []
        for spec in specs:
            pin = shard_cache.pin(spec)
            try:
                tables.append(scan_shard(str(folder / spec.name), _NO_CLASS_LIMIT))
            finally:
                pin.release()
        meta = {**_foreign_meta(split, names, tables), "signature": signature}
        _write_json(folder / FOREIGN_INDEX, meta)
    shards, counts = _parse(meta, store.url)
    return meta, shards, counts, _sizes(store, shards), [None] * len(shards)


def window_shards(index: ShardIndex) -> int | None:
    """Shards per window of the train plan: None unless a remote split is larger than its cache limit."""
    return index.remote.window_shards() if index.remote is not None else None


def content_signature_of(classes: int, specs: Sequence[ShardSpec]) -> tuple:
    """What identifies a remote split's shards: names, sizes and checksums from its index (no mtimes)."""
    return ("content", classes, tuple((s.name, s.size, s.sha256) for s in specs))


def content_signature(index: ShardIndex) -> tuple:
    assert index.remote is not None
    return content_signature_of(index.classes, index.remote.specs)


def sample_table(index: ShardIndex) -> SampleTable:
    """Where every readable sample of the split lies (scanned once per process per unchanged shard; a remote
    split's table comes from the store when make-shards put it there, else from one pass through the cache)."""
    if index.remote is None:
        return build_table(index.directory, index.shards, index.shard_samples, index.classes)
    remote = index.remote
    signature = content_signature(index)
    members = index.directory / MEMBERS
    if not members.exists():
        try:
            data = remote.store.read(MEMBERS)
            members.with_name(f".{MEMBERS}.tmp-{os.getpid()}").write_bytes(data)
            os.replace(members.with_name(f".{MEMBERS}.tmp-{os.getpid()}"), members)
        except MissingObject:
            pass
    shard_cache = remote.cache()

    def local(i: int):
        return shard_cache.pin(remote.specs[i])

    return build_table(index.directory, index.shards, index.shard_samples, index.classes, signature=signature,
                       prepare=local)


def split_location(root: str, split: str) -> str:
    """Where split `split` of `data.root` lives: a local path (an absolute `split` stands alone) or a URL."""
    return join(root, split) if root else split


def cache_settings(data: Any) -> CacheSettings:
    """The cache settings of a config's data section (anything with cache_dir, cache_limit and retries)."""
    return CacheSettings(data.cache_dir, data.cache_limit, data.retries)
