"""DeepSpeed checkpoints: saved by every rank, marked complete, found again by `--resume auto`.

DeepSpeed writes a `latest` file, but a job killed while ranks are still writing leaves a tag
folder that looks like a checkpoint and is not one. Here a tag counts only once every rank has
returned from `save_checkpoint` and fsynced what it wrote (files and folders), and rank 0 has
atomically written `COMPLETE` into it: the step, the epoch, the world size, and every file of the tag
with its size and SHA-256.

A complete tag is never removed or rewritten while it is the only complete one: a save of a step that
already has a complete tag writes `<tag>.resave`, marks it complete, and only then swaps it in
(`<tag>` -> `<tag>.replaced`, `<tag>.resave` -> `<tag>`, `<tag>.replaced` removed), so a kill at any
moment leaves at least one complete checkpoint of that step; older tags are removed only after the
new one is complete. The folders of interrupted saves are removed once a later save is complete.
`usable_checkpoints` checks each marker's files, sizes and hashes, so a damaged checkpoint (a flipped
byte included) is passed over, with a warning, for the previous complete one.

Loading forces torch's weights-only unpickler for everything DeepSpeed reads, allowing the few
DeepSpeed and Python types its checkpoint files hold, and nothing else; the conversion to DeepSpeed's
universal format (a resume on another number of ranks) runs under the same rule in its subprocess.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from rct_dist.atomic import atomic_write, file_sha256, fsync_dir

MARKER = "COMPLETE"
RESAVE = ".resave"  # a save of a step whose tag is complete is written here first, then swapped in
REPLACED = ".replaced"  # the old tag during that swap
_PREFERENCE = {REPLACED: 0, "": 1, RESAVE: 2}  # among complete folders of one step: the newest write wins


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def _suffix(path: Path) -> str:
    return next((s for s in (RESAVE, REPLACED) if path.name.endswith(s)), "")


def complete_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    """(step, tag folder) of every checkpoint in `folder` marked complete, oldest first; where a swap of
    a same-step save was interrupted and two folders of one step are complete, the newer write last."""
    found = []
    for marker in folder.glob(f"step*/{MARKER}"):
        found.append((json.loads(marker.read_text())["step"], marker.parent))
    return sorted(found, key=lambda item: (item[0], _PREFERENCE[_suffix(item[1])], item[1].name))


def _tag_files(tag_folder: Path) -> list[Path]:
    return [p for p in sorted(tag_folder.rglob("*")) if p.is_file() and p.name != MARKER]


def _vouch(tag_folder: Path) -> dict[str, dict[str, Any]]:
    """What a marker vouches for: every file under the tag folder (its marker aside) with its size in
    bytes (`files`) and its SHA-256 (`sha256`), from one listing of the folder."""
    files = {p.relative_to(tag_folder).as_posix(): p for p in _tag_files(tag_folder)}
    return {"files": {name: p.stat().st_size for name, p in files.items()},
            "sha256": {name: file_sha256(p) for name, p in files.items()}}


def _fsync_tree(tag_folder: Path) -> None:
    """Make what this rank sees of a tag durable: every file, every folder, and the tag's entry."""
    files = _tag_files(tag_folder)
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for sub in sorted({p.parent for p in files} | {tag_folder}, reverse=True):
        fsync_dir(sub)
    fsync_dir(tag_folder.parent)


def damage(tag_folder: Path) -> str | None:
    """Why a complete-marked checkpoint cannot be trusted (a file its marker vouches for is missing, has
    another size or another SHA-256), or None. Markers of older versions vouch only for what they list:
    without a file list, for nothing more; without hashes, for the sizes."""
    marker = json.loads((tag_folder / MARKER).read_text())
    vouched = marker.get("files")
    if vouched is None:
        return None
    for name, size in vouched.items():
        path = tag_folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, its marker says {size}"
    for name, digest in marker.get("sha256", {}).items():
        if file_sha256(tag_folder / name) != digest:
            return f"{name} does not have the content its marker vouches for (SHA-256 differs)"
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


def _rank0_says(flag: bool) -> bool:
    """Rank 0's answer, on every rank (each rank's view of a folder may differ on node-local disks)."""
    if not dist.is_initialized():
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([int(flag)], device=device)
    dist.broadcast(value, 0)
    return bool(value.item())


def _swap_in(new: Path, final: Path) -> None:
    """Replace the complete tag `final` by the complete `new` of the same step; at every moment one of the
    two (or both) is a complete folder that `complete_checkpoints` finds."""
    old = final.with_name(final.name + REPLACED)
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
    fsync_dir(final.parent)
    os.replace(new, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _prune(folder: Path, keep: int, newest: tuple[int, Path]) -> None:
    """Rank 0, after the save `newest` (step, folder) is complete: one folder per step (`newest` for its
    step, else the newer write of an interrupted swap), the newest `keep` steps (all with keep 0), and no
    folder of an interrupted save."""
    by_step: dict[int, Path] = {}
    for step, path in complete_checkpoints(folder):  # preferred folder of each step last
        by_step[step] = path
    by_step[newest[0]] = newest[1]
    steps = sorted(by_step)
    kept = {by_step[s] for s in (steps[-keep:] if keep > 0 else steps)}
    for leftover in folder.glob("step*"):
        if leftover.is_dir() and leftover not in kept:
            shutil.rmtree(leftover, ignore_errors=True)
    fsync_dir(folder)


def save(engine, folder: Path, step: int, epoch: int, client_state: dict[str, Any], keep: int) -> Path:
    """Every rank calls this; returns the tag folder once it is complete on all ranks."""
    final = folder / tag_for(step)
    resave = _rank0_says((final / MARKER).exists())  # this step is complete already: write beside it
    path = final.with_name(final.name + RESAVE) if resave else final
    if _is_rank0():
        shutil.rmtree(path, ignore_errors=True)  # a same-step save that was killed before its marker
    _barrier()
    engine.save_checkpoint(str(folder), tag=path.name, client_state=client_state)
    _fsync_tree(path)  # every rank, what it wrote: durable before rank 0 vouches for it
    _barrier()
    if _is_rank0():
        world = dist.get_world_size() if dist.is_initialized() else 1
        marker = json.dumps({"step": step, "epoch": epoch, "world": world, **_vouch(path)}).encode()
        atomic_write(path / MARKER, lambda stream: stream.write(marker))
        if resave:
            _swap_in(path, final)
        _prune(folder, keep, (step, final))
    _barrier()
    return final


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

        shutil.rmtree(target, ignore_errors=True)
        temporary = target.parent / f".{target.name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        done = subprocess.run(  # DeepSpeed's converter, under the weights-only unpickler (this module's main)
            [sys.executable, "-m", "rct_dist.train.checkpoint", "--input_folder", str(tag_folder),
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


def _convert_to_universal() -> None:
    """`python -m rct_dist.train.checkpoint ARGS`: DeepSpeed's `ds_to_universal` with ARGS, every torch.load
    in it (and in the worker processes it forks) through the weights-only unpickler, which refuses any
    pickle that would import or call something besides tensors, containers and DeepSpeed's few types."""
    import runpy

    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    torch.serialization.add_safe_globals(_deepspeed_safe_globals())
    sys.argv = ["ds_to_universal", *sys.argv[1:]]
    runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _convert_to_universal()
