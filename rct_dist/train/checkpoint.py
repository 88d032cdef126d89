"""DeepSpeed checkpoints: saved by every rank, marked complete, found again by `--resume auto`.

DeepSpeed writes a `latest` file, but a job killed while ranks are still writing leaves a tag
folder that looks like a checkpoint and is not one. Here a tag counts only once every rank has
returned from `save_checkpoint` and rank 0 has atomically written `COMPLETE` into it: the step, the
epoch, and every file of the tag with its size. A complete tag is never rewritten in place (its marker
goes first, on every rank's view, before a save of the same step starts); the folders of interrupted
saves are removed once a later save is complete; `usable_checkpoints` checks each marker's files and
sizes, so a damaged checkpoint is passed over (with a warning) for the previous complete one.
Loading forces torch's weights-only unpickler for everything DeepSpeed reads, allowing the
few DeepSpeed and Python types its checkpoint files hold, and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rct_dist.atomic import atomic_write

MARKER = "COMPLETE"


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, tag folder) of every checkpoint in `folder` marked complete, oldest first."""
    found = []
    for marker in folder.glob(f"step*/{MARKER}"):
        found.append((json.loads(marker.read_text())["step"], marker.parent))
    return sorted(found)


def _files(tag_folder: Path) -> dict[str, int]:
    """Every file under the tag folder (its marker aside) with its size in bytes."""
    return {p.relative_to(tag_folder).as_posix(): p.stat().st_size
            for p in sorted(tag_folder.rglob("*")) if p.is_file() and p.name != MARKER}


def damage(tag_folder: Path) -> str | None:
    """Why a complete-marked checkpoint cannot be trusted (a file its marker vouches for is missing or has
    another size), or None. Markers of older versions, without a file list, vouch for nothing more."""
    vouched = json.loads((tag_folder / MARKER).read_text()).get("files")
    if vouched is None:
        return None
    for name, size in vouched.items():
        path = tag_folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its marker says {size}"
    return None


def usable_checkpoints(folder: Path, warn=None) -> list[tuple[int, Path]]:
    """`complete_checkpoints` without the damaged ones (each said through `warn`), oldest first."""
    usable = []
    for step, path in complete_checkpoints(folder):
        reason = damage(path)
        if reason is None:
            usable.append((step, path))
        elif warn is not None:
            warn(f"checkpoint {path} is damaged ({reason}): passed over")
    return usable


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(engine, folder: Path, step: int, epoch: int, client_state: dict[str, Any], keep: int) -> Path:
    """Every rank calls this; returns the tag folder once it is complete on all ranks."""
    tag = tag_for(step)
    path = folder / tag
    if _is_rank0() and (path / MARKER).exists():  # a save of this step again: unmark it before writing
        (path / MARKER).unlink()
    _barrier()
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)
    _barrier()
    if _is_rank0():
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = json.dumps({"step": step, "epoch": epoch, "world": world, "files": _files(path)}).encode()
        atomic_write(path / MARKER, lambda stream: stream.write(marker))
        complete = complete_checkpoints(folder)
        for _, old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        kept = {p for _, p in complete}
        for leftover in folder.glob("step*"):  # interrupted saves: tag folders that never got their marker
            if leftover.is_dir() and leftover not in kept:
                shutil.rmtree(leftover, ignore_errors=True)
    _barrier()
    return path


def _deepspeed_safe_globals() -> list:
    """Types DeepSpeed pickles into its checkpoint files besides tensors and containers."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    import argparse
    import collections

    # set: DeepSpeed stores parameter-name sets; torch >= 2.6 allows it by default, 2.5 needs it named
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, argparse.Namespace,
            collections.OrderedDict, torch.Size, set]


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Make every torch.load inside (DeepSpeed's included) use the weights-only unpickler."""
    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def saved_world(tag_folder: Path) -> int | None:
    """The number of ranks that saved a checkpoint (None for markers of earlier versions)."""
    return json.loads((tag_folder / MARKER).read_text()).get("world")


UNIVERSAL = "universal"  # checkpoints/universal/<tag>: DeepSpeed universal copies, for another world size


def universal_copy(tag_folder: Path) -> Path:
    """The tag's DeepSpeed universal checkpoint (optimizer state per parameter, not per rank's partition),
    made once by rank 0 with DeepSpeed's `ds_to_universal` converter; every rank calls this.

    ZeRO stages 1-3 save each rank's partition of the optimizer state, which DeepSpeed cannot load on
    another number of ranks; its universal format can be."""
    target = tag_folder.parent / UNIVERSAL / tag_folder.name
    if _is_rank0() and not (target / MARKER).exists():
        import subprocess
        import sys

        shutil.rmtree(target, ignore_errors=True)
        temporary = target.parent / f".{target.name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        done = subprocess.run(
            [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_folder),
             "--output_folder", str(temporary / tag_folder.name), "--num_extract_workers", "1",
             "--num_merge_workers", "1", "--inject_missing_state"],
            capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"converting {tag_folder} to a universal checkpoint (to resume on another number "
                               f"of ranks) failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        os.replace(temporary / tag_folder.name, target)
        shutil.rmtree(temporary, ignore_errors=True)
        atomic_write(target / MARKER, lambda stream: stream.write(json.dumps({"from": tag_folder.name}).encode()))
    _barrier()
    return target


def load(engine, tag_folder: Path, universal: bool = False) -> dict[str, Any]:
    """Restore engine, optimizer and scheduler state; returns the client state saved with it.
    `universal`: load the tag's universal copy (the engine must be built with DeepSpeed's
    `checkpoint.load_universal`), to resume ZeRO 1-3 on another number of ranks."""
    if not (tag_folder / MARKER).exists():
        raise FileNotFoundError(f"{tag_folder} is not a complete checkpoint (no {MARKER} file)")
    reason = damage(tag_folder)
    if reason is not None:
        raise RuntimeError(f"checkpoint {tag_folder} is damaged: {reason}")
    source = universal_copy(tag_folder) if universal else tag_folder
    with weights_only_loads():
        try:
            path, client_state = engine.load_checkpoint(str(source.parent), tag=source.name)
        except Exception as exn:
            text = str(exn)
            if "parameter groups" in text or "parameter-alignment" in text or "param_groups" in text:
                raise RuntimeError(f"{tag_folder} holds optimizer state for other parameter groups than this "
                                   "version builds (an earlier rct-dist decayed every parameter; biases and 1-D "
                                   "parameters now have their own groups): its weights still export and evaluate "
                                   "(rct-dist export --checkpoint), but training cannot resume from it; start a new "
                                   f"run ({text.splitlines()[0][:200]})") from None
            if "world size" not in text:
                raise
            raise RuntimeError(f"{tag_folder} was saved by {saved_world(tag_folder) or 'another number of'} ranks "
                               f"and its ZeRO optimizer state is partitioned per rank: resume it on that many "
                               f"ranks ({exn})") from None
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_folder}")
    return client_state
