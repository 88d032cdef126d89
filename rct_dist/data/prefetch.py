"""A remote split's shards made local ahead of the batches that read them, in the plan's own order.

The epoch plan says, before the first step, which shards every step of this rank reads. A thread of
the rank's main process walks that list a few steps ahead of training (a whole window ahead, in the
window plan), pins each shard (up to FETCH_THREADS downloads at once) in the node's
cache (`shard_cache.py`: downloaded once per node, never evicted while pinned) and unpins the shards
of steps already trained. The loader's readers, in the main process or in worker processes, only
wait until a shard's file is there: the network can make a step wait (data-wait time), never change
which samples it gets. A fetch that fails for good (after `data.retries`) stops the waiting readers
and is raised by the loader in the main process.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawValue
from pathlib import Path

import numpy as np

from rct_dist.data.shard_cache import Pin, ShardCache, ShardSpec
from rct_dist.data.stores import RemoteStore

log = logging.getLogger(__name__)

FETCH_THREADS = 4  # shards of one step downloaded at once (each large one also in parallel parts)


@dataclass(frozen=True)
class RemoteSplit:
    """A split whose shards live at `store.url`, cached on this node in `folder` (at most `limit` bytes)."""

    store: RemoteStore
    folder: Path
    limit: int | None
    specs: tuple[ShardSpec, ...]

    @property
    def total_bytes(self) -> int | None:
        sizes = [s.size for s in self.specs]
        return None if any(size is None for size in sizes) else sum(sizes)  # type: ignore[misc]

    @property
    def largest_shard(self) -> int:
        return max((s.size or 0) for s in self.specs) if self.specs else 0

    def window_shards(self) -> int | None:
        """Shards per window when the split does not fit the cache (None: it fits, the usual plan).
        Two windows (the one being trained and the next being fetched) fit the limit together."""
        total = self.total_bytes
        if self.limit is None or total is None or total <= self.limit:
            return None
        return max(1, self.limit // (2 * max(self.largest_shard, 1)))

    def pin_cap(self, window: int | None) -> int | None:
        """Bytes a process may pin: two windows' (window plan: the one trained and the next one fetched),
        half the cache when the split does not fit it (eval reads such a split in order), else no cap."""
        if window:
            return 2 * window * self.largest_shard
        total = self.total_bytes
        if self.limit is not None and (total is None or total > self.limit):
            return max(self.limit // 2, self.largest_shard)
        return None

    def cache(self) -> ShardCache:
        return ShardCache(self.store, self.folder, self.limit)


class FetchFailed(RuntimeError):
    """Raised in a loader worker waiting for a shard after the main process's prefetcher failed."""


def wait_for(path: str, failed: RawValue, poll: float = 0.02) -> None:
    """Block until the prefetcher has put `path` in the cache (or has failed: FetchFailed)."""
    while not os.path.exists(path):
        if failed.value:
            raise FetchFailed(f"{path}: not fetched: the shard prefetcher failed (its error follows in the main "
                              "process)")
        time.sleep(poll)


class Prefetcher:
    """Pins the shards of steps [consumed, consumed + lookahead) of one epoch plan, in step order."""

    def __init__(self, remote: RemoteSplit, step_shards: list[np.ndarray], lookahead: int,
                 pinned_bytes: int | None = None):
        self.remote, self.step_shards, self.lookahead = remote, step_shards, max(1, lookahead)
        self.pinned_bytes = pinned_bytes  # cap on the bytes pinned ahead (the current step is always fetched)
        self.failed = RawValue("b", 0)  # shared with forked loader workers
        self.error: BaseException | None = None
        self._consumed = 0
        self._cv = threading.Condition()
        self._pins: dict[int, Pin] = {}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="shard-fetch")
        self.cache: ShardCache | None = None

    def start(self) -> None:
        if self._thread is None:
            self.cache = self.remote.cache()
            self._thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
            self._thread.start()

    def consumed(self, steps: int) -> None:
        """Steps [0, steps) are trained: their shards may be unpinned."""
        with self._cv:
            self._consumed = steps
            self._cv.notify_all()

    def ready(self, step: int, timeout: float | None = None) -> bool:
        """Wait until every shard of `step` is pinned (True), the prefetcher failed or the timeout passed."""
        need = set(self.step_shards[step].tolist()) if step < len(self.step_shards) else set()
        with self._cv:
            return self._cv.wait_for(lambda: need <= self._pins.keys() or self.error is not None, timeout)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._pool.shutdown(wait=True)
        for pin in self._pins.values():
            pin.release()
        self._pins.clear()

    def _size(self, shard: int) -> int:
        return self.remote.specs[shard].size or 0

    def _run(self) -> None:
        try:
            for step, shards in enumerate(self.step_shards):
                with self._cv:
                    # Wait until the step is within the lookahead (and within the pinned-bytes cap), then drop
                    # pins no step from `consumed` on still needs.
                    def room() -> bool:
                        if self._stop:
                            return True
                        if step >= self._consumed + self.lookahead:
                            return False
                        if self.pinned_bytes is None or step <= self._consumed:
                            return True
                        extra = sum(self._size(s) for s in set(shards.tolist()) - self._pins.keys())
                        return sum(self._size(s) for s in self._pins) + extra <= self.pinned_bytes
                    while not room():
                        self._unpin_done()
                        if room():
                            break
                        self._cv.wait(0.5)
                    if self._stop:
                        return
                    self._unpin_done()
                missing = [shard for shard in dict.fromkeys(shards.tolist()) if shard not in self._pins]
                for shard, pin in zip(missing, self._pool.map(lambda i: self.cache.pin(self.remote.specs[i]), missing)):
                    with self._cv:
                        self._pins[shard] = pin
                        self._cv.notify_all()
        except BaseException as exn:  # noqa: BLE001 - raised again by the loader in the main process
            log.error("shard prefetch failed: %s", exn)
            with self._cv:
                self.error = exn
                self.failed.value = 1
                self._cv.notify_all()

    def _unpin_done(self) -> None:
        """Unpin shards no step from `consumed` to the prefetcher's position needs (lock held)."""
        upcoming = self.step_shards[self._consumed:self._consumed + self.lookahead]
        still = set(np.concatenate(upcoming).tolist()) if len(upcoming) else set()
        for shard in [s for s in self._pins if s not in still]:
            self._pins.pop(shard).release()
