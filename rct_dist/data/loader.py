"""Streaming loader over webdataset shards, with the same number of batches on every rank.

DDP hangs when one rank runs out of batches before the others, and retrieval metrics are wrong when
an eval sample is seen twice or never. Both are settled up front, from `index.json` alone, so every
rank computes the same plan without communicating (`plan_epoch`):

* Shards are ordered per epoch (train: shuffled with seed + epoch, identically on every rank) and
  rank r reads `order[r::world]`; webdataset's `split_by_worker` then splits those among workers.
* Train: every rank yields `floor(samples / (world * batch_size))` full batches (`samples` is the
  index's count or `samples_per_epoch`). A rank whose shards run out first reads them again
  (`with_epoch`), so with uneven shards a few samples repeat on one rank while another rank leaves
  a few out; with `resampled=True` shards are drawn with replacement instead.
* Eval: each sample is read exactly once, by the rank that owns its shard. Every rank yields
  `max_r ceil(samples_r / batch_size)` full batches: the tail is padded with copies of the rank's
  last sample, flagged `valid=False`. Drop rows where `valid` is False before gathering embeddings.

Batches are made in the main process from the workers' samples (`unbatched` then `batched`), which
is what lets batch counts, padding and P x K class balance be exact whatever the worker count.

Samples may carry a stored teacher embedding, `teacher.npy` (written by `rct-dist embed --into-shards`,
announced by `"teacher": {"dim": ...}` in index.json): `teacher_embeddings=True` adds it to every batch
as a (B, dim) float32 tensor, after the keys. It is decoded with `np.load(..., allow_pickle=False)`.

Unreadable data neither stops training nor passes silently: a truncated or unreadable shard is read
up to the damage (one or two `read_errors`: webdataset reports the broken member and the broken
stream), a corrupt or incomplete sample is dropped (`samples`). Each is logged from the worker and
counted in shared memory, one slot per worker, readable as `ShardLoader.skipped` and summarised in a
warning at the end of every epoch. Samples lost behind a shard's damage cannot be counted one by one;
in eval they show as fewer `valid` rows than the index's sample count.

`decode="gpu"` (train only) leaves images encoded: batches carry a list of the samples' raw bytes
in place of the image tensor, for `rct_dist.data.transforms.DeviceDecode` to decode and augment on
the GPU. It needs CUDA and is refused without it.
"""

from __future__ import annotations

import io
import json
import logging
import math
import random
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from rct_dist.data.transforms import build_transform
from rct_dist.distributed.collectives import world_rank, world_size

log = logging.getLogger(__name__)

INDEX_FORMAT = "rct-dist-shards/1"
SKIP_KINDS = ("read_errors", "samples")  # shard-level errors, dropped samples
TEACHER_FIELD = "teacher.npy"  # a sample's stored teacher embedding


@dataclass(frozen=True)
class ShardIndex:
    """The `index.json` of one split: shard file names and their sample counts."""

    directory: Path  # holds index.json and the shards
    split: str
    shards: tuple[str, ...]
    shard_samples: tuple[int, ...]
    classes: int
    class_names: tuple[str, ...]
    teacher_dim: int | None = None  # size of the samples' stored teacher embeddings, if they carry one

    @property
    def samples(self) -> int:
        return sum(self.shard_samples)

    @classmethod
    def load(cls, path: str | Path) -> ShardIndex:
        """Read a split directory's index (or an index file) and check it against the shards on disk."""
        path = Path(path)
        index_file = path / "index.json" if path.is_dir() else path
        if not index_file.is_file():
            raise FileNotFoundError(f"no shard index at {index_file}: write the split's shards first")
        meta = json.loads(index_file.read_text())
        if meta.get("format") != INDEX_FORMAT:
            raise ValueError(f"{index_file}: format {meta.get('format')!r}, expected {INDEX_FORMAT!r}")
        shards, counts = tuple(meta["shards"]), tuple(int(n) for n in meta["shard_samples"])
        if len(shards) != len(counts) or sum(counts) != meta["samples"]:
            raise ValueError(f"{index_file}: shard_samples do not match shards / samples")
        directory = index_file.parent
        missing = [s for s in shards if not (directory / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{index_file} lists {len(missing)} missing shard(s): {missing[:5]}")
        teacher = meta.get("teacher")
        return cls(directory, meta["split"], shards, counts, int(meta["classes"]), tuple(meta["class_names"]),
                   int(teacher["dim"]) if teacher else None)


@dataclass(frozen=True)
class EpochPlan:
    """What one rank reads in one epoch; identical inputs give identical plans on every rank."""

    rank: int
    world: int
    order: tuple[str, ...]  # every shard, in this epoch's order (the same on every rank)
    shards: tuple[str, ...]  # this rank's share of `order` (all shards when resampled)
    batches: int  # batches every rank yields this epoch


def plan_epoch(
    index: ShardIndex, *, rank: int, world: int, batch_size: int, train: bool, seed: int, epoch: int,
    workers: int, resampled: bool, samples_per_epoch: int | None,
) -> EpochPlan:
    """Shard order, this rank's shards and the common batch count (see the module docstring)."""
    order = list(index.shards)
    if train:
        random.Random(seed + epoch).shuffle(order)
    readers = world * max(workers, 1)
    if not resampled and len(order) < readers:
        raise ValueError(
            f"split {index.split!r} has {len(order)} shards but world_size x workers = {world} x "
            f"{max(workers, 1)} = {readers} readers need one each: write at least {readers} shards, "
            "use fewer workers, or (train only) resampled=True"
        )
    if train:
        samples = samples_per_epoch or index.samples
        batches = samples // (world * batch_size)
        if batches == 0:
            raise ValueError(f"{samples} samples make no full batch of {batch_size} on {world} ranks")
    else:
        counts = dict(zip(index.shards, index.shard_samples))
        batches = max(math.ceil(sum(counts[s] for s in order[r::world]) / batch_size) for r in range(world))
    shards = order if resampled else order[rank::world]
    return EpochPlan(rank, world, tuple(order), tuple(shards), batches)


class SkipCounter:
    """Read errors and samples skipped by webdataset's error handlers, one shared-memory slot per worker.

    The handlers run inside DataLoader workers, so plain attributes would never reach the trainer;
    each worker writes only its own slot, which needs no lock.
    """

    def __init__(self, workers: int):
        self._slots = max(workers, 1)
        self._counts = RawArray("q", self._slots * len(SKIP_KINDS))

    def _skip(self, kind: int, exn: Exception) -> bool:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        self._counts[worker * len(SKIP_KINDS) + kind] += 1
        log.warning("worker %d skipped data (%s): %r", worker, SKIP_KINDS[kind], exn)
        return True  # tell webdataset to continue

    def read_error(self, exn: Exception) -> bool:
        return self._skip(0, exn)

    def sample(self, exn: Exception) -> bool:
        return self._skip(1, exn)

    def per_worker(self) -> list[dict[str, int]]:
        n = len(SKIP_KINDS)
        return [dict(zip(SKIP_KINDS, self._counts[w * n:(w + 1) * n])) for w in range(self._slots)]

    def totals(self) -> dict[str, int]:
        return {k: sum(w[k] for w in self.per_worker()) for k in SKIP_KINDS}

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


def collate(samples: Sequence[tuple]) -> tuple:
    """Tuples of (image, label, key[, teacher][, valid]) -> (stacked images, label tensor, list of keys
    [, stacked teacher embeddings][, mask]); encoded images (bytes) stay a list."""
    columns = list(zip(*samples))
    return tuple(
        torch.stack(c) if isinstance(c[0], torch.Tensor) else list(c) if isinstance(c[0], (str, bytes))
        else torch.tensor(c)
        for c in columns
    )


def _stream_seed(rank: int) -> int:
    """Per (rank, worker) seed for resampled shard draws; our rank, not webdataset's guess at it."""
    info = get_worker_info()
    return wds.utils.make_seed(rank, info.id if info is not None else 0)


def _pad_to(samples: Iterable[tuple], total: int) -> Iterator[tuple]:
    """Append a valid flag; after the last real sample, repeat it flagged invalid up to `total`."""
    last, seen = None, 0
    for sample in samples:
        if seen == total:
            raise ValueError(f"shards hold more samples than index.json says ({total} on this rank)")
        last, seen = sample, seen + 1
        yield (*sample, True)
    if last is None:
        raise RuntimeError("this rank read no sample at all: every shard it owns is unreadable")
    for _ in range(total - seen):
        yield (*last, False)


def _class_balanced(samples: Iterable[tuple], p: int, k: int, buffer: int, seed: int) -> Iterator[tuple]:
    """P x K batches: P distinct classes, K samples each, drawn from a buffer of streamed samples.

    Streaming approximation: a class can only be drawn while K of its samples are in the buffer, so
    batches favour classes whose samples sit close together in the stream; samples left over at the
    end of the pass (classes with fewer than K buffered) are not used this pass.
    """
    rng = random.Random(seed)
    pools: dict[int, list[tuple]] = defaultdict(list)
    ready: set[int] = set()  # classes with at least k buffered samples
    held = 0

    def draw() -> tuple:
        nonlocal held
        batch = []
        for c in rng.sample(sorted(ready), p):
            pool = pools[c]
            batch += [pool.pop(rng.randrange(len(pool))) for _ in range(k)]
            if len(pool) < k:
                ready.discard(c)
        held -= p * k
        return collate(batch)

    for sample in samples:
        label = int(sample[1])
        pools[label].append(sample)
        held += 1
        if len(pools[label]) >= k:
            ready.add(label)
        if held >= buffer and len(ready) >= p:
            yield draw()
    while len(ready) >= p:
        yield draw()


class ShardLoader:
    """Iterable of batches for one epoch: (images, labels, keys[, teacher]) for train, plus `valid` for eval."""

    def __init__(self, batches: wds.WebLoader, plan: EpochPlan, skips: SkipCounter):
        self._batches, self.plan, self._skips = batches, plan, skips

    def __len__(self) -> int:
        return self.plan.batches

    @property
    def skipped(self) -> dict[str, int]:
        """Read errors and skipped samples of the current (or last) epoch, summed over workers."""
        return self._skips.totals()

    def __iter__(self) -> Iterator[tuple]:
        self._skips.reset()
        yielded = 0
        for batch in self._batches:
            yielded += 1
            yield batch
        if yielded != self.plan.batches:  # e.g. every shard unreadable: peers would wait forever
            raise RuntimeError(f"rank {self.plan.rank} yielded {yielded} of {self.plan.batches} batches")
        if any(self.skipped.values()):
            log.warning("rank %d skipped %s this epoch (per worker: %s)",
                        self.plan.rank, self.skipped, self._skips.per_worker())


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
) -> ShardLoader:
    """Batches of one epoch of a split, for this rank (`batch_size` is per rank).

    Images are (B, 3, H, W), or (B, views, 3, H, W) when views > 1. `pk=(P, K)` makes class-balanced
    batches of P classes x K images (needs batch_size == P * K; train only). `shuffle_buffer` is the
    encoded-sample shuffle in each worker and the P x K pool of decoded images in the main process;
    train also mixes workers in a main-process buffer of batch_size x workers decoded images. Rank and
    world default to the torch.distributed process group. Build one loader per epoch.
    `teacher_embeddings=True` adds each sample's stored teacher embedding after the keys, (B, dim)
    float32: one per image, shared by its views. `decode="gpu"` (train, CUDA only) yields each batch's
    images as a list of encoded bytes instead (see the module docstring); `transform` and `views` then
    belong to the consumer.
    """
    if decode not in ("cpu", "gpu"):
        raise ValueError(f"decode must be 'cpu' or 'gpu', got {decode!r}")
    if decode == "gpu":
        if not train:
            raise ValueError("decode='gpu' is for training; eval decodes on the CPU")
        if not torch.cuda.is_available():
            raise ValueError("data.decode: gpu decodes JPEGs with CUDA (torchvision.io.decode_jpeg on the GPU), "
                             "but torch sees no CUDA device here: use data.decode: cpu")
    index = split if isinstance(split, ShardIndex) else ShardIndex.load(split)
    if teacher_embeddings and index.teacher_dim is None:
        raise ValueError(f"split {index.split!r} ({index.directory}) holds no teacher embeddings: its index.json "
                         "has no 'teacher' entry; write them with `rct-dist embed --into-shards`")
    if not train and (pk or resampled or samples_per_epoch):
        raise ValueError("pk, resampled and samples_per_epoch are for training: eval reads every sample once")
    if pk and pk[0] > index.classes:
        raise ValueError(f"pk={pk} needs {pk[0]} classes per batch, but split {index.split!r} has {index.classes}")
    if pk and pk[0] * pk[1] != batch_size:
        raise ValueError(f"pk={pk} makes batches of {pk[0] * pk[1]}, not batch_size={batch_size}")
    rank = world_rank() if rank is None else rank
    world = world_size() if world is None else world
    plan = plan_epoch(index, rank=rank, world=world, batch_size=batch_size, train=train, seed=seed,
                      epoch=epoch, workers=workers, resampled=resampled, samples_per_epoch=samples_per_epoch)
    skips = SkipCounter(workers)
    stream_seed = wds.utils.make_seed(seed, epoch, rank)
    urls = [str(index.directory / s) for s in plan.shards]
    fields = ("png;jpg", "cls", "__key__", *((TEACHER_FIELD,) if teacher_embeddings else ()))
    if resampled:
        source = [wds.ResampledShards(urls, seed=seed + epoch, deterministic=True,
                                      worker_seed=partial(_stream_seed, rank))]
    else:
        source = [wds.SimpleShardList(urls), wds.split_by_worker]
    samples = wds.DataPipeline(
        *source,
        wds.tarfile_to_samples(handler=skips.read_error),
        wds.shuffle(shuffle_buffer, seed=stream_seed) if train else None,  # encoded bytes: cheap to hold
        wds.decode(wds.handle_extension(TEACHER_FIELD, decode_teacher), *(("pil",) if decode == "cpu" else ()),
                   handler=skips.sample),
        wds.to_tuple(*fields, handler=skips.sample),
        wds.map_tuple(Views(transform or build_transform(image_size, train), views), handler=skips.sample)
        if decode == "cpu" else None,
        wds.batched(batch_size, collation_fn=collate, partial=True),  # fewer, larger IPC transfers
    )
    generator = torch.Generator().manual_seed(stream_seed)  # seeds the workers' augmentations
    batches = wds.WebLoader(samples, batch_size=None, num_workers=workers, generator=generator).unbatched()
    if pk:
        batches = batches.compose(wds.pipelinefilter(_class_balanced)(*pk, shuffle_buffer, stream_seed))
    elif train:  # mix the workers' streams, which arrive one worker batch at a time
        mix = batch_size * max(workers, 1)
        batches = batches.shuffle(mix, initial=mix, seed=stream_seed).batched(batch_size, collate, partial=False)
    else:
        batches = batches.compose(partial(_pad_to, total=plan.batches * batch_size))
        batches = batches.batched(batch_size, collate, partial=False)
    if train:
        batches = batches.with_epoch(nbatches=plan.batches)  # reread this rank's shards if they run short
    return ShardLoader(batches, plan, skips)
