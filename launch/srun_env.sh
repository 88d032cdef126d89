#!/usr/bin/env bash
# Per-task wrapper for `srun` (see launch/slurm.sbatch): turn SLURM's task variables into the ones
# torch.distributed / deepspeed.init_distributed read, then run the rct-dist CLI with "$@" unchanged.
#
#   srun launch/srun_env.sh transfer --config configs/imagenet/transfer.yaml
#
# MASTER_ADDR defaults to the first host of the allocation, MASTER_PORT to 29500; export either one
# before srun to override. Each task is one process (one GPU): RANK = SLURM_PROCID,
# WORLD_SIZE = SLURM_NTASKS, LOCAL_RANK = SLURM_LOCALID.
# RCT_DIST_ENTRY (default rct_dist.cli): the module every process runs; for tests and debugging.
set -euo pipefail

: "${SLURM_PROCID:?run this under srun}"
export RANK="$SLURM_PROCID"
export WORLD_SIZE="${SLURM_NTASKS:?SLURM_NTASKS not set}"
export LOCAL_RANK="${SLURM_LOCALID:?SLURM_LOCALID not set}"
export LOCAL_WORLD_SIZE="${SLURM_NTASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}"
export NODE_RANK="${SLURM_NODEID:-0}"
if [[ -z "${MASTER_ADDR:-}" ]]; then
    MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)"  # not head: with pipefail, head closing the pipe early can fail the line (SIGPIPE)
    export MASTER_ADDR
fi
export MASTER_PORT="${MASTER_PORT:-29500}"

exec python -m "${RCT_DIST_ENTRY:-rct_dist.cli}" "$@"
