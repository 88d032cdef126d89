"""Loader over the shards of a split: an exact, seeded plan per epoch, read by byte offset.

Every rank builds the same sample table (`members.py`: where each sample lies, from tar headers) and
the same epoch plan (`epoch_plan.py`: a global sequence of batches from (seed, epoch) alone), so
ranks agree without communicating and:

* DDP never hangs on uneven data: every rank yields the same number of full batches;
* eval reads each readable sample exactly once across ranks (padding rows flagged `valid=False`:
  drop them before gathering embeddings);
* the samples an epoch sees, in order, do not depend on the world size or the worker count, and a
  mid-epoch resume (`start_samples`) starts at its point without reading anything before it;
* every augmentation draws from a stream seeded by (seed, epoch, unit, slot), in the main process or
  in any worker, so a resumed run sees exactly the crops and flips of the uninterrupted one.

Workers (`workers`) each build whole batches (the DataLoader hands out batch numbers round-robin and
returns them in order). Members other than the image, `cls` and `teacher.npy` are never read, so a
shard cannot make the loader unpickle anything; a stored teacher embedding is decoded with
`np.load(..., allow_pickle=False)`.

Damaged data neither stops training nor passes silently; per kind, in `ShardLoader.skipped`, logged at
the end of every epoch (the trainer also writes them to TensorBoard and results.jsonl):

* `damaged_shards`, `lost_samples`: shards that end early or hold a corrupt header, and the samples
  their index announced that cannot be reached (or have no readable image or label), found when the
  table is built;
* `bad_images`: images (or stored teacher embeddings) that fail to decode. In training the slot takes
  another image of the same batch (of the same class when there is one) with its own augmentation,
  so batches stay full and P x K; in eval the row is flagged invalid.

`decode="gpu"` (train only) leaves images encoded: batches carry a list of the samples' raw bytes
in place of the image tensor, for `rct_dist.data.transforms.DeviceDecode` to decode and augment on
the GPU. It needs CUDA and is refused without it.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import signal
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from rct_dist.data.batch import Batch
from rct_dist.data.epoch_plan import EpochPlan, augment_seed, plan_epoch
from rct_dist.data.members import TEACHER_FIELD, SampleTable, read_exact
from rct_dist.data.prefetch import FetchFailed, Prefetcher, wait_for
from rct_dist.data.splits import INDEX_FORMAT, CacheSettings, ShardIndex, sample_table, window_shards
from rct_dist.data.transforms import build_transform
from rct_dist.distributed.collectives import world_rank, world_size

log = logging.getLogger(__name__)

SKIP_KINDS = ("damaged_shards", "lost_samples", "bad_images")

__all__ = ["INDEX_FORMAT", "SKIP_KINDS", "TEACHER_FIELD", "Batch", "CacheSettings", "EpochPlan", "ShardIndex",
           "ShardLoader", "collate",
           "decode_teacher", "make_loader", "sample_table"]


class BadImageCounter:
    """Images that failed to decode, one shared-memory slot per worker (each writes only its own)."""

    def __init__(self, workers: int):
        self._counts = RawArray("q", max(workers, 1))

    def add(self) -> None:
        info = get_worker_info()
        self._counts[info.id if info is not None else 0] += 1

    def per_worker(self) -> list[int]:
        return list(self._counts)

    def total(self) -> int:
        return sum(self._counts)

    def reset(self) -> None:
        self._counts[:] = [0] * len(self._counts)


class Views:
    """k independent augmentations of one image, stacked to (k, 3, H, W); k = 1 gives (3, H, W)."""

    def __init__(self, transform: Callable[[Any], torch.Tensor], k: int):
        self.transform, self.k = transform, k

    def __call__(self, image: Any) -> torch.Tensor:
        if self.k == 1:
            return self.transform(image)
        return torch.stack([self.transform(image) for _ in range(self.k)])


def decode_teacher(data: bytes) -> torch.Tensor:
    """A stored teacher embedding: one float32 vector in .npy bytes, never unpickled."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    if array.dtype != np.float32 or array.ndim != 1:
        raise ValueError(f"{TEACHER_FIELD} must hold a 1-D float32 array, got {array.dtype} {array.shape}")
    return torch.from_numpy(array)


def collate(images: Sequence[Any], labels: Sequence[int], keys: Sequence[str],
            teacher: Sequence[torch.Tensor] | None = None, valid: Sequence[bool] | None = None) -> Batch:
    """Per-sample fields -> a Batch: images stacked (encoded bytes stay a list), labels and flags as tensors."""
    return Batch(
        images=list(images) if isinstance(images[0], bytes) else torch.stack(list(images)),
        labels=torch.tensor(list(labels), dtype=torch.int64),
        keys=list(keys),
        teacher=None if teacher is None else torch.stack(list(teacher)),
        valid=None if valid is None else torch.tensor(list(valid), dtype=torch.bool),
    )


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Python's and torch's CPU generators seeded for a block, then restored (timm's crops draw from
    `random`, torchvision's flips from torch)."""
    py_state, torch_state = random.getstate(), torch.random.default_generator.get_state()
    random.seed(seed)
    torch.random.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        random.setstate(py_state)
        torch.random.default_generator.set_state(torch_state)


class _Files:
    """Open shard files of this process, read with `os.pread` (no shared file position). At most `OPEN`
    stay open (a cached remote shard may be evicted: its space returns once no reader holds it). With
    `failed` (a remote split's prefetcher flag), a file not there yet is waited for."""

    OPEN = 32

    def __init__(self, failed: Any = None) -> None:
        self._fds: OrderedDict[tuple[int, str], int] = OrderedDict()
        self.failed = failed

    def _open(self, path: str) -> int:
        while True:
            if self.failed is not None:
                wait_for(path, self.failed)
            try:
                return os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                if self.failed is None:
                    raise  # a local file: gone is gone (evicted cache files are fetched again)

    def read(self, path: str, offset: int, size: int) -> bytes:
        key = (os.getpid(), path)
        if key in self._fds:
            self._fds.move_to_end(key)
        else:
            self._fds[key] = self._open(path)
            while len(self._fds) > self.OPEN:
                (pid, _), fd = self._fds.popitem(last=False)
                if pid == os.getpid():
                    os.close(fd)
        try:
            return read_exact(self._fds[key], offset, size)
        except EOFError as exn:
            raise EOFError(f"{path}: {exn}") from None

    def __getstate__(self) -> dict:
        return {"_fds": OrderedDict(), "failed": self.failed}  # descriptors do not travel to workers

    def __del__(self) -> None:
        for (pid, _), fd in self._fds.items():
            if pid == os.getpid():
                os.close(fd)


class EpochBatches(Dataset):
    """Batch s of this rank's plan, built whole (images decoded and augmented, seeded per slot)."""

    def __init__(self, table: SampleTable, plan: EpochPlan, *, seed: int, epoch: int, train: bool,
                 transform: Callable[[Any], torch.Tensor], teacher_embeddings: bool, encoded: bool,
                 bad_images: BadImageCounter, failed: Any = None) -> None:
        self.table, self.plan, self.seed, self.epoch, self.train = table, plan, seed, epoch, train
        self.transform, self.teacher_embeddings, self.encoded = transform, teacher_embeddings, encoded
        self.bad_images, self.files = bad_images, _Files(failed)

    def __len__(self) -> int:
        return self.plan.steps

    def _load(self, i: int) -> tuple[Any, torch.Tensor | None] | None:
        """(PIL image or encoded bytes, teacher embedding or None) of sample i, or None when unreadable."""
        t = self.table
        path = t.paths[t.shard[i]]
        try:
            data = self.files.read(path, *map(int, t.image[i]))
            teacher = None
            if self.teacher_embeddings:
                offset, size = map(int, t.teacher[i])
                if offset < 0:
                    raise ValueError(f"sample {t.keys[i]} has no {TEACHER_FIELD}")
                teacher = decode_teacher(self.files.read(path, offset, size))
            if self.encoded:
                return data, teacher
            image = Image.open(io.BytesIO(data))
            image.load()
            return image, teacher
        except FetchFailed:
            raise  # the network, not the sample: the loader raises the prefetcher's error
        except Exception as exn:  # noqa: BLE001 - PIL raises many kinds; every one means "unreadable"
            self.bad_images.add()
            log.warning("unreadable sample %s in %s: %r", t.keys[i], path, exn)
            return None

    def __getitem__(self, step: int) -> Batch:
        ids = [int(i) for i in self.plan.batches[step]]
        valid = self.plan.valid[step].tolist() if self.plan.valid is not None else [True] * len(ids)
        unit = int(self.plan.unit_ids[step])
        loaded: dict[int, Any] = {}
        for i in dict.fromkeys(ids):
            loaded[i] = self._load(i)
        good = [slot for slot, i in enumerate(ids) if loaded[i] is not None]
        if not good:
            raise RuntimeError(f"no sample of batch {step} (unit {unit}) could be read: "
                               f"{[self.table.keys[i] for i in ids][:5]}...")
        labels = self.table.labels
        images, row_labels, keys, teachers, flags = [], [], [], [], []
        for slot, i in enumerate(ids):
            ok = valid[slot]
            if loaded[i] is None:  # another image of the batch, same class if any; eval: an invalid row
                same = [g for g in good if labels[ids[g]] == labels[i]]
                i, ok = ids[(same or good)[0]], ok and self.train
            image, teacher = loaded[i]
            if not self.encoded:
                with seeded(augment_seed(self.seed, self.epoch, unit, slot)):
                    image = self.transform(image)
            images.append(image)
            row_labels.append(int(labels[i]))
            keys.append(self.table.keys[i])
            teachers.append(teacher)
            flags.append(ok)
        return collate(images, row_labels, keys, teachers if self.teacher_embeddings else None,
                       None if self.train else flags)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """Loader workers ignore the stop signals a scheduler sends to a whole process group (SIGTERM, SIGUSR1,
    SIGUSR2, SIGHUP): the main process decides when to stop (after a step, with a checkpoint) and ends its
    workers itself; the DataLoader's watchdog ends them if the main process dies. Ctrl-C (SIGINT) keeps
    its default."""
    for name in ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class ShardLoader:
    """Iterable of one epoch's `Batch`es for this rank (`valid` set in eval, `teacher` when asked for)."""

    def __init__(self, batches: DataLoader, plan: EpochPlan, table: SampleTable, bad_images: BadImageCounter,
                 prefetcher: Prefetcher | None = None):
        self._batches, self.plan, self.table, self._bad = batches, plan, table, bad_images
        self.prefetcher = prefetcher  # a remote split's: fetches the shards of the coming steps

    def __len__(self) -> int:
        return self.plan.steps

    @property
    def skipped(self) -> dict[str, int]:
        """Damaged shards and lost samples of the split, bad images of the current (or last) epoch."""
        return {**self.table.damage, "bad_images": self._bad.total()}

    def __iter__(self) -> Iterator[Batch]:
        self._bad.reset()
        if self.prefetcher is None:
            yield from self._batches
        else:
            yield from self._fetched()
        if any(self.skipped.values()):
            log.warning("rank %d skipped %s this epoch (bad images per worker: %s)",
                        self.plan.rank, self.skipped, self._bad.per_worker())


    def _fetched(self) -> Iterator[Batch]:
        """The batches of a remote split: workers forked first (they inherit no pin), then the prefetcher
        started; its first step is fetched before the first batch (a resume's first window included)."""
        prefetcher = self.prefetcher
        try:
            batches = iter(self._batches)
            prefetcher.start()
            prefetcher.ready(0)
            for step in range(len(self)):
                try:
                    batch = next(batches)
                except Exception as exn:
                    if prefetcher.error is not None:
                        raise prefetcher.error from None  # the one-line store error, not a worker's echo
                    raise exn
                yield batch
                prefetcher.consumed(step + 1)
            if prefetcher.error is not None:
                raise prefetcher.error
        finally:
            prefetcher.close()
            stats = prefetcher.cache.stats if prefetcher.cache is not None else None
            if stats is not None and stats.downloads:
                log.info("rank %d fetched %d shard(s), %.1f MB (%d refetched after a bad download, %d evicted)",
                         self.plan.rank, stats.downloads, stats.downloaded_bytes / 1e6, stats.refetches,
                         stats.evictions)


def make_loader(
    split: str | Path | ShardIndex,
    *,
    batch_size: int,
    train: bool,
    image_size: int,
    views: int = 1,
    seed: int = 0,
    epoch: int = 0,
    workers: int = 4,
    shuffle_buffer: int = 1000,
    resampled: bool = False,
    samples_per_epoch: int | None = None,
    pk: tuple[int, int] | None = None,
    rank: int | None = None,
    world: int | None = None,
    transform: Callable[[Any], torch.Tensor] | None = None,
    teacher_embeddings: bool = False,
    decode: str = "cpu",
    start_samples: int = 0,
    cache: CacheSettings | None = None,
    prefetch_steps: int | None = None,
) -> ShardLoader:
    """Batches of one epoch of a split, for this rank (`batch_size` is per rank), as `Batch`es
    (rct_dist/data/batch.py).

    Images are (B, 3, H, W), or (B, views, 3, H, W) when views > 1. `pk=(P, K)` makes class-balanced
    batches of P classes x K images (needs batch_size == P * K; train only). `shuffle_buffer`: the window
    (in samples) inside which the epoch's shard-ordered sequence is shuffled. `samples_per_epoch` sets the
    epoch's length; `resampled` draws its samples with replacement (plain batches). Rank and world default
    to the torch.distributed process group. `start_samples`: samples of the epoch's global sequence
    already trained on (a mid-epoch resume; a multiple of batch_size). `teacher_embeddings=True` fills
    `Batch.teacher` with each sample's stored teacher embedding, (B, dim) float32: one per image, shared
    by its views. `decode="gpu"` (train, CUDA only) yields each batch's images as a list of encoded bytes
    instead (see the module docstring); `transform` and `views` then belong to the consumer.

    A remote split (`split` a URL, or an index loaded from one) is read through the node-local shard cache
    (`cache`: folder, byte limit, retries; rct_dist/data/shard_cache.py), its shards fetched
    `prefetch_steps` steps ahead (default: enough for the workers' own read-ahead). A split larger than
    the cache limit is planned in windows of shards (rct_dist/data/epoch_plan.py).
    """
    if decode not in ("cpu", "gpu"):
        raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
    if decode == "gpu":
        if not train:
            raise ValueError("decode='gpu' is for training; eval decodes on the CPU")
        if not torch.cuda.is_available():
            raise ValueError("data.decode: gpu decodes JPEGs with CUDA (torchvision.io.decode_jpeg on the GPU), "
                             "but torch sees no CUDA device here: use data.decode: cpu")
    index = split if isinstance(split, ShardIndex) else ShardIndex.load(split, cache)
    if teacher_embeddings and index.teacher_dim is None:
        raise ValueError(f"split {index.split!r} ({index.directory}) holds no teacher embeddings: its index.json "
                         "has no 'teacher' entry; write them with `rct-dist embed --into-shards`")
    if not train and (pk or resampled or samples_per_epoch or start_samples):
        raise ValueError("pk, resampled, samples_per_epoch and start_samples are for training: eval reads every "
                         "sample once")
    if pk and pk[0] > index.classes:
        raise ValueError(f"pk={pk} needs {pk[0]} classes per batch, but split {index.split!r} has {index.classes}")
    if pk and pk[0] * pk[1] != batch_size:
        raise ValueError(f"pk={pk} makes batches of {pk[0] * pk[1]}, not batch_size={batch_size}")
    rank = world_rank() if rank is None else rank
    world = world_size() if world is None else world
    table = sample_table(index)
    window = window_shards(index) if train else None
    plan = plan_epoch(table.shard, len(index.shards), table.labels, rank=rank, world=world, batch_size=batch_size,
                      train=train, seed=seed, epoch=epoch, shuffle_buffer=shuffle_buffer, resampled=resampled,
                      samples_per_epoch=samples_per_epoch, pk=pk, start_samples=start_samples, window_shards=window)
    prefetcher = None
    if index.remote is not None:
        lookahead = prefetch_steps if prefetch_steps is not None else 2 * workers + 3  # DataLoader reads 2 ahead
        if window:  # fetch the next window while this one trains: its first step needs most of its shards
            lookahead += -(-plan.steps * window // len(index.shards))
        prefetcher = Prefetcher(index.remote, [np.unique(table.shard[b]) for b in plan.batches], lookahead,
                                index.remote.pin_cap(window))
    bad_images = BadImageCounter(workers)
    dataset = EpochBatches(table, plan, seed=seed, epoch=epoch, train=train,
                           transform=Views(transform or build_transform(image_size, train), views),
                           teacher_embeddings=teacher_embeddings, encoded=decode == "gpu", bad_images=bad_images,
                           failed=prefetcher.failed if prefetcher is not None else None)
    batches = DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                         worker_init_fn=_leave_signals_to_the_main_process if workers else None)
    return ShardLoader(batches, plan, table, bad_images, prefetcher)
