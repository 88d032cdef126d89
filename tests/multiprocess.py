"""Run a function on several gloo ranks (CPU processes) and collect what each rank returns.

Workers are spawned, join a file-rendezvous process group (no ports to race for), run the function,
save its result with torch.save, and leave with os._exit after a barrier: gloo threads sometimes
abort during interpreter shutdown, which would fail a test that actually passed.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rct_dist.distributed import free_port


def _worker(rank: int, world: int, tmp: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["RCT_TEST_PORT"],
    )
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
        result = fn(rank, world, *args)
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report, then leave without interpreter shutdown
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 300) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks; returns each rank's result, in rank order.

    Raises with every failing rank's traceback if any rank fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RCT_TEST_PORT"] = str(free_port())  # for libraries that insist on env:// (DeepSpeed)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, tmp, fn, args)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
        errors = [(Path(tmp) / f"rank{r}.err") for r in range(world)]
        failed = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists()]
        hung = [r for r, p in enumerate(procs) if p.exitcode is None or (p.exitcode != 0 and not errors[r].exists())]
        if failed or hung:
            raise AssertionError("\n".join(failed) + (f"\nranks {hung} died or hung" if hung else ""))
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world)]
