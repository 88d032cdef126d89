"""DeepSpeed checkpoints: saved by every rank, marked complete, found again by `--resume auto`.

DeepSpeed writes a `latest` file, but a job killed while ranks are still writing leaves a tag
folder that looks like a checkpoint and is not one. Here a tag counts only once every rank has
returned from `save_checkpoint` and rank 0 has atomically written `COMPLETE` (the step and epoch)
into it. Loading forces torch's weights-only unpickler for everything DeepSpeed reads, allowing the
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
    """(step, tag folder) of every complete checkpoint in `folder`, oldest first."""
    found = []
    for marker in folder.glob(f"step*/{MARKER}"):
        found.append((json.loads(marker.read_text())["step"], marker.parent))
    return sorted(found)


def save(engine, folder: Path, step: int, epoch: int, client_state: dict[str, Any], keep: int) -> Path:
    """Every rank calls this; returns the tag folder once it is complete on all ranks."""
    tag = tag_for(step)
    engine.save_checkpoint(str(folder), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier()
    path = folder / tag
    if not dist.is_initialized() or dist.get_rank() == 0:
        marker = json.dumps({"step": step, "epoch": epoch}).encode()
        atomic_write(path / MARKER, lambda stream: stream.write(marker))
        for _, old in complete_checkpoints(folder)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
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


def load(engine, tag_folder: Path) -> dict[str, Any]:
    """Restore engine, optimizer and scheduler state; returns the client state saved with it."""
    if not (tag_folder / MARKER).exists():
        raise FileNotFoundError(f"{tag_folder} is not a complete checkpoint (no {MARKER} file)")
    with weights_only_loads():
        path, client_state = engine.load_checkpoint(str(tag_folder.parent), tag=tag_folder.name)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {tag_folder}")
    return client_state
