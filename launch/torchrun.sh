#!/usr/bin/env bash
# Run an rct-dist subcommand under torchrun (gloo on CPU, nccl on GPUs).
#
#   Single node (the default), NPROC processes on this node:
#     NPROC=2 launch/torchrun.sh demo --epochs 1
#
#   Several nodes: run the same command on every node, NODE_RANK = 0..NNODES-1, with MASTER_ADDR =
#   an address of the node with NODE_RANK=0 that the others can reach:
#     NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 launch/torchrun.sh transfer --config imagenet/transfer
#     NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=8 launch/torchrun.sh transfer --config imagenet/transfer
#   Without NODE_RANK, torchrun's c10d rendezvous at MASTER_ADDR:MASTER_PORT assigns node ranks
#   (RDZV_ID names the job; all nodes must use the same one).
#
# Environment: NPROC (processes per node, default 2), NNODES (default 1), NODE_RANK, MASTER_ADDR,
# MASTER_PORT (default 29500), RDZV_ID (default rct-dist).
# RCT_DIST_ENTRY (default rct_dist.cli): the module every process runs; for tests and debugging.
set -euo pipefail

nproc="${NPROC:-2}"
nnodes="${NNODES:-1}"

if [[ "$nnodes" == "1" ]]; then
    exec torchrun --standalone --nproc_per_node "$nproc" -m "${RCT_DIST_ENTRY:-rct_dist.cli}" "$@"
fi

if [[ -z "${MASTER_ADDR:-}" ]]; then
    echo "$0: NNODES=$nnodes needs MASTER_ADDR (an address of the first node)" >&2
    exit 2
fi
port="${MASTER_PORT:-29500}"

if [[ -n "${NODE_RANK:-}" ]]; then
    # static rendezvous: fixed node ranks
    exec torchrun --nnodes "$nnodes" --node_rank "$NODE_RANK" --nproc_per_node "$nproc" \
        --master_addr "$MASTER_ADDR" --master_port "$port" -m "${RCT_DIST_ENTRY:-rct_dist.cli}" "$@"
fi
exec torchrun --nnodes "$nnodes" --nproc_per_node "$nproc" --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$port" --rdzv_id "${RDZV_ID:-rct-dist}" -m "${RCT_DIST_ENTRY:-rct_dist.cli}" "$@"
