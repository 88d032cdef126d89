"""An epoch's batches, decided from the sample table and (seed, epoch) alone.

Training sees one global sequence of *units*, each a batch of `batch_size` sample ids; the same
sequence whatever the world size or worker count. Step s of rank r is unit `start + s * world + r`,
so a step of the whole job consumes `world * batch_size` samples of the sequence, and a job resumed
after `n` samples (on any world size) continues at unit `n / batch_size`. Each sample's
augmentation is seeded from (seed, epoch, unit, slot) by the loader, never from a process's RNG.

* Plain batches: shards in a seeded order, their samples in file order, shuffled inside windows of
  `shuffle_buffer` samples (what a streaming shuffle buffer does, without depending on who reads);
  `resampled` draws the samples with replacement instead. `samples_per_epoch` longer than the split
  appends further seeded passes.
* P x K batches: each class's samples in a seeded order cut into groups of K (a class's last group
  of fewer than K is left out this epoch), the groups shuffled, then taken in order into units of P
  groups of distinct classes (a group whose class is already in the unit waits for the next one).
* Windows (a remote split larger than its node-local cache, `window_shards` = W): the shards in a seeded
  order, cut into windows of W consecutive shards; plain batches shuffle all samples of a window
  together (a window's last partial batch is completed by the next window's first samples), P x K
  batches are made (as above) from the classes present in the window. The units of a window come
  before those of the next, so a node reads at most two windows at a time (the one being trained and
  the next being fetched); the price is a shuffle over W shards instead of the split.
* Eval: every readable sample once. Rank r takes the r-th of `world` contiguous parts; every rank
  yields the same number of batches, the tail padded with its last sample flagged invalid.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

# Purpose words in the seed sequences: streams for different draws never coincide.
_ORDER, _PK, _RESAMPLE, _AUGMENT, _STEP, _WINDOW = 1, 2, 3, 4, 5, 6


def derived_seed(*words: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence hashing)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def augment_seed(seed: int, epoch: int, unit: int, slot: int) -> int:
    return derived_seed(seed, epoch, _AUGMENT, unit, slot)


def step_seed(seed: int, epoch: int, unit: int) -> int:
    """Seed of the model's own random draws (dropout, GPU augmentation) on the step that trains on `unit`."""
    return derived_seed(seed, epoch, _STEP, unit)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


@dataclass(frozen=True)
class EpochPlan:
    """This rank's batches of one epoch: `batches[s]` are the sample ids of its step s."""

    rank: int
    world: int
    batch_size: int
    units: int  # units in the whole epoch (train: the global sequence's length; eval: batches per rank)
    start_unit: int  # train: the first unit of this plan's first step (0 unless resumed mid-epoch)
    unit_ids: np.ndarray  # (steps,) the unit each of this rank's steps trains on
    batches: np.ndarray  # (steps, batch_size) sample ids
    valid: np.ndarray | None  # eval: (steps, batch_size) False on padding rows

    @property
    def steps(self) -> int:
        return len(self.unit_ids)

    @property
    def samples_per_step(self) -> int:
        """Samples of the global sequence one step of the whole job consumes."""
        return self.world * self.batch_size


def _plain_order(shard: np.ndarray, shards: int, seed: int, epoch: int, window: int, pass_: int) -> np.ndarray:
    rng = _rng(seed, epoch, _ORDER, pass_)
    ids = np.arange(len(shard))
    by_shard = [ids[shard == s] for s in rng.permutation(shards)]
    order = np.concatenate(by_shard) if by_shard else ids
    if window > 1:
        for start in range(0, len(order), window):
            order[start:start + window] = rng.permutation(order[start:start + window])
    return order


def _pk_units(labels: np.ndarray, p: int, k: int, seed: int, epoch: int, pass_: int) -> list[np.ndarray]:
    rng = _rng(seed, epoch, _PK, pass_)
    groups: list[tuple[int, np.ndarray]] = []
    for c in np.unique(labels):
        ids = rng.permutation(np.flatnonzero(labels == c))
        groups += [(int(c), ids[i:i + k]) for i in range(0, len(ids) - k + 1, k)]
    queue = deque(groups[i] for i in rng.permutation(len(groups)))
    units = []
    while queue:
        unit, used, waiting = [], set(), []
        while queue and len(unit) < p:
            c, ids = queue.popleft()
            if c in used:
                waiting.append((c, ids))
                continue
            unit.append(ids)
            used.add(c)
        if len(unit) < p:
            break
        units.append(np.concatenate(unit))
        queue.extendleft(reversed(waiting))
    return units


def _window_units(shard: np.ndarray, shards: int, labels: np.ndarray, *, batch_size: int, seed: int, epoch: int,
                  window: int, pk: tuple[int, int] | None, pass_: int) -> list[np.ndarray]:
    """One pass of the window plan (module docstring): units of each window of `window` shards in turn."""
    rng = _rng(seed, epoch, _WINDOW, pass_)
    order = rng.permutation(shards)
    units: list[np.ndarray] = []
    carry = np.zeros(0, np.int64)  # plain batches: a window's last partial batch starts the next window's
    for w, start in enumerate(range(0, shards, window)):
        ids = np.flatnonzero(np.isin(shard, order[start:start + window]))
        if pk:
            units += [ids[u] for u in _pk_units(labels[ids], *pk, seed, epoch, pass_ * (shards + 1) + w + 1)]
        else:
            mixed = np.concatenate([carry, ids[rng.permutation(len(ids))]])
            whole = len(mixed) // batch_size * batch_size
            units += [mixed[i:i + batch_size] for i in range(0, whole, batch_size)]
            carry = mixed[whole:]
    return units


def _passes(one_pass: Callable[[int], list[np.ndarray]], wanted: int, samples_per_epoch: int | None,
            batch_size: int) -> np.ndarray:
    """Units of whole passes (P x K or windows): one pass, or with `samples_per_epoch` as many passes as
    make `wanted` units (a bounded number), cut to `wanted`."""
    units: list[np.ndarray] = []
    for pass_ in range(1 + 4 * max(1, wanted)):
        more = one_pass(pass_)
        if not more:
            break
        units += more
        if len(units) >= wanted or not samples_per_epoch:
            break
    units = units[:wanted] if samples_per_epoch else units
    return np.stack(units) if units else np.zeros((0, batch_size), np.int64)


def _train_units(shard: np.ndarray, shards: int, labels: np.ndarray, *, batch_size: int, seed: int, epoch: int,
                 shuffle_buffer: int, resampled: bool, samples_per_epoch: int | None,
                 pk: tuple[int, int] | None, window_shards: int | None = None) -> np.ndarray:
    n = len(labels)
    wanted = (samples_per_epoch or n) // batch_size
    if window_shards:
        if resampled:
            raise ValueError("data.resampled draws samples from the whole split, which does not fit data.cache_limit "
                             "here: turn resampled off or raise data.cache_limit above the split's size")
        return _passes(lambda pass_: _window_units(shard, shards, labels, batch_size=batch_size, seed=seed,
                                                   epoch=epoch, window=window_shards, pk=pk, pass_=pass_),
                       wanted, samples_per_epoch, batch_size)
    if pk:
        return _passes(lambda pass_: _pk_units(labels, *pk, seed, epoch, pass_), wanted, samples_per_epoch,
                       batch_size)
    if resampled:
        ids = _rng(seed, epoch, _RESAMPLE).integers(0, n, size=wanted * batch_size) if n else np.zeros(0, np.int64)
    else:
        passes = [_plain_order(shard, shards, seed, epoch, max(shuffle_buffer, 1), p)
                  for p in range(-(-wanted * batch_size // max(n, 1)) if n else 0)]
        ids = np.concatenate(passes)[: wanted * batch_size] if passes else np.zeros(0, np.int64)
    return ids[: len(ids) // batch_size * batch_size].reshape(-1, batch_size)


def plan_epoch(shard: np.ndarray, shards: int, labels: np.ndarray, *, rank: int, world: int, batch_size: int,
               train: bool, seed: int, epoch: int, shuffle_buffer: int = 0, resampled: bool = False,
               samples_per_epoch: int | None = None, pk: tuple[int, int] | None = None,
               start_samples: int = 0, window_shards: int | None = None) -> EpochPlan:
    """The plan of one rank (see the module docstring); `shard` and `labels` are the sample table's columns.
    `start_samples`: samples of this epoch's sequence already consumed (a mid-epoch resume).
    `window_shards`: the window plan's shards per window (train only; None: the whole split at once)."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    if not train:
        parts = np.array_split(np.arange(len(labels)), world)
        steps = max(-(-len(p) // batch_size) for p in parts)
        if steps == 0:
            raise RuntimeError("the split has no readable sample at all: every shard is unreadable")
        mine = parts[rank]
        filler = mine[-1] if len(mine) else 0
        flat = np.full(steps * batch_size, filler, np.int64)
        flat[:len(mine)] = mine
        valid = np.zeros(steps * batch_size, bool)
        valid[:len(mine)] = True
        return EpochPlan(rank, world, batch_size, steps, 0, np.arange(steps), flat.reshape(steps, batch_size),
                         valid.reshape(steps, batch_size))
    units = _train_units(shard, shards, labels, batch_size=batch_size, seed=seed, epoch=epoch,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, samples_per_epoch=samples_per_epoch, pk=pk,
                         window_shards=window_shards)
    if len(units) < world:
        raise ValueError(f"{len(labels)} readable samples make {len(units)} batches of {batch_size}"
                         f"{' (P x K ' + str(pk) + ')' if pk else ''}"
                         f"{f' in windows of {window_shards} shard(s) (data.cache_limit)' if window_shards else ''}"
                         f": not one per rank of {world}")
    if start_samples % batch_size:
        raise ValueError(f"a resume point of {start_samples} samples is not a whole number of batches of "
                         f"{batch_size}: data.batch_size must stay what it was when the checkpoint was saved")
    start = start_samples // batch_size
    if start > len(units):
        raise ValueError(f"a resume point of {start_samples} samples lies past this epoch's "
                         f"{len(units) * batch_size}: the data or the data plan's settings changed")
    steps = (len(units) - start) // world
    unit_ids = start + np.arange(steps) * world + rank
    return EpochPlan(rank, world, batch_size, len(units), start, unit_ids, units[unit_ids], None)
