"""Multi-node launches over ssh on a real (namespace) cluster: 2 nodes, each a network namespace with its own
address, host name and sshd (tests/cluster.py, fixture `cluster`).

- The cluster itself: ssh between the nodes by host name, and a teardown that leaves nothing behind.
- `deepspeed --hostfile H --module rct_dist.cli transfer ...` started on node 0 with 2 nodes x 2 slots: the
  launcher reaches node 1 through pdsh/ssh, 4 ranks train and evaluate, and the exported parameters and
  final R@1 equal a 4-process run on one node (same global batch, same data plan).
- The same through `deepspeed --launcher openmpi` (mpirun over ssh).
- A node cut off mid-run (its link to the switch taken down: no reset, its packets just stop): the ranks on
  node 0 end within run.dist_timeout + the roll call, each with one line naming ranks 2-3 on node1; the
  ranks on node1 end too, the launcher ends (ssh's keep-alive ends node1's session), and the same command
  run again resumes from the newest complete checkpoint to the end.

The environment reaches the ranks on the other node as users pass it: `.deepspeed_env` in the launch folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster import NamespaceCluster
from run_outputs import assert_same_weights as _assert_same_weights, export_weights as _weights
from run_outputs import final_r1 as _final_r1, last_train_step, newest_checkpoint
from rct_dist.train.checkpoint import complete_checkpoints

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
MASTER_PORT = 29500  # inside node 0's own network namespace: no other job can hold it

CONFIG = """
run: {{name: {name}, out_dir: {out}, seed: 5}}
data: {{root: {data}, image_size: 16, views: 2, pk: [5, 4], batch_size: 20, workers: 0}}
model: {{backbone: rct_cnn3_small, embedding_size: 16}}
teacher: {{source: model, backbone: rct_cnn4, embedding_size: 32}}
optim: {{lr: 1.0e-3, epochs: {epochs}}}
deepspeed: {{config: {ds}}}
eval: {{batch_size: 256}}
log: {{every_steps: 5, tensorboard: false, retrieval_images: 0, projector_samples: 0}}
checkpoint: {{every_steps: {every}}}
"""
# ZeRO-2 (gradients reduce-scattered, parameters all-gathered across the hosts). Between the 2x2 ssh job and
# the 4-process one the ranks, their samples and the global batch are the same, and gloo reduces in rank
# order whatever the hosts: measured, the exported parameters are bitwise equal (zero0 and zero2, pdsh and
# openmpi). The tolerance is run_outputs.py's.


def _config(tmp: Path, name: str, data: Path, ds: str = "zero2_fp32", epochs: int = 1, every: int = 0) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(CONFIG.format(name=name, out=tmp / "runs", data=data, ds=ds, epochs=epochs, every=every))
    return path


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    return max(float((wa[k].double() - wb[k].double()).abs().max()) for k in wa)


def _tail(out: subprocess.CompletedProcess, n: int = 5000) -> str:
    return (out.stdout + out.stderr)[-n:]


# ---- the cluster itself

def test_ssh_between_nodes_by_host_name(cluster):
    node0, node1 = cluster.nodes[:2]
    out = cluster.run(0, ["ssh", node1.host, "hostname; hostname -I"])
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [node1.host, node1.address]
    out = cluster.run(0, ["hostname"])
    assert out.stdout.strip() == node0.host
    # pdsh as DeepSpeed's launcher calls it, %n = the node's rank in the -w list
    out = cluster.run(0, ["pdsh", "-S", "-f", "1024", "-w", ",".join(cluster.hosts), "echo rank %n on $(hostname)"],
                      env={**os.environ, "PDSH_RCMD_TYPE": "ssh"})
    assert out.returncode == 0, out.stderr
    assert sorted(out.stdout.splitlines()) == [f"{h}: rank {i} on {h}" for i, h in enumerate(cluster.hosts)]
    # key authentication only: without the test's key, no way in
    no_key = ["-F", "/dev/null", "-o", f"UserKnownHostsFile={cluster.known_hosts}", "-o", "BatchMode=yes",
              "-o", "IdentityFile=none", "-o", "IdentitiesOnly=yes"]
    out = cluster.run(0, ["ssh", "-v", *no_key, node1.host, "true"])
    assert out.returncode == 255 and "Authentications that can continue: publickey\n" in out.stderr
    # nothing of the cluster is on the host's own network
    here = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    assert all(n.address not in here for n in cluster.nodes)
    with pytest.raises(subprocess.TimeoutExpired):  # a command past its time is ended on every node
        cluster.run(0, ["ssh", "node1", "sleep 300"], timeout=2)
    assert set(cluster.pids()) == {n.sshd.pid for n in cluster.nodes}
    assert "eth0" in cluster.run(0, ["ip", "-o", "addr", "show", "to", cluster.nodes[0].address]).stdout


def _host_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout


def test_teardown_leaves_no_namespace_link_or_process(cluster, tmp_path):
    """A second cluster of 3 nodes beside the fixture's (same addresses, separate namespaces), then closed."""
    links = _host_links()
    with NamespaceCluster(tmp_path, 3) as c:
        namespaces = [c.switch, *(n.netns for n in c.nodes)]
        sshds = [n.sshd.pid for n in c.nodes]
        assert c.run(2, ["ssh", "node0", "hostname"]).stdout.strip() == "node0"
        assert all(ns in _namespaces() for ns in namespaces)
        sleeper = c.popen(1, ["sleep", "300"])  # a command left running on a node is ended too
    assert not any(ns in _namespaces() for ns in namespaces)
    assert all(not Path(f"/proc/{pid}").exists() for pid in sshds)
    assert sleeper.wait(timeout=10) != 0
    assert not any(Path("/etc/netns", ns).exists() for ns in namespaces)
    assert _host_links() == links  # nothing was ever added to the host's network namespace
    assert cluster.run(0, ["ssh", "node1", "hostname"]).stdout.strip() == "node1"  # the other cluster untouched


def test_a_failed_start_is_cleaned_up(cluster, tmp_path, monkeypatch):
    c = NamespaceCluster(tmp_path, 2)
    monkeypatch.setattr(c, "_wait_ready", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        c.start()
    assert c.switch not in _namespaces() and not any(n.netns in _namespaces() for n in c.nodes)
    assert all(n.sshd.poll() is not None for n in c.nodes)
    assert not any(Path("/etc/netns", n.netns).exists() for n in c.nodes)


# ---- real jobs

@pytest.fixture(scope="module")
def four_process_reference(digits_shards, tmp_path_factory) -> Path:
    """The same transfer as 4 processes on one node (this machine, torchrun)."""
    tmp = tmp_path_factory.mktemp("one-node")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
           "-m", "rct_dist.cli", "transfer", "--config", str(_config(tmp, "one_node", digits_shards))]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         cwd=ROOT, timeout=600, check=False)
    assert out.returncode == 0, _tail(out)
    return tmp / "runs" / "one_node"


def _launch_folder(tmp: Path, cluster: NamespaceCluster, extra_env: dict[str, str] | None = None) -> Path:
    """A launch folder with a hostfile (2 slots per node) and the .deepspeed_env users write: the variables
    the ranks on the other nodes need (the launcher forwards only PYTHON*, MLFLOW*, ... by itself)."""
    folder = tmp / "launch"
    folder.mkdir()
    (folder / "hostfile").write_text(cluster.hostfile(2))
    env = {"PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", **(extra_env or {})}
    (folder / ".deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    return folder


def _launcher_env() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "RCT_DIST_ENTRY"):
        env.pop(name, None)
    return env


def _check_world(cluster: NamespaceCluster, launcher: list[str], folder: Path) -> None:
    """`rct-dist world` under the launcher: 4 ranks, 2 per node in host order, each with its local rank, one
    all-reduce across both nodes."""
    seen_file = folder / "world.json"
    out = cluster.run(0, ["deepspeed", *launcher, "--module", "rct_dist.cli", "world", "--out", str(seen_file)],
                      env=_launcher_env(), cwd=folder, timeout=300)
    assert out.returncode == 0, _tail(out)
    seen = json.loads(seen_file.read_text())
    assert [(s["rank"], s["host"], s["local_rank"]) for s in seen] == [
        (0, "node0", 0), (1, "node0", 1), (2, "node1", 0), (3, "node1", 1)]
    assert all(s["world_size"] == 4 and s["all_reduce_ok"] for s in seen)
    assert {s["master"] for s in seen} == {f"{cluster.nodes[0].address}:{MASTER_PORT}"}


def _check_job(cluster: NamespaceCluster, launcher: list[str], folder: Path, config: Path, run: Path,
               reference: Path) -> str:
    out = cluster.run(0, ["deepspeed", *launcher, "--module", "rct_dist.cli", "transfer", "--config", str(config)],
                      env=_launcher_env(), cwd=folder, timeout=600)
    assert out.returncode == 0, _tail(out)
    assert last_train_step(run) == last_train_step(reference)
    print(f"max |parameter difference| to the 4-process run: {_max_difference(run, reference):.3g}")
    _assert_same_weights(run, reference)
    assert _final_r1(run) == _final_r1(reference)
    return out.stdout + out.stderr


def test_deepspeed_launcher_over_pdsh_two_nodes_equals_one_node(cluster, digits_shards, four_process_reference,
                                                                tmp_path):
    folder = _launch_folder(tmp_path, cluster)
    launcher = ["--hostfile", "hostfile", "--master_addr", cluster.nodes[0].address, "--master_port", str(MASTER_PORT)]
    _check_world(cluster, launcher, folder)
    log = _check_job(cluster, launcher, folder, _config(tmp_path, "two_nodes", digits_shards),
                     tmp_path / "runs" / "two_nodes", four_process_reference)
    assert "pdsh -S -f 1024 -w node0,node1" in log  # DeepSpeed's pdsh runner, over ssh
    assert "node1: " in log and "exits successfully" in log


def test_deepspeed_launcher_openmpi_two_nodes_equals_one_node(cluster, digits_shards, four_process_reference,
                                                              tmp_path):
    # OpenMPI's runner ignores --master_addr: rank 0's address reaches every rank through .deepspeed_env.
    # mpirun reaches node1 with ssh (its default agent) and the namespace's ssh_config; the nodes' interface
    # is eth0, which DeepSpeed passes to btl_tcp_if_include unless told otherwise.
    folder = _launch_folder(tmp_path, cluster, {"MASTER_ADDR": cluster.nodes[0].address,
                                                "MASTER_PORT": str(MASTER_PORT)})
    launcher = ["--hostfile", "hostfile", "--launcher", "openmpi", "--launcher_args=--allow-run-as-root"]
    _check_world(cluster, launcher, folder)
    log = _check_job(cluster, launcher, folder, _config(tmp_path, "two_nodes_mpi", digits_shards),
                     tmp_path / "runs" / "two_nodes_mpi", four_process_reference)
    assert "mpirun -n 4 -hostfile hostfile" in log


DIST_TIMEOUT_S = 20
CUT_BOUND_S = DIST_TIMEOUT_S + 10 + 15 + 60  # collective timeout, roll call, ssh keep-alive (5 s x 3), slack


def test_a_node_cut_off_mid_run_is_named_and_the_rerun_resumes(cluster, digits_shards, tmp_path):
    folder = _launch_folder(tmp_path, cluster)
    launcher = ["--hostfile", "hostfile", "--master_addr", cluster.nodes[0].address, "--master_port", str(MASTER_PORT)]
    config, run = _config(tmp_path, "cut", digits_shards, ds="zero0_fp32", epochs=2, every=4), tmp_path / "runs" / "cut"
    command = ["deepspeed", *launcher, "--module", "rct_dist.cli", "transfer", "--config", str(config),
               "run.resume=auto", f"run.dist_timeout={DIST_TIMEOUT_S}"]
    log = tmp_path / "cut.log"
    with open(log, "w") as out:
        job = cluster.popen(0, command, env=_launcher_env(), cwd=folder, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while newest_checkpoint(run) < 4 and job.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert job.poll() is None and newest_checkpoint(run) >= 4, log.read_text()[-4000:]
        cluster.cut(1)
        cut = time.time()
        job.wait(timeout=CUT_BOUND_S + 60)
        took = time.time() - cut
        text = log.read_text()
        print(f"cut -> launcher exit: {took:.1f} s")
        assert job.returncode != 0 and took < CUT_BOUND_S, (took, text[-4000:])
        lines = [line for line in text.splitlines() if "rct-dist transfer: " in line]
        assert len(lines) == 2 and all(line.startswith("node0: ") for line in lines), text[-4000:]
        verdict = lines[0].split("rct-dist transfer: ", 1)[1]
        assert lines[1].endswith(verdict)  # both ranks of node0 say the same
        assert verdict.startswith("lost ranks 2-3 on node1 (pids "), verdict
        assert "Timed out" in verdict and "they do not answer within 10 s." in verdict, verdict
        for _ in range(100):  # node1's ranks end too (they cannot reach the store: their own line goes nowhere)
            if not _ranks_on(cluster, 1):
                break
            time.sleep(0.5)
        assert not _ranks_on(cluster, 1)
    finally:
        cluster.kill_jobs()
        cluster.reconnect(1)
    kept = complete_checkpoints(run / "checkpoints")[-1][1]
    out = cluster.run(0, command, env=_launcher_env(), cwd=folder, timeout=600)
    assert out.returncode == 0, _tail(out)
    assert f"resumed from {kept} " in out.stdout + out.stderr
    assert last_train_step(run) == 2 * 11  # 901 images, 4 ranks x 20 per step: 11 steps per epoch


def _ranks_on(cluster: NamespaceCluster, i: int) -> list[int]:
    """PIDs of rct_dist.cli processes in node i's namespace."""
    found = []
    for pid in cluster.pids(i):
        try:
            if b"rct_dist.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(int(pid))
        except OSError:
            pass
    return found
