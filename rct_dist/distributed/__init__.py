"""Who this process is in a data-parallel job, and the collectives the losses need."""

from rct_dist.distributed.collectives import (
    all_gather_rows,
    all_gather_stats,
    all_reduce_sum,
    is_distributed,
    world_rank,
    world_size,
)
from rct_dist.distributed.ports import free_port

__all__ = [
    "all_gather_rows",
    "all_gather_stats",
    "all_reduce_sum",
    "free_port",
    "is_distributed",
    "world_rank",
    "world_size",
]
