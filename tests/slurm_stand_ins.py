"""Stand-in SLURM commands (`srun`, `sbatch`, `scontrol`) for tests on one machine without SLURM.

One copy for every test that starts a job "under SLURM", so the tasks each test sees carry the same
variables a real `srun` sets (SLURM_PROCID, SLURM_LOCALID, SLURM_NODEID, SLURM_NTASKS,
SLURM_STEP_NUM_TASKS, SLURM_NTASKS_PER_NODE) and a fix to one reaches all of them.
"""

from __future__ import annotations

import random
import shlex
from pathlib import Path
from typing import Sequence

from rct_dist.distributed.ports import port_is_free

SRUN = r"""#!/usr/bin/env bash
# stand-in for srun on this one machine: start the job step's tasks with SLURM's task variables
nodes=${SLURM_NNODES:-1}; per_node=${SLURM_NTASKS_PER_NODE:-}; ntasks=
while [[ $# -gt 0 && "$1" == -* ]]; do
    case "$1" in
        --nodes|-N) nodes=$2; shift 2 ;;
        --nodes=*) nodes=${1#*=}; shift ;;
        --ntasks-per-node) per_node=$2; shift 2 ;;
        --ntasks-per-node=*) per_node=${1#*=}; shift ;;
        --ntasks|-n) ntasks=$2; shift 2 ;;
        --ntasks=*) ntasks=${1#*=}; shift ;;
        --*=*) shift ;;
        *) echo "stand-in srun: unknown option $1" >&2; exit 64 ;;
    esac
done
[[ -n "$per_node" ]] || per_node=$(( ${SLURM_NTASKS:-1} / nodes ))
ntasks=${ntasks:-$(( nodes * per_node ))}
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$(( i % per_node )) SLURM_NODEID=$(( i / per_node )) SLURM_NTASKS=$ntasks \
        SLURM_STEP_NUM_TASKS=$ntasks SLURM_NTASKS_PER_NODE=$per_node "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

SBATCH = r"""#!/usr/bin/env bash
# stand-in for sbatch: run the batch script now, in the foreground, as a 1-node allocation of 2 tasks
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
script=$1; shift
echo "Submitted batch job $SLURM_JOB_ID"
export SLURM_NNODES=1 SLURM_NTASKS=2 SLURM_NTASKS_PER_NODE=2 SLURM_CPUS_PER_TASK=1
exec bash "$script" "$@"
"""

SCONTROL = r"""#!/usr/bin/env bash
# stand-in for `scontrol show hostnames LIST`: one host per line ({what})
[[ "$1 $2" == "show hostnames" ]] || exit 64
{body}
"""


def scontrol_script(hostnames: Sequence[str] | None = None) -> str:
    """`scontrol show hostnames LIST` printing LIST's comma-separated hosts, or `hostnames` whatever LIST is
    (to map a node list such as `node-[a-b]` onto hosts that exist here)."""
    if hostnames is None:
        return SCONTROL.format(what="the list's comma-separated names", body="tr ',' '\\n' <<< \"$3\"")
    words = " ".join(shlex.quote(h) for h in hostnames)
    return SCONTROL.format(what="fixed hosts, whatever the list", body=f"printf '%s\\n' {words}")


def install(bin_dir: Path, hostnames: Sequence[str] | None = None) -> Path:
    """Write executable `srun`, `sbatch` and `scontrol` into `bin_dir` (made if missing); put it first on
    PATH. `hostnames`: what `scontrol show hostnames` prints (default: the list it is given)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, text in (("srun", SRUN), ("sbatch", SBATCH), ("scontrol", scontrol_script(hostnames))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return bin_dir


def slurm_port() -> int:
    """A free port in 20000-39999, so that SLURM_JOB_ID = port gives the CLI's 20000 + id % 20000 = port."""
    candidates = list(range(20000, 40000))
    random.Random().shuffle(candidates)  # its own generator: the tests' seeded draws stay as they were
    for port in candidates:
        if port_is_free(port):
            return port
    raise RuntimeError("no free port in 20000-39999")
