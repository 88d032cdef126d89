"""Run a function on several gloo ranks (CPU processes) and collect what each rank returns.

Workers are spawned, join a file-rendezvous process group (no ports to race for), run the function,
save its result with torch.save, and leave with os._exit after a barrier: gloo threads sometimes
abort during interpreter shutdown, which would fail a test that actually passed. The process group is
not destroyed first (os._exit needs no clean-up, and a destroy is one more place to wait on a peer).

A rank that waits on a peer never hangs the test: the process group's collectives time out
(`COLLECTIVE_TIMEOUT`), and a watchdog writes every thread's stack to `rank<N>.stack` and ends the
rank shortly before the test's own timeout, so a failure names the line it waited on.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from rct_dist.distributed import free_port


COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


def _worker(rank: int, world: int, tmp: str, fn: Callable[..., Any], args: tuple, timeout: float) -> None:
    stacks = open(Path(tmp) / f"rank{rank}.stack", "w")  # noqa: SIM115 (kept open for the watchdog)
    faulthandler.dump_traceback_later(max(timeout - 15, 5), exit=True, file=stacks)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["RCT_TEST_PORT"],
    )
    torch.set_num_threads(1)
    code = 0
    try:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world,
                                timeout=max(COLLECTIVE_TIMEOUT, datetime.timedelta(seconds=timeout / 2)))
        result = fn(rank, world, *args)
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
        dist.barrier()
    except BaseException:  # report, then leave without interpreter shutdown
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)


def _stack(tmp: str, rank: int) -> str:
    path = Path(tmp) / f"rank{rank}.stack"
    text = path.read_text() if path.exists() else ""
    return text[-6000:] or "(no stack written: the rank died without reaching its watchdog)"


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600) -> list[Any]:
    """fn(rank, world, *args) on `world` gloo ranks; returns each rank's result, in rank order.

    Raises with every failing rank's traceback if any rank fails.
    """
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["RCT_TEST_PORT"] = str(free_port())  # for libraries that insist on env:// (DeepSpeed)
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=_worker, args=(r, world, tmp, fn, args, timeout)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout  # one deadline for the whole job, not one per rank
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0.1))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
        errors = [(Path(tmp) / f"rank{r}.err") for r in range(world)]
        failed = [f"rank {r}:\n{e.read_text()}" for r, e in enumerate(errors) if e.exists()]
        hung = [r for r, p in enumerate(procs) if p.exitcode is None or (p.exitcode != 0 and not errors[r].exists())]
        if failed or hung:
            stacks = [f"rank {r} (exit {procs[r].exitcode}) was waiting in:\n{_stack(tmp, r)}" for r in hung]
            raise AssertionError("\n".join(failed + stacks) + (f"\nranks {hung} died or hung" if hung else ""))
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=True) for r in range(world)]
