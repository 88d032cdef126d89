"""Stopping on the scheduler's signal (rct_dist/train/preemption.py), for real: a transfer run gets SIGTERM
or SIGUSR1 mid-epoch, finishes its optimizer step, saves a complete checkpoint, says so in one line and
exits with 75; resumed with run.resume=auto it ends with the uninterrupted run's parameters. Bare (one
process, a second signal during the save) and under torchrun with 2 ranks (torchrun forwards SIGTERM
to its workers). The SLURM requeue path is checked with a stand-in `scontrol` that records its call."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from run_outputs import assert_same_weights as _assert_same_weights, newest_checkpoint as _newest
from rct_dist.config import ConfigError, load_config
from rct_dist.train.checkpoint import complete_checkpoints
from rct_dist.train.preemption import EXIT_STOPPED

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
run: {{name: {name}, out_dir: {out}, seed: 5}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: {workers}}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
optim: {{lr: 1.0e-3, epochs: 2}}
deepspeed: {{config: zero0_fp32}}
eval: {{batch_size: 256}}
log: {{every_steps: 5, tensorboard: false, retrieval_images: 0, projector_samples: 0}}
checkpoint: {{every_steps: 10, keep: 3}}
"""
STOP_BOUND_S = 60  # signal -> exit: one optimizer step, one checkpoint save, the exit (seconds here, on a busy CPU)


def _config(tmp: Path, name: str, data: Path, workers: int = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, out=tmp / "runs", data=data, workers=workers))
    return path


def _command(config: Path, procs: int, *overrides: str) -> list[str]:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
                if procs > 1 else [sys.executable])
    return [*launcher, "-m", "rct_dist.cli", "transfer", "--config", str(config), "run.resume=auto", *overrides]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _run(config: Path, procs: int = 1, *overrides: str) -> str:
    out = subprocess.run(_command(config, procs, *overrides), capture_output=True, text=True, env=_env(),
                         timeout=600, check=False, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out.stdout + out.stderr


def _stop_mid_epoch(config: Path, run: Path, procs: int, signals: list[int], env: dict | None = None
                    ) -> tuple[subprocess.CompletedProcess, float, int]:
    """Start the run, wait for its first periodic checkpoint (step 10), send `signals` (0.2 s apart) to the
    launcher; (result, seconds from the first signal to the exit, step of that checkpoint)."""
    proc = subprocess.Popen(_command(config, procs), cwd=ROOT, env=env or _env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while _newest(run) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(7).uniform(0.0, 0.5))
    assert proc.poll() is None, "the run ended before it could be signalled"
    sent = time.time()
    for number in signals:
        os.kill(proc.pid, number)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=300)
    took = time.time() - sent
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), took, 10


@pytest.fixture(scope="module")
def references(digits_shards, tmp_path_factory) -> dict[int, Path]:
    tmp = tmp_path_factory.mktemp("stop-reference")
    _run(_config(tmp, "one", digits_shards), 1)
    _run(_config(tmp, "two", digits_shards, workers=1), 2)
    return {1: tmp / "runs" / "one", 2: tmp / "runs" / "two"}


SIGNAL_DURING_SAVES = """
import os, signal, sys
from rct_dist.train import checkpoint, preemption
real_save, saves = checkpoint.save, [0]
real_agreed, checks = preemption.StopOnSignal.agreed, [0]
def save(*args, **kwargs):
    saves[0] += 1
    if saves[0] == int(os.environ["SIGNAL_AT_SAVE"]):  # the second signal, inside a save
        os.kill(os.getpid(), signal.SIGTERM)
    return real_save(*args, **kwargs)
def agreed(self, device):
    checks[0] += 1
    if checks[0] == int(os.environ["SIGNAL_AT_CHECK"]):  # the first signal, during optimizer step N
        os.kill(os.getpid(), signal.SIGTERM)
    return real_agreed(self, device)
checkpoint.save, preemption.StopOnSignal.agreed = save, agreed
from rct_dist.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_second_sigterm_during_the_stop_save_and_one_during_a_periodic_save(references, digits_shards, tmp_path):
    config, run = _config(tmp_path, "stopped", digits_shards), tmp_path / "runs" / "stopped"
    command = [sys.executable, "-c", SIGNAL_DURING_SAVES, *_command(config, 1)[3:]]
    # The first signal during step 12, the second inside the stop's own save (the second save of the run).
    out = subprocess.run(command, env=_env(SIGNAL_AT_CHECK="12", SIGNAL_AT_SAVE="2"), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == EXIT_STOPPED, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("rct-dist transfer: stopped on SIGTERM after optimizer step 12: checkpoint ")
    assert last.endswith("is complete; resume with run.resume=auto")
    assert "received SIGTERM again: the stop is already under way" in out.stderr
    assert [step for step, _ in complete_checkpoints(run / "checkpoints")] == [10, 12]
    resumed = _run(config, 1)
    assert f"resumed from {run / 'checkpoints' / 'step000000012'}" in resumed
    _assert_same_weights(run, references[1])
    # A signal inside a periodic save: the stop comes right after it, with that checkpoint (no second save).
    config, run = _config(tmp_path, "periodic", digits_shards), tmp_path / "runs" / "periodic"
    out = subprocess.run(command[:3] + _command(config, 1)[3:], env=_env(SIGNAL_AT_CHECK="0", SIGNAL_AT_SAVE="1"),
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == EXIT_STOPPED and "after optimizer step 10: checkpoint" in out.stderr, out.stderr[-3000:]
    assert [step for step, _ in complete_checkpoints(run / "checkpoints")] == [10]


def test_sigterm_from_outside_mid_epoch_stops_within_the_bound(references, digits_shards, tmp_path):
    config, run = _config(tmp_path, "outside", digits_shards), tmp_path / "runs" / "outside"
    out, took, periodic = _stop_mid_epoch(config, run, 1, [signal.SIGTERM])
    assert out.returncode == EXIT_STOPPED, out.stderr[-3000:]
    assert took < STOP_BOUND_S
    last = out.stderr.strip().splitlines()[-1]
    step = int(last.split("optimizer step ")[1].split(":")[0])
    assert step > periodic and _newest(run) == step  # the stop's own checkpoint, complete, is the newest
    assert "received SIGTERM: stopping after the current optimizer step" in out.stderr
    _run(config, 1)
    _assert_same_weights(run, references[1])


def test_sigterm_to_torchrun_stops_both_ranks_with_a_checkpoint(references, digits_shards, tmp_path):
    config, run = _config(tmp_path, "stopped2", digits_shards, workers=1), tmp_path / "runs" / "stopped2"
    out, took, periodic = _stop_mid_epoch(config, run, 2, [signal.SIGTERM])
    # torchrun forwards SIGTERM to its workers, waits for them (at most 30 s, torch's own limit, then SIGKILL)
    # and exits with its own SignalException: the workers' stop shows in their line and the checkpoint.
    assert out.returncode != 0 and took < STOP_BOUND_S
    assert "stopped on SIGTERM after optimizer step" in out.stderr, out.stderr[-3000:]
    assert _newest(run) > periodic
    resumed = _run(config, 2)
    assert "resumed from" in resumed
    _assert_same_weights(run, references[2])


def test_sigusr1_under_slurm_requeues_the_job(digits_shards, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "scontrol.args"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" > {record}\n")
    (bin_dir / "scontrol").chmod(0o755)
    config, run = _config(tmp_path, "requeued", digits_shards), tmp_path / "runs" / "requeued"
    env = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="4242")
    out, _, periodic = _stop_mid_epoch(config, run, 1, [signal.SIGUSR1], env=env)
    assert out.returncode == EXIT_STOPPED, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "stopped on SIGUSR1" in last and "(SLURM job 4242 requeued)" in last
    assert record.read_text().split() == ["requeue", "4242"] and _newest(run) > periodic


def test_stop_signals_are_checked_names(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("run: {stop_signals: [SIGTERM, SIGKILL]}\n")
    with pytest.raises(ConfigError, match="run.stop_signals must be distinct names among SIGTERM"):
        load_config(path)
    path.write_text("run: {stop_signals: []}\n")
    assert load_config(path).run.stop_signals == []


def test_a_frozen_rank_makes_the_other_fail_within_the_timeout_then_resume(references, digits_shards, tmp_path):
    """A rank that stops answering (SIGSTOP: as a cut link looks to its peers) must not hang the job:
    the other rank's next collective fails after run.dist_timeout, it names the frozen rank in one line
    (distributed/peers.py), torchrun ends the job, and a rerun
    resumes from the last complete checkpoint to the uninterrupted run's parameters."""
    from test_fault_resume import _children

    config, run = _config(tmp_path, "frozen", digits_shards, workers=1), tmp_path / "runs" / "frozen"
    proc = subprocess.Popen(_command(config, 2, "run.dist_timeout=15"), cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while _newest(run) < 10 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before a rank could be frozen"
    workers = _children(proc.pid)
    assert len(workers) == 2
    frozen = workers[-1]
    os.kill(frozen, signal.SIGSTOP)
    stopped = time.time()
    try:
        _, stderr = proc.communicate(timeout=15 + 120)
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    took = time.time() - stopped
    assert proc.returncode != 0 and took < 15 + 60, (took, stderr[-3000:])
    lines = [line for line in stderr.splitlines() if line.startswith("rct-dist transfer: lost rank ")]
    assert len(lines) == 1, stderr[-3000:]  # the other rank's one line, naming the frozen one
    assert f"(pid {frozen}): a collective failed on rank " in lines[0] and "Timed out" in lines[0], lines[0]
    assert lines[0].endswith("run the same command again (run.resume: auto) to go on."), lines[0]
    kept = _newest(run)
    assert kept >= 10
    resumed = _run(config, 2)
    assert f"resumed from {run / 'checkpoints'}" in resumed
    _assert_same_weights(run, references[2])
