"""A lost rank is named in one line, within the timeout (rct_dist/distributed/peers.py), by real gloo ranks.

Three processes join a job the way the DeepSpeed launcher starts them (RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; rank 0 hosts the store) through `engine.init_distributed`, then all-reduce in a loop on a
group made with `new_group(ranks)` and no timeout, as DeepSpeed makes its data-parallel group, inside
`PeerWatch`. One rank is then killed, frozen (SIGSTOP: what a cut link looks like to its peers) or fails on
its own; the others must end within run.dist_timeout + the roll call with a line naming it. The
namespace-cluster test (test_cluster_ssh.py) cuts a real link between two nodes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from multiprocess import run_ranks
from rct_dist.distributed import free_port
from rct_dist.distributed.peers import PeerLost, PeerWatch, _ranges, is_communication_failure

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30  # run.dist_timeout of these jobs (it bounds their rendezvous too: room for a busy machine)
BOUND_S = TIMEOUT_S + 10 + 30  # the collective's timeout, the roll call, slack for a busy 2-core machine

WORKER = """
import os, sys, time
import torch, torch.distributed as dist
import deepspeed  # (the slow imports first: every rank then joins the store well within the timeout)
from rct_dist.train.engine import init_distributed
from rct_dist.distributed.peers import PeerWatch, PeerLost

open(os.environ["GO"] + ".imported" + os.environ["RANK"], "w").close()
while not all(os.path.exists(os.environ["GO"] + ".imported" + str(r)) for r in range(int(os.environ["WORLD_SIZE"]))):
    time.sleep(0.05)
world = init_distributed(float(os.environ["TIMEOUT_S"]))
group = dist.new_group(list(range(world.size)))  # as DeepSpeed makes its groups: no timeout of its own
x = torch.ones(1000)
try:
    with PeerWatch(world.rank, world.size, hint="Rerun to resume.", label="LOST"):
        for step in range(100000):
            dist.all_reduce(x, group=group)
            x.fill_(1.0)
            if step == 3:
                print("ready", flush=True)
            if world.rank == int(os.environ["ODD_RANK"]) and os.path.exists(os.environ["GO"]):
                if os.environ["MODE"] == "exit":
                    os._exit(9)
                if os.environ["MODE"] == "fail":
                    raise ValueError("sample 17 of shard 3 is corrupt")
            time.sleep(0.01)
except PeerLost as lost:  # (or the watch's own thread says it, with the same label, and ends the process)
    sys.stderr.write("LOST: " + str(lost) + "\\n")
    sys.stderr.flush()
    os._exit(1)
"""


def _start(tmp_path: Path, mode: str, odd_rank: int, size: int = 3) -> tuple[list[subprocess.Popen], Path]:
    go = tmp_path / "go"
    port = free_port()
    procs = []
    for rank in range(size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "TIMEOUT_S": str(TIMEOUT_S), "ODD_RANK": str(odd_rank), "MODE": mode, "GO": str(go)}
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, cwd=ROOT, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for proc in procs:  # every rank past its first collectives (DeepSpeed prints a warning before)
        line = "-"
        while line and line.strip() != "ready":
            line = proc.stdout.readline()
        assert line, proc.stderr.read()
    return procs, go


def _finish(procs: list[subprocess.Popen], survivors: list[int], since: float) -> dict[int, str]:
    """Each survivor's LOST line (they must end within BOUND_S of `since`); every process is ended."""
    said = {}
    try:
        for r in survivors:
            out, err = procs[r].communicate(timeout=max(1.0, since + BOUND_S - time.time()))
            took = time.time() - since
            lines = [line for line in err.splitlines() if line.startswith("LOST: ")]
            assert procs[r].returncode == 1 and len(lines) == 1, (r, out[-2000:], err[-3000:])
            assert took < BOUND_S, (r, took)
            said[r] = lines[0][6:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    return said


def test_a_killed_rank_is_named_by_every_other_rank(tmp_path):
    procs, go = _start(tmp_path, "exit", odd_rank=2)
    pid = procs[2].pid
    go.touch()
    said = _finish(procs, [0, 1], time.time())
    for r, line in said.items():
        assert line.startswith(f"lost rank 2 on {socket.gethostname()} (pid {pid}): a collective failed on rank "), line
        assert line.endswith("and it does not answer within 10 s. Rerun to resume."), line


def test_a_frozen_rank_is_named_within_the_timeout_on_a_group_without_its_own(tmp_path):
    """SIGSTOP keeps the rank's sockets open: the survivors learn it only from the timeout, which must be
    run.dist_timeout on DeepSpeed-style groups too (torch's default for them is 30 minutes)."""
    procs, _ = _start(tmp_path, "none", odd_rank=1)
    os.kill(procs[1].pid, signal.SIGSTOP)
    stopped = time.time()
    said = _finish(procs, [0, 2], stopped)  # (ends the frozen rank too)
    for line in said.values():
        assert line.startswith(f"lost rank 1 on {socket.gethostname()} (pid {procs[1].pid}): "), line
    assert any("Timed out" in line for line in said.values()), said  # the survivors' own collective timed out


def test_a_rank_failing_on_its_own_is_named_with_its_error(tmp_path):
    procs, go = _start(tmp_path, "fail", odd_rank=1)
    go.touch()
    said = _finish(procs, [0, 2], time.time())
    err = procs[1].stderr.read() if procs[1].stderr and not procs[1].stderr.closed else ""
    for line in said.values():
        assert f"rank 1 on {socket.gethostname()} (pid {procs[1].pid}) failed with ValueError: sample 17 of shard " \
               "3 is corrupt" in line, (line, err)
        assert "lost rank" not in line, line  # it answered: not lost


def test_losing_rank_zero_takes_the_store_and_says_so(tmp_path):
    procs, go = _start(tmp_path, "exit", odd_rank=0)
    go.touch()
    said = _finish(procs, [1, 2], time.time())
    for r, line in said.items():
        assert line.startswith("lost contact with the job: a collective failed ("), line
        assert f"rank 0's node is lost or rank {r}'s node is cut off. Rerun to resume." in line, line


def test_one_rank_watch_is_inert_and_errors_pass_through():
    with pytest.raises(ValueError, match="bad"):
        with PeerWatch(0, 1, address=("127.0.0.1", 1)):  # nothing listens on port 1: one rank never connects
            raise ValueError("bad")


def test_a_group_made_without_a_tcp_store_runs_without_the_watch():
    """run_ranks (tests/multiprocess.py) and users who call train() inside their own file:// group: the
    store is a FileStore, so there is nothing to call the roll through; the job runs as before."""
    values = run_ranks(_watched_all_reduce, 2)
    assert values == [(None, 2.0), (None, 2.0)]


def _watched_all_reduce(rank: int, world: int) -> tuple:
    import torch
    import torch.distributed as dist

    with PeerWatch(rank, world) as watch:
        x = torch.ones(1)
        dist.all_reduce(x)
    return watch.address, float(x)


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("[/x/third_party/gloo/gloo/transport/tcp/pair.cc:545] Read error [10.0.0.2]:41: Connection reset"),
     True),
    (RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation"), True),
    (RuntimeError("DataLoader timed out after 5 seconds"), False),
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x2)"), False),
    (ValueError("gloo"), False),
    (PeerLost("lost rank 1"), False),
])
def test_which_errors_are_failed_collectives(error, expected):
    assert is_communication_failure(error) is expected


def test_rank_ranges():
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"
    assert _ranges([3]) == "3"
