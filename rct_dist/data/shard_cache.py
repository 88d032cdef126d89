"""A node-local cache of whole shards downloaded from a remote split, shared by every process of the node.

Files: `{folder}/{shard}` (complete and checked), `{folder}/.locks/{shard}.lock` (one lock file per
shard), `{folder}/.{shard}.part-{pid}-{n}-{bytes}` (a download in progress, counted at its final size);
`folder` is one split's folder under
the cache root (`data.cache_dir`), and the limit holds for the whole root: every split's shards count,
and any unpinned one may be evicted.

* One download per shard per node, whatever the number of ranks and loader workers: a process takes
  the shard's lock exclusively (`flock`), downloads only when the file is absent, and the others wait
  on the lock and then find the file.
* A download goes to a temporary name, its size (and SHA-256 when the index has one) is checked, and
  only then is it renamed into place; a short or corrupt download is fetched again (`refetch_attempts`).
* A process *pins* each shard its next batches need by holding a shared lock on it (the prefetcher
  takes and drops pins as the plan moves on). Eviction takes the exclusive lock without waiting, so a
  pinned shard, in this process or any other of the node, is never evicted; locks die with their
  process, so a killed rank leaves no stale pin.
* Least recently used first: a shard's modification time is set to now whenever it is pinned.
  Eviction runs before each download, until the cache, the downloads in progress and the new shard
  fit `limit` bytes (one reservation at a time for the whole cache root, so parallel downloads of
  threads and ranks count each other); when every cached shard is pinned the cache grows past the
  limit and says so once.
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rct_dist.atomic import file_sha256
from rct_dist.data.stores import RemoteStore, StoreError

log = logging.getLogger(__name__)

LOCKS = ".locks"
ROOT_LOCK = ".reserve.lock"  # in the cache root: reservations for downloads are made one at a time
PART = ".part-"  # `.{shard}.part-{pid}-{n}-{bytes}`: a download in progress, and the bytes it will take
_counter = itertools.count()


class CorruptDownload(StoreError):
    """A downloaded object whose size or checksum differs from the index's, after every refetch."""


@dataclass(frozen=True)
class ShardSpec:
    """What the index says of one shard: its name, and the size and checksum a download must have."""

    name: str
    size: int | None = None
    sha256: str | None = None


@dataclass
class CacheStats:
    downloads: int = 0
    downloaded_bytes: int = 0
    refetches: int = 0  # downloads that failed their size or checksum check and were fetched again
    evictions: int = 0
    wait_seconds: float = 0.0  # time spent waiting for a shard (download or another process's lock)


class Pin:
    """A shared lock on one cached shard: while it is held, no process of the node evicts the shard."""

    def __init__(self, fd: int, name: str):
        self.fd, self.name = fd, name

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = -1

    def __del__(self) -> None:
        self.release()


@dataclass
class ShardCache:
    """Shards of one remote split in a local folder, at most `limit` bytes (None: no limit)."""

    store: RemoteStore
    folder: Path
    limit: int | None = None
    refetch_attempts: int = 2
    stats: CacheStats = field(default_factory=CacheStats)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        (self.folder / LOCKS).mkdir(parents=True, exist_ok=True)
        self._warned_full = False
        self._lock = threading.Lock()

    def path(self, name: str) -> Path:
        return self.folder / name

    def _lock_fd(self, name: str, folder: Path | None = None) -> int:
        return os.open((folder or self.folder) / LOCKS / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    def pin(self, spec: ShardSpec) -> Pin:
        """The shard present in the cache and pinned (downloaded first if absent); blocks until then."""
        started = time.perf_counter()
        fd = self._lock_fd(spec.name)
        path = self.path(spec.name)
        try:
            while True:
                # Shared first: a complete shard needs no more (and a shared lock held by this process, or
                # inherited by a forked loader worker, never blocks it). Exclusive only to download.
                fcntl.flock(fd, fcntl.LOCK_SH)
                if self._complete(path, spec):
                    break
                fcntl.flock(fd, fcntl.LOCK_UN)  # two processes upgrading at once would wait on each other
                fcntl.flock(fd, fcntl.LOCK_EX)
                if not self._complete(path, spec):
                    self._download(spec, path, self._reserve(spec))
                # The conversion to shared is not atomic: an evictor may slip in; the loop then fetches again.
        except BaseException:
            os.close(fd)
            raise
        try:
            os.utime(path)  # most recently used
        except FileNotFoundError:
            pass
        with self._lock:
            self.stats.wait_seconds += time.perf_counter() - started
        return Pin(fd, spec.name)

    @staticmethod
    def _complete(path: Path, spec: ShardSpec) -> bool:
        try:
            return spec.size is None or path.stat().st_size == spec.size
        except FileNotFoundError:
            return False

    def _reserve(self, spec: ShardSpec) -> Path:
        """Room for one download, and its temporary file, whose name holds the size it will have: made under
        one lock for the whole cache root, so that downloads running at once (threads, ranks) each count
        the others' reservations and together stay under the limit."""
        fd = os.open(self.folder.parent / ROOT_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._make_room(spec.size or 0, keep=spec.name)
            temporary = self.folder / f".{spec.name}{PART}{os.getpid()}-{next(_counter)}-{spec.size or 0}"
            temporary.touch()
            return temporary
        finally:
            os.close(fd)

    def _download(self, spec: ShardSpec, path: Path, temporary: Path) -> None:
        try:
            for attempt in range(self.refetch_attempts + 1):
                written = self.store.download(spec.name, temporary, spec.size)
                problem = None
                if spec.size is not None and written != spec.size:
                    problem = f"{written} bytes, the index says {spec.size}"
                elif spec.sha256 is not None and (digest := file_sha256(temporary)) != spec.sha256:
                    problem = f"SHA-256 {digest[:12]}..., the index says {spec.sha256[:12]}..."
                if problem is None:
                    os.replace(temporary, path)
                    with self._lock:
                        self.stats.downloads += 1
                        self.stats.downloaded_bytes += written
                    return
                with self._lock:
                    self.stats.refetches += 1
                log.warning("%s: corrupt download (%s); fetching it again (%d of %d)",
                            self.store.object_url(spec.name), problem, attempt + 1, self.refetch_attempts)
            raise CorruptDownload(f"{self.store.object_url(spec.name)}: every download differs from the index "
                                  f"({problem}): the object was changed or damaged after its index was written")
        finally:
            temporary.unlink(missing_ok=True)

    def cached(self, reserved: bool = False) -> list[tuple[float, int, Path]]:
        """(last use, size, path) of every complete shard of every split under the cache root, oldest first;
        with `reserved`, also the downloads in progress (at the size they will have)."""
        entries = []
        for folder in self.folder.parent.iterdir():
            if not (folder / LOCKS).is_dir():
                continue  # not a split's cache folder
            for entry in os.scandir(folder):
                if not entry.is_file():
                    continue
                if reserved and PART in entry.name:
                    entries.append((float("inf"), int(entry.name.rsplit("-", 1)[1]), Path(entry.path)))
                elif not entry.name.startswith("."):
                    try:
                        stat = entry.stat()
                    except FileNotFoundError:
                        continue
                    entries.append((stat.st_mtime, stat.st_size, Path(entry.path)))
        return sorted(entries)

    def used_bytes(self) -> int:
        return sum(size for _, size, _ in self.cached())

    def _make_room(self, incoming: int, keep: str) -> None:
        """Evict unpinned shards, least recently used first, until the cache plus `incoming` fit the limit."""
        if self.limit is None:
            return
        entries = self.cached(reserved=True)
        used = sum(size for _, size, _ in entries)
        for _, size, path in entries:
            if used + incoming <= self.limit:
                return
            if (path.name == keep and path.parent == self.folder) or PART in path.name:
                continue  # a download in progress is never evicted
            fd = self._lock_fd(path.name, path.parent)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)  # pinned by some process of this node
                continue
            try:
                path.unlink(missing_ok=True)
                used -= size
                with self._lock:
                    self.stats.evictions += 1
            finally:
                os.close(fd)
        if used + incoming > self.limit and not self._warned_full:
            self._warned_full = True
            log.warning("shard cache %s: %d bytes pinned by the coming batches leave no room under data.cache_limit "
                        "%d; it grows past the limit (raise data.cache_limit)", self.folder, used + incoming, self.limit)
