#!/usr/bin/env bash
# Run an rct-dist subcommand on NPROC processes of this node (gloo on CPU, nccl on GPUs):
#   NPROC=2 launch/torchrun.sh demo --steps 100
set -euo pipefail
exec torchrun --standalone --nproc_per_node "${NPROC:-2}" -m rct_dist.cli "$@"
