"""Stopping on the scheduler's signal: finish the optimizer step, save a complete checkpoint, leave.

SLURM ends a job at its time limit or on preemption with SIGTERM (or the signal asked with
`--signal=USR1@SECONDS`) and a grace period; cloud spot instances and Kubernetes do the same with
SIGTERM. Without a handler the default action kills the process and everything since the last
periodic checkpoint is lost.

`StopOnSignal` installs handlers for `run.stop_signals` (default SIGTERM and SIGUSR1) that only record
the signal: the handler never saves (a save may not start inside a signal handler, and a collective
inside one would deadlock). At every optimizer step boundary (and at each epoch's end) the ranks agree
with one all-reduce of a single integer whether any of them received a signal, so they all stop after
the same step. The trainer then saves a checkpoint of that step (unless one exists), says so in one
line and exits with `EXIT_STOPPED` (75, EX_TEMPFAIL: "try again later"), distinct from a failure (1)
and a bad config (2). A second signal during the save only records itself again: the save runs to its
end, and checkpoints are written beside the complete one and swapped in, so none is ever damaged.

Under SLURM (`SLURM_JOB_ID` set) with `run.requeue: true`, rank 0 asks `scontrol requeue JOB` before
leaving; a job submitted with `--requeue` then starts again and `run.resume: auto` continues it.

Bound: the stop takes at most one optimizer step, the checkpoint save, and, when the signal arrives
during an epoch's evaluation, the rest of that evaluation (the agreement is at step boundaries).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

EXIT_STOPPED = 75
SIGNAL_NAMES = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


class Stopped(Exception):
    """The run stopped on a signal after saving `checkpoint` (the CLI exits with EXIT_STOPPED)."""

    def __init__(self, message: str, checkpoint: str | None):
        super().__init__(message)
        self.checkpoint = checkpoint


class StopOnSignal:
    """Records the stop signals this process receives; `agreed()` tells every rank the same answer."""

    def __init__(self, names: list[str] | tuple[str, ...]):
        self.received: str | None = None
        self._previous: dict[int, object] = {}
        for name in names:
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._record)

    def _record(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.received is None:
            self.received = name
            log.warning("received %s: stopping after the current optimizer step, with a checkpoint", name)
        else:
            log.warning("received %s again: the stop is already under way (the checkpoint is being saved)", name)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank when any rank received a stop signal (one all-reduce of one int)."""
        mine = 1 if self.received is not None else 0
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return bool(mine)
        flag = torch.tensor([mine], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and self.received is None:
            self.received = "a signal on another rank"
        return bool(flag.item())

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def request_requeue(enabled: bool) -> str | None:
    """Under SLURM, ask the scheduler to requeue this job (rank 0 only); the outcome, for the stop line."""
    job = os.environ.get("SLURM_JOB_ID")
    if not enabled or not job:
        return None
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as exn:
        return f"requeue of SLURM job {job} failed ({exn})"
    if out.returncode != 0:
        return f"requeue of SLURM job {job} refused ({' '.join(out.stderr.split()) or out.returncode}); submit with --requeue"
    return f"SLURM job {job} requeued"
