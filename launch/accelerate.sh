#!/usr/bin/env bash
# Run an rct-dist subcommand under `accelerate launch`, used as a launcher only (see the comments in
# launch/accelerate.yaml: the trainer drives DeepSpeed itself; accelerate runs torchrun).
#
#   One node, 8 GPUs (the yaml's default num_processes):
#     launch/accelerate.sh transfer --config cub/compression
#   One node, 2 CPU processes (gloo):
#     NUM_PROCESSES=2 launch/accelerate.sh demo --epochs 1
#   Two nodes of 8 GPUs: run on each node, MACHINE_RANK 0 and 1, NUM_PROCESSES = total (16):
#     NUM_MACHINES=2 MACHINE_RANK=0 NUM_PROCESSES=16 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#       launch/accelerate.sh transfer --config imagenet/transfer
#
# Environment (all optional): ACCELERATE_CONFIG (default: accelerate.yaml next to this
# script), NUM_PROCESSES (total over all machines, >= 2; for one process run `rct-dist` directly),
# NUM_MACHINES, MACHINE_RANK, MASTER_ADDR, MASTER_PORT.
# RCT_DIST_ENTRY (default rct_dist.cli): the module every process runs; for tests and debugging.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: [NUM_PROCESSES=N] $0 <train-teacher|transfer|demo|make-shards> [args...]" >&2
    exit 2
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
args=(--config_file "${ACCELERATE_CONFIG:-$here/accelerate.yaml}")
[[ -n "${NUM_PROCESSES:-}" ]] && args+=(--num_processes "$NUM_PROCESSES")
[[ -n "${NUM_MACHINES:-}" ]] && args+=(--num_machines "$NUM_MACHINES")
[[ -n "${MACHINE_RANK:-}" ]] && args+=(--machine_rank "$MACHINE_RANK")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--main_process_ip "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && args+=(--main_process_port "$MASTER_PORT")

exec accelerate launch "${args[@]}" -m "${RCT_DIST_ENTRY:-rct_dist.cli}" "$@"
