"""Leaving a multi-process job cleanly."""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def finish(code: int = 0) -> None:
    """End the process after a barrier when a process group exists: gloo threads can abort during
    interpreter shutdown (`terminate called without an active exception`), failing a job that
    succeeded, so a multi-process job leaves with os._exit(code) once every rank is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)
