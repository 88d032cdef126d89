"""World discovery: every launcher style, read from its own variables, and the refusals.

Unit tests feed `discover_world` environments as each launcher writes them; integration tests start
`rct-dist world` (join the job, all-reduce, report every rank) as 2 CPU processes through each launcher
the way its users call it: `deepspeed --module rct_dist.cli`, `deepspeed $(which rct-dist)`, torchrun,
a bare `srun` (a stand-in: no SLURM here), OpenMPI's `mpirun` (the real one when installed, and a
stand-in that sets OpenMPI's variables), and the DeepSpeed launcher's `--launcher openmpi`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_stand_ins import install as install_slurm_stand_ins, slurm_port

from rct_dist.distributed import free_port
from rct_dist.distributed.ports import port_is_free
from rct_dist.distributed.world import (LaunchError, World, adopt_local_rank, check_local_rank, discover_world,
                                        first_host)

BIN = Path(sys.executable).parent


# --- the environments launchers write -------------------------------------------------------------

def test_torchrun_and_deepspeed_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "29501"}
    assert discover_world(env) == World(3, 8, 1, "10.0.0.1", 29501, "env", 2)


def test_local_rank_argument_fills_in_and_must_agree():
    env = {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1234"}
    assert discover_world(env, local_rank=1).local_rank == 1
    with pytest.raises(LaunchError, match="LOCAL_RANK is not"):
        discover_world(env)
    with pytest.raises(LaunchError, match="disagrees"):
        discover_world({**env, "LOCAL_RANK": "0"}, local_rank=1)


@pytest.mark.parametrize("given, missing", [("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")])
def test_half_set_variables_are_refused(given, missing):
    with pytest.raises(LaunchError) as info:
        discover_world({given: "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    assert f"{given} is set but {missing} is not" in str(info.value)


def test_adopting_the_local_rank_argument_sets_the_variable_or_refuses():
    """The CLI's `--local_rank` goes through the same check as discovery's, then becomes LOCAL_RANK."""
    env: dict[str, str] = {}
    adopt_local_rank(None, env)
    assert env == {}
    adopt_local_rank(1, env)
    assert env == {"LOCAL_RANK": "1"}
    adopt_local_rank(1, env)  # agreeing again is fine
    with pytest.raises(LaunchError, match="--local_rank=0 disagrees with LOCAL_RANK=1"):
        adopt_local_rank(0, env)
    assert env == {"LOCAL_RANK": "1"}
    check_local_rank(3, {"LOCAL_RANK": " 3 "})


def test_many_ranks_need_the_master():
    with pytest.raises(LaunchError, match="MASTER_ADDR and MASTER_PORT not set"):
        discover_world({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    with pytest.raises(LaunchError, match="outside the world"):
        discover_world({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})
    with pytest.raises(LaunchError, match="not an integer"):
        discover_world({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"})


def test_slurm_task_variables():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "gpu[003-005,010],cpu1", "SLURM_NTASKS_PER_NODE": "4"}
    world = discover_world(env)
    assert world == World(5, 16, 1, "gpu003", 20000 + 123456 % 20000, "slurm", 4)
    # srun's own step size wins over the allocation's; MASTER_ADDR/PORT set by the batch script win too
    world = discover_world({**env, "SLURM_STEP_NUM_TASKS": "8", "MASTER_ADDR": "10.1.1.1", "MASTER_PORT": "4000"})
    assert (world.size, world.master_addr, world.master_port) == (8, "10.1.1.1", 4000)
    with pytest.raises(LaunchError, match="SLURM_LOCALID is not set"):
        discover_world({k: v for k, v in env.items() if k != "SLURM_LOCALID"})


@pytest.mark.parametrize("nodelist, host", [("node7", "node7"), ("node[1-3]", "node1"), ("a[01,05]", "a01"),
                                            ("x-y[9],z", "x-y9"), ("gpu-a100-[0010-0012]", "gpu-a100-0010")])
def test_first_host_of_a_slurm_node_list(nodelist, host):
    assert first_host(nodelist) == host


def test_openmpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    assert discover_world(env) == World(1, 2, 1, "127.0.0.1", 29500, "openmpi", 2)  # one node: loopback
    assert discover_world({**env, "MASTER_ADDR": "h", "MASTER_PORT": "7"}).master_addr == "h"


def test_openmpi_across_nodes_without_master_says_how(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # not installed
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}
    with pytest.raises(LaunchError) as info:
        discover_world(env)
    assert "-x MASTER_ADDR" in str(info.value) and ".deepspeed_env" in str(info.value)


@pytest.mark.parametrize("marker", ["PMI_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK"])
def test_an_unreadable_launcher_is_refused(marker):
    with pytest.raises(LaunchError, match=f"cannot read \\({marker} set"):
        discover_world({marker: "1"})


def test_a_lone_local_rank_is_refused():
    with pytest.raises(LaunchError, match="looks like one of several"):
        discover_world({"LOCAL_RANK": "1"})
    with pytest.raises(LaunchError, match="looks like one of several"):
        discover_world({}, local_rank=0)


def test_no_launcher_is_one_process():
    world = discover_world({})
    assert (world.rank, world.size, world.local_rank, world.source) == (0, 1, 0, "single")
    exported: dict[str, str] = {}
    world.export(exported)
    assert exported["WORLD_SIZE"] == "1" and exported["MASTER_ADDR"] == "127.0.0.1"


def test_a_one_process_job_avoids_an_inherited_port_in_use():
    """A parent that ran a job in-process exported RANK/WORLD_SIZE/MASTER_PORT and may still hold the
    port: a one-process child must host its rendezvous elsewhere instead of failing to bind."""
    import socket

    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        busy = held.getsockname()[1]
        assert not port_is_free(busy)
        for env in ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": str(busy)}, {"MASTER_PORT": str(busy)}):
            world = discover_world(env)
            assert world.size == 1 and world.master_port != busy
    free = free_port()
    assert port_is_free(free)
    assert discover_world({"MASTER_PORT": str(free)}).master_port == free  # a free one is kept


# --- 2 processes through each launcher ------------------------------------------------------------

FAKE_MPIRUN = """#!/usr/bin/env bash
# stand-in for OpenMPI's mpirun -n N on one node: N copies with OpenMPI's rank variables
[[ "$1" == "-n" ]] || exit 64
n=$2; shift 2
pids=()
for ((i = 0; i < n; i++)); do
    OMPI_COMM_WORLD_RANK=$i OMPI_COMM_WORLD_SIZE=$n OMPI_COMM_WORLD_LOCAL_RANK=$i OMPI_COMM_WORLD_LOCAL_SIZE=$n "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

FAKE_UNKNOWN = """#!/usr/bin/env bash
# a launcher whose variables the trainer cannot read (LOCAL_RANK only)
pids=()
for i in 0 1; do LOCAL_RANK=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                      "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST",
                      "SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


@pytest.fixture()
def env(tmp_path):
    bin_dir = install_slurm_stand_ins(tmp_path / "bin")
    for name, text in (("fake-mpirun", FAKE_MPIRUN), ("unknown-launcher", FAKE_UNKNOWN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return {**clean, "OMP_NUM_THREADS": "1", "PATH": f"{bin_dir}{os.pathsep}{BIN}{os.pathsep}{os.environ['PATH']}"}


def _world(cmd: list[str], env: dict, out: Path, timeout: int = 180) -> list[dict]:
    result = subprocess.run([*cmd, "world", "--out", str(out)], env=env, capture_output=True, text=True,
                            timeout=timeout, check=False, cwd=out.parent)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return json.loads(out.read_text())


def _check(seen: list[dict], found_by: str) -> None:
    assert [s["rank"] for s in seen] == [0, 1]
    assert all(s["world_size"] == 2 and s["all_reduce_ok"] and s["backend"] == "gloo" for s in seen)
    assert [s["local_rank"] for s in seen] == [0, 1]
    assert {s["found_by"] for s in seen} == {found_by}
    assert len({s["pid"] for s in seen}) == 2 and len({s["master"] for s in seen}) == 1


def test_deepspeed_launcher_with_module(env, tmp_path):
    """The launcher puts --local_rank=N before the subcommand: the top-level parser takes it."""
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "rct_dist.cli"]
    _check(_world(cmd, env, tmp_path / "seen.json"), "env")


def test_deepspeed_launcher_with_the_console_script(env, tmp_path):
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), shutil.which("rct-dist", path=env["PATH"])]
    _check(_world(cmd, env, tmp_path / "seen.json"), "env")


def test_torchrun(env, tmp_path):
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "rct_dist.cli"]
    _check(_world(cmd, env, tmp_path / "seen.json"), "env")


def test_bare_srun(env, tmp_path):
    """`srun python -m rct_dist.cli ...` with no wrapper: the SLURM task variables are read directly."""
    slurm = {**env, "SLURM_NTASKS": "2", "SLURM_JOB_ID": str(slurm_port()), "SLURM_JOB_NODELIST": "localhost"}
    seen = _world(["srun", sys.executable, "-m", "rct_dist.cli"], slurm, tmp_path / "seen.json")
    _check(seen, "slurm")
    assert seen[0]["master"] == f"localhost:{20000 + int(slurm['SLURM_JOB_ID']) % 20000}"


def test_openmpi_variables_stand_in(env, tmp_path):
    env = {**env, "MASTER_PORT": str(free_port())}
    _check(_world(["fake-mpirun", "-n", "2", sys.executable, "-m", "rct_dist.cli"], env, tmp_path / "seen.json"),
           "openmpi")


MPIRUN_AS_ROOT = ["--allow-run-as-root"] if os.geteuid() == 0 else []


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="OpenMPI's mpirun not installed (Debian: openmpi-bin)")
def test_real_mpirun(env, tmp_path):
    cmd = ["mpirun", *MPIRUN_AS_ROOT, "--oversubscribe", "-n", "2", "-x", f"MASTER_PORT={free_port()}",
           sys.executable, "-m", "rct_dist.cli"]
    _check(_world(cmd, env, tmp_path / "seen.json"), "openmpi")


@pytest.mark.skipif(shutil.which("ompi_info") is None, reason="OpenMPI not installed (Debian: openmpi-bin)")
def test_deepspeed_launcher_with_openmpi(env, tmp_path):
    """`deepspeed --launcher openmpi`: before world discovery this became 2 one-process jobs."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    mpi_args = " ".join([*MPIRUN_AS_ROOT, "--oversubscribe", "--mca", "btl_tcp_if_include", "lo",
                         "-x", f"MASTER_PORT={free_port()}"])
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--force_multi", "--no_ssh_check", "--launcher", "openmpi",
           "--launcher_args", mpi_args, "--master_addr", "127.0.0.1", "--module", "rct_dist.cli"]
    _check(_world(cmd, env, tmp_path / "seen.json"), "openmpi")


def test_an_undescribed_multi_process_start_is_refused_on_every_process(env, tmp_path):
    result = subprocess.run(["unknown-launcher", sys.executable, "-m", "rct_dist.cli", "world"], env=env,
                            capture_output=True, text=True, timeout=120, check=False, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("rct-dist world: a local rank") == 2 and "Traceback" not in result.stderr
