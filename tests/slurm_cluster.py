"""A real SLURM on the namespace cluster of tests/cluster.py: munge, slurmctld on node0 and one slurmd per node,
all Debian's own binaries (slurm-wlm 22.05 packages slurmctld, slurmd, slurm-client; munge). Needs what
tests/cluster.py needs, and those packages.

Design (everything is started for the test, under its work folder, and stopped by its PID):

- munge: one key made for the test (1024 random bytes, mode 0400) and one munged, started in node0's
  namespace with its own socket, pid, seed and log paths (`munged -F --socket ... --key-file ...`). The
  nodes share the file system, and a Unix socket bound to a path is reachable from every network namespace,
  so this one munged serves every node (on a real cluster each node runs its own with the same key: the
  credentials are the same either way). slurm.conf names the socket (`AuthInfo=socket=PATH`), which both
  the authentication and the job-credential plugins (auth/munge, cred/munge) read. `cred_expire=20`
  (default 120 s): a requeued job waits that long before it may start again.
- slurm.conf, written to the work folder: `SlurmctldHost=node0(ADDRESS)`, `NodeName=nodeI NodeAddr=...
  CPUs=2` per node and one default partition over them; no cgroups (`ProctrackType=proctrack/linuxproc`,
  `TaskPlugin=task/none`), `SelectType=select/cons_tres` with `CR_CPU`, `JobRequeue=1`,
  `ReturnToService=2`, `SlurmUser=root`; state, spool (`%n`: one per node), pid and log files in the work
  folder. Ports: SLURM's defaults (6817 slurmctld, 6818 slurmd), on the nodes' own addresses inside their
  own network namespaces, where nothing else can hold them. No slurmdbd: `AccountingStorageType=
  accounting_storage/none` and `JobAcctGatherType=jobacct_gather/none`, but `JobCompType=jobcomp/filetxt`
  (one line per finished or requeued job in `jobcomp.txt`), which `sacct --completion` reads; plain `sacct`
  needs slurmdbd.
- Daemons: `slurmctld -D -f CONF` on node0, `slurmd -D -N nodeI -f CONF` on node I, each started like the
  sshds (`ip netns exec NS unshare --uts`, host name nodeI: NamespaceCluster.popen), so a job step's tasks,
  started by slurmstepd under the node's slurmd, have the node's address, host name and /etc/hosts.
- Commands (sbatch, srun, squeue, scontrol, sacct, sinfo, scancel): run on node0 (`run(argv)`), with
  SLURM_CONF pointing at the test's slurm.conf; a job's own commands get SLURM_CONF from its environment.
- Teardown (also after a failure in start()): the slurmds, slurmctld and munged are stopped by their PIDs
  (SIGTERM, then SIGKILL), then NamespaceCluster.close() ends whatever is left in the namespaces (job
  steps, tasks) by PID and removes them.

By hand (as root): `python tests/slurm_cluster.py /tmp/rct-slurm 2` starts one and prints how to reach it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from cluster import NamespaceCluster, _which, cannot_make_namespaces
from cluster import missing_tools as cluster_missing_tools

REQUIRED_TOOLS = {"munged": "munge", "slurmctld": "slurmctld", "slurmd": "slurmd", "slurmstepd": "slurmd",
                  "sbatch": "slurm-client", "srun": "slurm-client", "squeue": "slurm-client",
                  "scontrol": "slurm-client", "sacct": "slurm-client", "sinfo": "slurm-client",
                  "scancel": "slurm-client"}
CPUS_PER_NODE = 2
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}


def missing_tools() -> list[str]:
    """'tool (Debian package)' for every tool the SLURM cluster needs (the namespace cluster's included)."""
    return cluster_missing_tools() + [f"{t} ({p})" for t, p in REQUIRED_TOOLS.items() if _which(t) is None]


__all__ = ["SlurmCluster", "cannot_make_namespaces", "missing_tools"]


class SlurmCluster:
    """`with SlurmCluster(tmp_path, 2) as slurm:` ... `slurm.run(["srun", "-N2", "hostname"])`."""

    def __init__(self, workdir: Path, nodes: int = 2, cpus: int = CPUS_PER_NODE):
        self.workdir = Path(workdir)
        self.cluster = NamespaceCluster(self.workdir / "net", nodes)
        self.cpus = cpus
        self.dir = self.workdir / "slurm"
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        self.jobcomp = self.dir / "jobcomp.txt"
        self.munged: subprocess.Popen | None = None
        self.slurmctld: subprocess.Popen | None = None
        self.slurmds: list[subprocess.Popen] = []

    @property
    def nodes(self):
        return self.cluster.nodes

    # ---- commands
    def env(self, **extra: str) -> dict[str, str]:
        env = {**os.environ, "SLURM_CONF": str(self.conf), **extra}
        for name in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_"))]:
            if name != "SLURM_CONF" and name not in extra:  # a surrounding job's variables would leak in
                del env[name]
        return env

    def run(self, argv: list[str], *, node: int = 0, timeout: float = 60, env: dict[str, str] | None = None,
            **kwargs) -> subprocess.CompletedProcess:
        """argv on `node` (default node0) with SLURM_CONF set; output captured (text)."""
        with subprocess.Popen(self.cluster.command(node, argv), env=env or self.env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
                raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def check(self, argv: list[str], **kwargs) -> str:
        out = self.run(argv, **kwargs)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} exited {out.returncode}: {out.stderr.strip()}\n{self.logs()}")
        return out.stdout

    def sbatch(self, argv: list[str], **kwargs) -> int:
        """`sbatch --parsable ARGV` on node0; the job id."""
        return int(self.check(["sbatch", "--parsable", *argv], **kwargs).strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job -o ID` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        if out.returncode != 0:
            return {}
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out.stdout))

    def wait(self, job_id: int, timeout: float = 600, poll: float = 1.0) -> dict[str, str]:
        """Poll `scontrol show job` until the job is in a final state; its last record."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record.get("JobState") in FINISHED:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not finished after {timeout} s: {record}\n{self.logs()}")
            time.sleep(poll)

    def logs(self, tail: int = 3000) -> str:
        parts = []
        for path in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    # ---- start and stop
    def __enter__(self) -> SlurmCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        try:
            self.cluster.start()
            self._files()
            self._start_munged()
            self._start_slurm()
        except BaseException:
            self.close()
            raise

    def _files(self) -> None:
        for sub in ("munge", "log", "state", *(f"spool/{n.host}" for n in self.nodes)):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        (self.dir / "munge").chmod(0o755)  # munged: the socket folder open to all (execute), writable by root only
        key = self.dir / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        d = self.dir
        # slurmd 22.05 loads a cgroup plugin even when nothing uses cgroups; autodetect fails inside the
        # nodes (`ip netns exec` mounts a fresh /sys, without /sys/fs/cgroup). Named outright, cgroup/v1
        # loads without touching any hierarchy: processes are tracked by linuxproc, tasks are not bound.
        (self.dir / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n")
        nodes = "".join(f"NodeName={n.host} NodeAddr={n.address} CPUs={self.cpus} State=UNKNOWN\n"
                        for n in self.nodes)
        self.conf.write_text(
            "ClusterName=rcttest\n"
            f"SlurmctldHost={self.nodes[0].host}({self.nodes[0].address})\n"
            "SlurmUser=root\nSlurmdUser=root\n"
            "SlurmctldPort=6817\nSlurmdPort=6818\n"  # the defaults, in the nodes' own network namespaces
            f"AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={self.munge_socket},cred_expire=20\n"
            f"StateSaveLocation={d / 'state'}\n"
            f"SlurmdSpoolDir={d / 'spool'}/%n\n"
            f"SlurmctldPidFile={d / 'slurmctld.pid'}\n"
            f"SlurmdPidFile={d}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={d / 'log' / 'slurmctld.log'}\n"
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log\n"
            "SlurmctldDebug=info\nSlurmdDebug=info\n"
            "ProctrackType=proctrack/linuxproc\n"
            "TaskPlugin=task/none\n"
            "SelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n"
            "SchedulerType=sched/backfill\n"
            "MpiDefault=none\n"
            "JobRequeue=1\n"
            "ReturnToService=2\n"
            "SlurmdParameters=config_overrides\n"  # the nodes share one machine: take CPUs= as written
            "JobAcctGatherType=jobacct_gather/none\n"
            "AccountingStorageType=accounting_storage/none\n"
            f"JobCompType=jobcomp/filetxt\nJobCompLoc={self.jobcomp}\n"
            "MinJobAge=600\n"  # finished jobs stay visible to scontrol/squeue for 10 minutes
            "KillWait=30\nInactiveLimit=0\nSlurmdTimeout=120\nSlurmctldTimeout=120\nMessageTimeout=30\n"
            + nodes +
            f"PartitionName=test Nodes={','.join(n.host for n in self.nodes)} Default=YES MaxTime=INFINITE "
            "State=UP\n")

    def _daemon(self, node: int, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.dir / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (closed with the process)
        proc = self.cluster.popen(node, argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                  env={**self.env(), "SLURM_CONF": str(self.conf)})
        log.close()
        return proc

    def _start_munged(self) -> None:
        m = self.dir / "munge"
        self.munged = self._daemon(0, "munged", [
            _which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}", f"--key-file={m / 'munge.key'}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}", f"--log-file={m / 'munged.log'}",
            "--num-threads=4"])
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            if self.munged.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"munged did not start ({self.munged.poll()}): {self._read(m / 'munged.log')}"
                                   f"{self._read(self.dir / 'log' / 'munged.stdout')}")
            time.sleep(0.05)

    def _start_slurm(self) -> None:
        self.slurmctld = self._daemon(0, "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        for node in self.nodes:
            self.slurmds.append(self._daemon(node.index, f"slurmd-{node.host}",
                                             [_which("slurmd"), "-D", "-N", node.host, "-f", str(self.conf)]))
        deadline = time.monotonic() + 60
        while True:
            for proc, name in [(self.slurmctld, "slurmctld"), *zip(self.slurmds, (f"slurmd {n.host}" for n in self.nodes))]:
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited ({proc.returncode})\n{self.logs()}")
            out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], timeout=30)
            states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
            if out.returncode == 0 and len(states) == len(self.nodes) and set(states.values()) == {"idle"}:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"SLURM nodes not idle after 60 s: {out.stdout} {out.stderr}\n{self.logs()}")
            time.sleep(0.5)

    @staticmethod
    def _read(path: Path) -> str:
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def close(self) -> None:
        for proc in [*self.slurmds, self.slurmctld, self.munged]:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in [*self.slurmds, self.slurmctld, self.munged]:
            if proc is None:
                continue
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.cluster.close()  # job steps and tasks left in the namespaces, by PID; the namespaces


def main(argv: list[str]) -> int:
    """Start one by hand: `python tests/slurm_cluster.py WORKDIR [NODES]`; Ctrl-C (or SIGTERM) stops it."""
    if len(argv) not in (1, 2):
        print("usage (as root): python tests/slurm_cluster.py WORKDIR [NODES]", file=sys.stderr)
        return 2
    reason = cannot_make_namespaces() or (f"missing: {', '.join(missing_tools())}" if missing_tools() else None)
    if reason:
        print(reason, file=sys.stderr)
        return 1
    workdir = Path(argv[0]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with SlurmCluster(workdir, int(argv[1]) if len(argv) == 2 else 2) as slurm:
        node0 = slurm.nodes[0]
        print(f"node0 shell: SLURM_CONF={slurm.conf} ip netns exec {node0.netns} unshare --uts "
              f"sh -c 'hostname {node0.host} && exec bash'")
        print(slurm.run(["sinfo"]).stdout + "Ctrl-C stops SLURM and removes the namespaces.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
