"""The launchers in launch/: syntax, shellcheck, and real 2-process runs on CPU (gloo).

Each launcher is run with RCT_DIST_ENTRY pointing at a small probe module (written here) that joins
the process group from the environment the launcher set, all-reduces its rank and prints what it saw;
one real run of `rct-dist demo` (the trainer, deepspeed.initialize included) goes through
the plain `deepspeed --module rct_dist.cli` launcher. SLURM is exercised with stand-in `srun`/`scontrol`
commands (no SLURM here), through `rct-dist world`, since the CLI reads SLURM's variables itself.
tests/test_world.py starts every launcher style bare.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_stand_ins import install as install_slurm_stand_ins

from rct_dist.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), LAUNCH / "slurm.sbatch"])

PROBE = '''
import json, os, sys
import torch.distributed as dist
dist.init_process_group("gloo")
import torch
total = torch.tensor([float(dist.get_rank())])
dist.all_reduce(total)
keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
seen = {**{k: os.environ.get(k) for k in keys}, "rank": dist.get_rank(), "world": dist.get_world_size(),
        "rank_sum": total.item(), "argv": sys.argv[1:]}
with open(os.path.join(os.environ["PROBE_DIR"], f"rank{dist.get_rank()}.json"), "w") as f:
    json.dump(seen, f)
dist.barrier()
dist.destroy_process_group()
'''

@pytest.fixture()
def probe_env(tmp_path):
    (tmp_path / "launch_probe.py").write_text(PROBE)
    (tmp_path / "probes").mkdir()
    path = os.environ.get("PYTHONPATH")
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{path}" if path else str(tmp_path),
        "RCT_DIST_ENTRY": "launch_probe",
        "PROBE_DIR": str(tmp_path / "probes"),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _run(cmd, env, timeout=90, cwd=ROOT):
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False, cwd=cwd)


def _probes(out: subprocess.CompletedProcess, env: dict) -> list[dict]:
    """What each rank of the probe saw (its files are then removed, for the next run)."""
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    files = sorted(Path(env["PROBE_DIR"]).glob("rank*.json"))
    probes = sorted((json.loads(f.read_text()) for f in files), key=lambda p: p["rank"])
    for f in files:
        f.unlink()
    return probes


def _check_two_ranks(probes: list[dict], argv: list[str]) -> None:
    assert [p["rank"] for p in probes] == [0, 1]
    for p in probes:
        assert p["world"] == 2 and p["WORLD_SIZE"] == "2" and p["RANK"] == str(p["rank"])
        assert p["rank_sum"] == 1.0  # both ranks joined the same group
        assert p["argv"] == argv  # no --local_rank or other launcher arguments slipped in


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_scripts_are_executable():
    for script in LAUNCH.glob("*.sh"):
        assert os.access(script, os.X_OK), script


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_shellcheck():
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


ARGV = ["transfer", "--config", "a b.yaml", "optim.lr=3e-4", "x=$(echo no)"]  # spaces and $() stay literal


def test_accelerate_launcher_two_processes(probe_env):
    env = {**probe_env, "NUM_PROCESSES": "2", "MASTER_PORT": str(free_port())}
    probes = _probes(_run(["bash", str(LAUNCH / "accelerate.sh"), *ARGV], env), env)
    _check_two_ranks(probes, ARGV)
    assert {p["LOCAL_RANK"] for p in probes} == {"0", "1"}


def test_deepspeed_wrapper_single_node_two_processes(probe_env):
    env = {**probe_env, "NUM_GPUS": "2", "MASTER_PORT": str(free_port())}
    _check_two_ranks(_probes(_run(["bash", str(LAUNCH / "deepspeed.sh"), *ARGV], env), env), ARGV)


def test_torchrun_single_node_two_processes(probe_env):
    env = {**probe_env, "NPROC": "2"}
    _check_two_ranks(_probes(_run(["bash", str(LAUNCH / "torchrun.sh"), *ARGV], env), env), ARGV)


def test_torchrun_two_nodes_on_localhost(probe_env):
    """NNODES=2, one process per 'node', both nodes on this machine (static rendezvous)."""
    port = str(free_port())
    base = {**probe_env, "NNODES": "2", "NPROC": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    cmd = ["bash", str(LAUNCH / "torchrun.sh"), *ARGV]
    procs = [subprocess.Popen(cmd, env={**base, "NODE_RANK": str(r)}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    outs = [subprocess.CompletedProcess(cmd, p.wait(timeout=90), *p.communicate()) for p in procs]
    assert outs[0].returncode == 0, outs[0].stderr[-3000:]
    probes = _probes(outs[1], base)
    _check_two_ranks(probes, ARGV)
    assert all(p["LOCAL_RANK"] == "0" for p in probes)


def _two_nodes(script: str, env: dict, ranks: dict[str, str]) -> list[dict]:
    """Start `script` twice on this machine, as node 0 and node 1 of a 2-node job (env + ranks[i])."""
    cmd = ["bash", str(LAUNCH / script), *ARGV]
    procs = [subprocess.Popen(cmd, env={**env, **{k: str(i) for k in ranks}}, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in (0, 1)]
    for p in procs:
        out, _ = p.communicate(timeout=90)
        assert p.returncode == 0, out[-3000:]
    return _probes(subprocess.CompletedProcess(cmd, 0, "", ""), env)


def test_deepspeed_launcher_no_ssh_two_nodes_on_localhost(probe_env, tmp_path):
    """HOSTFILE + NODE_RANK (--no_ssh): each 'node' started by hand, both on this machine."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nlocalhost slots=1\n127.0.0.1 slots=1\n")
    env = {**probe_env, "HOSTFILE": str(hostfile), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    probes = _two_nodes("deepspeed.sh", env, {"NODE_RANK": ""})
    _check_two_ranks(probes, ARGV)


def test_accelerate_two_machines_on_localhost(probe_env):
    env = {**probe_env, "NUM_MACHINES": "2", "NUM_PROCESSES": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    _check_two_ranks(_two_nodes("accelerate.sh", env, {"MACHINE_RANK": ""}), ARGV)


def test_slurm_batch_script_with_stand_in_srun(probe_env, tmp_path):
    """slurm.sbatch as SLURM would run it, one node of 2 tasks, stand-in srun/scontrol: each task is a bare
    `python -m rct_dist.cli world` that reads SLURM's task variables itself."""
    bin_dir = install_slurm_stand_ins(tmp_path / "bin", hostnames=["127.0.0.1", "node-b"])  # node-[a-b], here
    env = {**probe_env, "PATH": f"{bin_dir}{os.pathsep}{probe_env['PATH']}", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_ID": "4242", "MASTER_PORT": str(free_port()),
           "RCT_DIST_ENTRY": "rct_dist.cli"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    seen_file = tmp_path / "seen.json"
    out = _run(["bash", str(LAUNCH / "slurm.sbatch"), "world", "--out", str(seen_file)], env)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    seen = json.loads(seen_file.read_text())
    assert [s["rank"] for s in seen] == [0, 1] and all(s["all_reduce_ok"] for s in seen)
    assert {s["found_by"] for s in seen} == {"slurm"} and [s["local_rank"] for s in seen] == [0, 1]
    assert {s["master"] for s in seen} == {f"127.0.0.1:{env['MASTER_PORT']}"}  # from scontrol's first host


def test_plain_deepspeed_launcher_runs_the_demo_on_two_processes(tmp_path):
    """The real thing, launched as DeepSpeed users do: `deepspeed --num_gpus 2 --module rct_dist.cli demo`
    (the launcher puts --local_rank=N first); 4 short trainings through deepspeed.initialize on 2 gloo
    processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RCT_DIST_ENTRY", None)
    out = _run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "--module", "rct_dist.cli",
                "demo", "--dataset", "digits", "--epochs", "1", "--out", str(tmp_path / "demo")], env, timeout=300,
               cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    assert "dist_world_size=2" in out.stdout + out.stderr  # the launcher started 2 processes
    assert "digits cannot show transfer" in out.stdout
    assert out.stdout.count("exits successfully") == 2 or (out.stdout + out.stderr).count("exits successfully") == 2
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model ") and "R@1" in line)
    assert lines[header + 1].startswith("---")
