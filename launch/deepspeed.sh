#!/usr/bin/env bash
# Run an rct-dist subcommand under the DeepSpeed launcher (`deepspeed`, from the deepspeed package).
#
#   Single node, NUM_GPUS processes (default: every visible GPU; on a CPU-only machine set NUM_GPUS,
#   otherwise the launcher starts ONE process):
#     NUM_GPUS=8 launch/deepspeed.sh transfer --config cub/compression
#     NUM_GPUS=2 launch/deepspeed.sh demo --epochs 1          # 2 CPU processes (gloo)
#
#   Several nodes: a hostfile (`host slots=N` per line, see launch/hostfile.example); run this on the
#   first host. The launcher reaches every host by passwordless ssh (pdsh) and starts
#   `python -m deepspeed.launcher.launch` there in the same directory, so the repository, the venv/
#   image and the data must be at the same paths on every node.
#     HOSTFILE=launch/hostfile.example NUM_GPUS=8 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 \
#       launch/deepspeed.sh transfer --config imagenet/transfer
#
# Environment (all optional):
#   HOSTFILE      hostfile for a multi-node job; unset: this node only
#   NUM_GPUS      processes per node (--num_gpus); with HOSTFILE it caps the slots used per host
#   NUM_NODES     use the first NUM_NODES hosts of HOSTFILE (--num_nodes)
#   MASTER_ADDR   address of rank 0 (--master_addr); the launcher infers it when unset
#   MASTER_PORT   rendezvous port (--master_port; launcher default 29500)
#   NODE_RANK     no-ssh mode (--no_ssh --node_rank): run this script on EVERY node of HOSTFILE yourself
#                 (e.g. one container per node), NODE_RANK = that node's line in HOSTFILE (0-based);
#                 needs MASTER_ADDR. No ssh/pdsh needed.
#   DS_LAUNCHER_ARGS  extra launcher options, split on whitespace, e.g. "--launcher openmpi" or
#                 "--enable_each_rank_log runs/logs"
#
# This is a convenience around the plain launcher, which works as well:
#   deepspeed --num_gpus 8 --module rct_dist.cli transfer --config cub/compression
# Every process runs `python -u -m rct_dist.cli "$@"` with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
# and MASTER_PORT in its environment (`--no_local_rank`: LOCAL_RANK is there, so the argument that the
# launcher would add is left out; the CLI accepts it too).
# RCT_DIST_ENTRY (default rct_dist.cli): the module every process runs; for tests and debugging.
set -euo pipefail

if [[ $# -eq 0 ]]; then
    echo "usage: [HOSTFILE=...] [NUM_GPUS=N] $0 <train-teacher|transfer|demo|make-shards> [args...]" >&2
    exit 2
fi

args=()
if [[ -n "${HOSTFILE:-}" ]]; then
    if [[ ! -f "$HOSTFILE" ]]; then
        echo "$0: HOSTFILE=$HOSTFILE: no such file" >&2
        exit 2
    fi
    args+=(--hostfile "$HOSTFILE")
fi
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")
[[ -n "${NUM_NODES:-}" ]] && args+=(--num_nodes "$NUM_NODES")
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ -n "${MASTER_PORT:-}" ]] && args+=(--master_port "$MASTER_PORT")
if [[ -n "${NODE_RANK:-}" ]]; then
    if [[ -z "${HOSTFILE:-}" || -z "${MASTER_ADDR:-}" ]]; then
        echo "$0: NODE_RANK (no-ssh mode) needs HOSTFILE and MASTER_ADDR" >&2
        exit 2
    fi
    args+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [[ -n "${DS_LAUNCHER_ARGS:-}" ]]; then
    read -r -a extra <<< "$DS_LAUNCHER_ARGS"
    args+=("${extra[@]}")
fi

exec deepspeed "${args[@]}" --no_local_rank --module "${RCT_DIST_ENTRY:-rct_dist.cli}" "$@"
