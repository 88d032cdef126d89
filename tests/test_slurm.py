"""rct-dist under a real SLURM (Debian's slurm-wlm and munge) on the 2-node namespace cluster
(tests/slurm_cluster.py, fixture `slurm`): slurmctld on node0, a slurmd per node, commands on node0.

- The cluster: `sinfo` shows 2 idle nodes; `srun -N2 hostname` runs on node0 and node1.
- `sbatch launch/slurm.sbatch transfer --config C`, the script as users get it with only its #SBATCH sizes
  changed (2 nodes x 2 tasks, 1 CPU per task, no GPUs), runs to the end through `srun`; its exported
  parameters and final R@1 equal the same config as 4 processes on one node (torchrun), as the 2x2 ssh
  runs of tests/test_cluster_ssh.py do; `squeue` no longer lists it, `scontrol show job` and
  `sacct --completion` (the jobcomp file: there is no slurmdbd) show it COMPLETED.
- Preemption: the same job submitted with `--requeue --signal=USR1@60` and `run.resume=auto`, signalled with
  `scancel --signal=USR1 JOB` (every task of the job step, as the time-limit signal is sent) once its first
  checkpoint exists: the tasks finish the optimizer step and save a complete checkpoint, rank 0 runs
  `scontrol requeue` (which ends the job's tasks at once, those that have not left with exit code 75 yet),
  the job starts again, resumes and finishes; its parameters equal the uninterrupted run's; Restarts=1,
  and the job completion file has a record of the requeued start and one of the end.
- The time limit itself: a job submitted with `--requeue --signal=USR1@120` (the recipe of
  docs/multinode.md) whose time limit is cut, once its first checkpoint exists, to end within 2 minutes:
  slurmctld sends SIGUSR1 on its own, the job stops with a checkpoint, requeues itself and, its time limit
  restored, resumes and trains to the end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_outputs import assert_same_weights as _assert_same_weights, final_r1 as _final_r1
from run_outputs import last_train_step as _last_train_step, newest_checkpoint as _newest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SCRIPT = ROOT / "launch" / "slurm.sbatch"
# tests/test_cluster_ssh.py's transfer (ZeRO-2 across the nodes), with a checkpoint every 4 optimizer steps
# (11 steps in the epoch at a global batch of 80) so that a signal finds one to wait for.
CONFIG = """
run: {{name: {name}, out_dir: {out}, seed: 5}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
optim: {{lr: 1.0e-3, epochs: {epochs}}}
deepspeed: {{config: zero2_fp32}}
eval: {{batch_size: 256}}
log: {{every_steps: 5, tensorboard: false, retrieval_images: 0, projector_samples: 0}}
checkpoint: {{every_steps: 4, keep: 3}}
"""

# Only the sizes: 2 nodes x 2 tasks of 1 CPU (the test nodes have 2 CPUs and no GPUs), 30 minutes.
SIZES = {"--nodes": "2", "--ntasks-per-node": "2", "--cpus-per-task": "1", "--time": "00:30:00"}
DROPPED = ("--gpus-per-node",)  # the test nodes have no GPUs (GresTypes unset): the line goes


def _config(tmp: Path, name: str, data: Path, epochs: int = 1) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, out=tmp / "runs", data=data, epochs=epochs))
    return path


def _sized_script(tmp: Path) -> Path:
    """launch/slurm.sbatch with only its #SBATCH size lines changed, as docs/multinode.md tells users."""
    lines, changed = [], set()
    for line in SCRIPT.read_text().splitlines(keepends=True):
        match = re.match(r"#SBATCH (--[\w-]+)=", line)
        if match and match.group(1) in DROPPED:
            changed.add(match.group(1))
            continue
        if match and match.group(1) in SIZES:
            line = f"#SBATCH {match.group(1)}={SIZES[match.group(1)]}\n"
            changed.add(match.group(1))
        lines.append(line)
    assert changed == {*SIZES, *DROPPED}, "launch/slurm.sbatch lost a #SBATCH size line"
    path = tmp / "slurm.sbatch"
    path.write_text("".join(lines))
    return path


def _submit_env(slurm) -> dict[str, str]:
    """The submitting shell: rct-dist's environment active (sbatch exports it to the job), offline hub."""
    env = slurm.env(PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", HF_HUB_OFFLINE="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "RCT_DIST_ENTRY", "OMP_NUM_THREADS"):
        env.pop(name, None)
    return env


def _submit(slurm, tmp: Path, options: list[str], *args: str) -> int:
    """`sbatch OPTIONS <sized copy of launch/slurm.sbatch> ARGS` from the repository root, on node0."""
    log = tmp / "rct-dist-%j.out"
    return slurm.sbatch([f"--output={log}", "--open-mode=append", *options, str(_sized_script(tmp)), *args],
                        env=_submit_env(slurm), cwd=ROOT)


def _job_log(tmp: Path, job: int) -> str:
    path = tmp / f"rct-dist-{job}.out"
    return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture(scope="module")
def four_process_reference(digits_shards, tmp_path_factory) -> Path:
    """The same transfer as 4 processes on one node (this machine, torchrun), as tests/test_cluster_ssh.py."""
    tmp = tmp_path_factory.mktemp("one-node")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "rct_dist.cli", "transfer", "--config", str(_config(tmp, "one_node", digits_shards))]
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"},
                         cwd=ROOT, timeout=600, check=False)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return tmp / "runs" / "one_node"


# ---- the cluster

def test_sinfo_shows_two_idle_nodes_and_srun_reaches_both(slurm):
    out = slurm.check(["sinfo", "-h", "-N", "-o", "%N %t %c"])
    assert sorted(out.splitlines()) == ["node0 idle 2", "node1 idle 2"]
    out = slurm.check(["srun", "-N2", "hostname"])
    assert sorted(out.split()) == ["node0", "node1"]
    out = slurm.check(["srun", "-N2", "--ntasks-per-node=2", "sh", "-c",
                       'echo "$SLURM_PROCID $SLURM_LOCALID $(hostname) $(hostname -I)"'])
    assert sorted(line.strip() for line in out.splitlines()) == [
        f"{r} {r % 2} node{r // 2} {slurm.nodes[r // 2].address}" for r in range(4)]


# ---- the batch script

def test_sbatch_script_two_nodes_equals_one_node(slurm, digits_shards, four_process_reference, tmp_path):
    config = _config(tmp_path, "sbatch", digits_shards)
    started = time.monotonic()
    job = _submit(slurm, tmp_path, [], "transfer", "--config", str(config))
    record = slurm.wait(job, timeout=900)
    took = time.monotonic() - started
    log = _job_log(tmp_path, job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{log[-5000:]}"
    print(f"sbatch job {job}: {took:.0f} s from submission to COMPLETED")
    assert record["NodeList"] == "node[0-1]" and record["NumNodes"] == "2" and record["NumTasks"] == "4"
    assert "rct-dist: 2 node(s) x 2 task(s), master node0:" in log
    run = tmp_path / "runs" / "sbatch"
    assert _last_train_step(run) == _last_train_step(four_process_reference)
    _assert_same_weights(run, four_process_reference)
    assert _final_r1(run) == _final_r1(four_process_reference)
    # squeue no longer lists it; sacct reads the job completion file (no slurmdbd: plain sacct cannot)
    assert str(job) not in slurm.check(["squeue", "-h", "-o", "%i"]).split()
    out = slurm.check(["sacct", "--completion", "-n", "-P", "-j", str(job), "-o", "JobID,State,ExitCode,NodeList"])
    assert out.splitlines() == [f"{job}|COMPLETED|0:0|node[0-1]"], out


# ---- preemption: the scheduler's signal, requeue, resume

def test_sigusr1_requeues_and_the_resumed_job_equals_an_uninterrupted_run(slurm, digits_shards,
                                                                          four_process_reference, tmp_path):
    config = _config(tmp_path, "requeued", digits_shards)
    run = tmp_path / "runs" / "requeued"
    job = _submit(slurm, tmp_path, ["--requeue", "--signal=USR1@60"], "transfer", "--config", str(config),
                  "run.resume=auto")
    deadline = time.monotonic() + 600
    while _newest(run) < 4:  # the first periodic checkpoint, then the signal (as a time limit would send it)
        record = slurm.job(job)
        assert record.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{record}\n{_job_log(tmp_path, job)}"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.2)
    slurm.check(["scancel", "--signal=USR1", str(job)])
    stopped_at = None
    while stopped_at is None:  # the stop line of the first start, then the job starts again
        match = re.search(r"stopped on SIGUSR1 after optimizer step (\d+): .*\(SLURM job (\d+) requeued\)",
                          _job_log(tmp_path, job))
        if match:
            assert int(match.group(2)) == job
            stopped_at = int(match.group(1))
        assert time.monotonic() < deadline, f"no stop line\n{_job_log(tmp_path, job)[-5000:]}"
        time.sleep(0.5)
    record = slurm.wait(job, timeout=max(60.0, deadline - time.monotonic()))
    log = _job_log(tmp_path, job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{log[-5000:]}"
    assert record["Restarts"] == "1", record
    assert 4 <= stopped_at < _last_train_step(four_process_reference)
    # The first start: rank 0 says it stopped with the checkpoint (complete on every rank) and requeued the
    # job; the requeue ends the job's tasks at once (SIGTERM, "CANCELLED ... DUE TO JOB REQUEUE"), so a task
    # ends with exit code 75 only when it leaves before that (measured: all 4 ended by the requeue).
    first, second = log.split("rct-dist: 2 node(s) x 2 task(s)")[1:3]
    assert f"rct-dist transfer: stopped on SIGUSR1 after optimizer step {stopped_at}" in first
    assert f"*** JOB {job} ON node0 CANCELLED AT" in first and "DUE TO JOB REQUEUE ***" in first
    for node in ("node0", "node1"):
        assert re.search(rf"srun: error: {node}: tasks? [\d,-]+: (Exited with exit code 75|Terminated)", first), first
    assert log.count("rct-dist: 2 node(s) x 2 task(s)") == 2  # two starts of the batch script
    assert f"resumed from {run / 'checkpoints'}/step{stopped_at:09d} at epoch 1" in second, second[-3000:]
    assert "stopped on" not in second
    assert _last_train_step(run) == _last_train_step(four_process_reference)
    _assert_same_weights(run, four_process_reference)  # measured: bitwise equal
    # The resumed run's own final evaluation equals the uninterrupted one's (every rank evaluates with rank 0's
    # BatchNorm statistics, the ones a checkpoint and an export hold).
    assert _final_r1(run) == _final_r1(four_process_reference)
    comp = [line for line in slurm.jobcomp.read_text().splitlines() if f"JobId={job} " in line]
    # jobcomp/filetxt writes a record when the requeue ends the first start (with the state the job is in
    # after it: PENDING), and one at the end
    assert [re.search(r"JobState=(\S+)", line).group(1) for line in comp] == ["PENDING", "COMPLETED"], comp


EPOCHS_TL = 20  # 11 optimizer steps each: long enough that slurmctld's signal finds the run training


def _seconds(slurm_time: str) -> int:
    """SLURM's [D-]HH:MM:SS as seconds."""
    days, _, clock = slurm_time.rpartition("-")
    h, m, sec = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + sec


def test_the_time_limit_signal_stops_requeues_and_the_job_resumes_to_the_end(slurm, digits_shards, tmp_path):
    """No scancel: slurmctld sends the signal because the time limit comes near. It checks time limits
    about every 30 s and signals once `now + 120 s (+ up to 30) >= end`; cutting the limit to the elapsed
    whole minutes + 2 puts the end 60-120 s ahead, so the signal comes at its next check, while the
    20-epoch run still trains (8 epochs were over before the signal came). Once the stop line is out the
    limit goes back to 30 minutes, so the requeued
    start runs to the end (the scancel test above checks that a resumed job equals an uninterrupted one)."""
    config = _config(tmp_path, "time_limit", digits_shards, epochs=EPOCHS_TL)
    run = tmp_path / "runs" / "time_limit"
    job = _submit(slurm, tmp_path, ["--requeue", "--signal=USR1@120"], "transfer", "--config", str(config),
                  "run.resume=auto")
    deadline = time.monotonic() + 600
    while _newest(run) < 4:
        record = slurm.job(job)
        assert record.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), f"{record}\n{_job_log(tmp_path, job)}"
        assert time.monotonic() < deadline, "no checkpoint after 600 s"
        time.sleep(0.2)
    minutes = _seconds(slurm.job(job)["RunTime"]) // 60 + 2
    slurm.check(["scontrol", "update", f"JobId={job}", f"TimeLimit={minutes}"])
    cut = time.monotonic()
    stopped_at = None
    while stopped_at is None:
        match = re.search(r"stopped on SIGUSR1 after optimizer step (\d+): .*\(SLURM job (\d+) requeued\)",
                          _job_log(tmp_path, job))
        if match:
            stopped_at = int(match.group(1))
        assert _last_train_step_or_0(run) < EPOCHS_TL * 11 or stopped_at, "the run ended before the time limit came near"
        assert time.monotonic() - cut < 240, f"no stop within 240 s of the cut\n{_job_log(tmp_path, job)[-4000:]}"
        time.sleep(0.5)
    print(f"time limit cut to {minutes} min: SIGUSR1 stop line {time.monotonic() - cut:.0f} s later")
    slurm.check(["scontrol", "update", f"JobId={job}", "TimeLimit=30"])
    record = slurm.wait(job, timeout=max(60.0, deadline + 300 - time.monotonic()))
    log = _job_log(tmp_path, job)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", f"{record}\n{log[-5000:]}"
    assert int(record["Restarts"]) >= 1, record
    assert f"rct-dist transfer: stopped on SIGUSR1 after optimizer step {stopped_at}" in log
    assert f"resumed from {run / 'checkpoints'}/step{stopped_at:09d} " in log, log[-3000:]
    assert "DUE TO TIME LIMIT" not in log  # the stop came before the limit, never the limit's kill
    assert _last_train_step(run) == EPOCHS_TL * 11


def _last_train_step_or_0(run: Path) -> int:
    try:
        return _last_train_step(run)
    except (FileNotFoundError, IndexError):
        return 0
