"""A small real cluster on one machine: 2-3 nodes as Linux network namespaces, each with its own address,
host name and sshd, for running multi-node launchers (DeepSpeed's pdsh runner, OpenMPI's mpirun) as they
run on a cluster. Needs root, iproute2 (`ip`), util-linux (`unshare`), openssh-server, openssh-client, pdsh.

Design (everything lives inside namespaces this module creates, and goes with them):

- Network: one "switch" namespace holding a bridge, and per node a namespace whose `eth0` is one end of a
  veth pair, the other end enslaved to the bridge. Node i has address SUBNET.(i+1)/24 (10.x addresses that
  exist only inside these namespaces: nothing is added to the host's own network namespace, so nothing can
  listen on its interfaces, and two clusters at once do not collide). The node interface is called `eth0`,
  the name DeepSpeed's OpenMPI runner passes to `btl_tcp_if_include` by default.
- Names: `ip netns exec NS` bind-mounts every entry of /etc/netns/NS/ over /etc/ (iproute2's documented
  per-namespace configuration). Each node gets /etc/netns/NS/hosts (node0..nodeN-1 and their addresses;
  the resolver, ssh, pdsh, gloo and OpenMPI all read it) and /etc/netns/NS/ssh/ssh_config (the client
  configuration with the test's key and known_hosts; ssh takes its user configuration from the home
  directory in the password database, never from $HOME, so a temporary HOME would not reach it).
  HOSTALIASES would not do: ssh, gloo and OpenMPI resolve through getaddrinfo/nsswitch, which ignores it.
- Host names: every command on node i runs in a new UTS namespace whose host name is `node<i>` (`unshare
  --uts`), sshd included, so commands that arrive over ssh see it too; gloo resolves the host name to pick
  the address it listens on, and OpenMPI tells nodes apart by it.
- ssh: per node an sshd (`sshd -D -f CONFIG`, started with `ip netns exec`) listening on the node's address
  only, key authentication only (`PermitRootLogin prohibit-password`), with a host key generated for the
  test; one client key for the test in authorized_keys; known_hosts lists every node's host key, and the
  client checks it strictly. sshd's privilege-separation directory (/run/sshd) comes from a tmpfs mounted
  on /run in sshd's own mount namespace, so nothing is written to the host's /run.
- Teardown (also after a failure half-way through start()): every sshd is stopped by its PID, then any
  process still in a node namespace (`ip netns pids`) by its PID, the namespaces are deleted (their links
  go with them) and /etc/netns/NS is removed. Files under `workdir` are the caller's (a pytest tmp dir).

By hand (as root), see docs/multinode.md:
    python tests/cluster.py /tmp/cluster 2        # starts a cluster, prints how to use it, Ctrl-C stops it
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SUBNET = "10.213.7"  # node i: SUBNET.(i+1); exists only inside the cluster's namespaces
REQUIRED_TOOLS = {"sshd": "openssh-server", "ssh": "openssh-client", "ssh-keygen": "openssh-client",
                  "pdsh": "pdsh", "unshare": "util-linux", "hostname": "hostname"}


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def cannot_make_namespaces() -> str | None:
    """Why network namespaces cannot be made here (None: they can). Creates and deletes a probe namespace."""
    if os.name != "posix" or not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root (run the tests as root to include the ssh cluster tests)"
    if _which("ip") is None:
        return "no `ip` command (iproute2) to make network namespaces"
    probe = f"rctprobe{os.getpid()}"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return f"`ip netns add` fails here: {out.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def missing_tools() -> list[str]:
    """'tool (Debian package)' for every tool the cluster needs that is not installed."""
    return [f"{tool} ({package})" for tool, package in REQUIRED_TOOLS.items() if _which(tool) is None]


@dataclass
class Node:
    index: int
    host: str  # the host name every node resolves (and the node's own `hostname`)
    address: str
    netns: str
    sshd: subprocess.Popen | None = None


class NamespaceCluster:
    """`with NamespaceCluster(tmp_path, 2) as cluster:` ... `cluster.run(0, ["ssh", "node1", "hostname"])`."""

    def __init__(self, workdir: Path, nodes: int = 2, subnet: str = SUBNET):
        if not 1 <= nodes <= 250:
            raise ValueError("1 to 250 nodes")
        self.workdir = Path(workdir)
        tag = f"rct{os.getpid()}x{time.monotonic_ns() % 100000}"  # unique per cluster, for concurrent runs
        self.switch = f"{tag}sw"
        self.nodes = [Node(i, f"node{i}", f"{subnet}.{i + 1}", f"{tag}n{i}") for i in range(nodes)]
        self.key = self.workdir / "ssh" / "id_ed25519"
        self.known_hosts = self.workdir / "ssh" / "known_hosts"
        self._namespaces: list[str] = []
        self._etc_dirs: list[Path] = []

    # ---- running commands on a node
    def command(self, i: int, argv: list[str]) -> list[str]:
        """argv as run on node i: in its network namespace (with its /etc/hosts and ssh_config) and with its
        host name."""
        node = self.nodes[i]
        return ["ip", "netns", "exec", node.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                node.host, *map(str, argv)]

    def run(self, i: int, argv: list[str], *, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
        """Run argv on node i and wait, output captured (text). Past `timeout`, every process the nodes run
        (not the sshds) is killed, the ones reached over ssh included, and TimeoutExpired is raised."""
        kwargs.setdefault("text", True)
        if kwargs.pop("capture_output", True):
            kwargs.setdefault("stdout", subprocess.PIPE)
            kwargs.setdefault("stderr", subprocess.PIPE)
        with subprocess.Popen(self.command(i, argv), **kwargs) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill_jobs()
                out, err = proc.communicate()
                raise subprocess.TimeoutExpired(proc.args, timeout, out, err) from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    def kill_jobs(self) -> None:
        """SIGKILL every process in the nodes' namespaces but the sshds, by PID."""
        keep = {n.sshd.pid for n in self.nodes if n.sshd is not None}
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            left = [pid for pid in self.pids() if pid not in keep]
            if not left:
                return
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.1)

    def cut(self, i: int) -> None:
        """Take node i's link to the switch down: its packets stop, without a reset (a cut cable)."""
        self._ip("link", "set", f"p{i}", "down", netns=self.switch)

    def reconnect(self, i: int) -> None:
        self._ip("link", "set", f"p{i}", "up", netns=self.switch)

    def popen(self, i: int, argv: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.command(i, argv), **kwargs)

    def hostfile(self, slots: int) -> str:
        """A DeepSpeed/OpenMPI hostfile: `nodeI slots=N` per node."""
        return "".join(f"{n.host} slots={slots}\n" for n in self.nodes)

    @property
    def hosts(self) -> list[str]:
        return [n.host for n in self.nodes]

    # ---- start and stop
    def __enter__(self) -> NamespaceCluster:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        try:
            self._network()
            self._keys_and_configs()
            for node in self.nodes:
                self._start_sshd(node)
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _ip(self, *args: str, netns: str | None = None) -> None:
        cmd = ["ip", *(["-n", netns] if netns else []), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")

    def _network(self) -> None:
        for ns in [self.switch, *(n.netns for n in self.nodes)]:
            self._ip("netns", "add", ns)
            self._namespaces.append(ns)
            self._ip("link", "set", "lo", "up", netns=ns)
        self._ip("link", "add", "br0", "type", "bridge", netns=self.switch)
        self._ip("link", "set", "br0", "up", netns=self.switch)
        for node in self.nodes:
            port = f"p{node.index}"
            self._ip("link", "add", "eth0", "netns", node.netns, "type", "veth", "peer", "name", port,
                     "netns", self.switch)
            self._ip("link", "set", port, "master", "br0", "up", netns=self.switch)
            self._ip("addr", "add", f"{node.address}/24", "dev", "eth0", netns=node.netns)
            self._ip("link", "set", "eth0", "up", netns=node.netns)

    def _keys_and_configs(self) -> None:
        ssh_dir = self.workdir / "ssh"
        ssh_dir.mkdir(parents=True, exist_ok=True)
        ssh_dir.chmod(0o700)
        keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", ""]
        subprocess.run([*keygen, "-C", "rct-dist test client", "-f", str(self.key)], check=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        known = []
        for node in self.nodes:
            host_key = ssh_dir / f"{node.host}_host_ed25519"
            subprocess.run([*keygen, "-C", node.host, "-f", str(host_key)], check=True)
            public = host_key.with_suffix(".pub").read_text().split()
            known.append(f"{node.host},{node.address} {public[0]} {public[1]}\n")
            (ssh_dir / f"{node.host}_sshd_config").write_text(
                f"ListenAddress {node.address}:22\n"
                f"HostKey {host_key}\n"
                f"AuthorizedKeysFile {ssh_dir / 'authorized_keys'}\n"
                "PermitRootLogin prohibit-password\n"
                "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
                "UsePAM no\n"
                "StrictModes no\n"  # the key files sit under the world-writable tmp folder
                "PidFile none\nPrintMotd no\nPrintLastLog no\nUseDNS no\nX11Forwarding no\n"
                "LogLevel ERROR\n"
                "MaxStartups 100\nMaxSessions 100\n")  # pdsh and mpirun open several connections at once
        self.known_hosts.write_text("".join(known))
        client = (
            "Host *\n"
            "    User root\n"
            f"    IdentityFile {self.key}\n"
            "    IdentitiesOnly yes\n"
            f"    UserKnownHostsFile {self.known_hosts}\n"
            "    GlobalKnownHostsFile /dev/null\n"
            "    StrictHostKeyChecking yes\n"
            "    PasswordAuthentication no\n"
            "    BatchMode yes\n"
            "    ConnectTimeout 10\n"
            "    ServerAliveInterval 5\n"  # a session to a node that is cut off ends after 3 x 5 s,
            "    ServerAliveCountMax 3\n"  # and with it the launcher's pdsh (docs/multinode.md)
            "    LogLevel ERROR\n")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.host}\n" for n in self.nodes)
        for node in self.nodes:
            etc = Path("/etc/netns") / node.netns
            (etc / "ssh").mkdir(parents=True)
            self._etc_dirs.append(etc)
            (etc / "hosts").write_text(hosts)
            (etc / "ssh" / "ssh_config").write_text(client)

    def _start_sshd(self, node: Node) -> None:
        sshd = _which("sshd")
        config = self.workdir / "ssh" / f"{node.host}_sshd_config"
        log = open(self.workdir / "ssh" / f"{node.host}_sshd.log", "ab")  # noqa: SIM115 (closed with the process)
        # sshd needs /run/sshd (privilege separation): a tmpfs on /run in this mount namespace only.
        script = 'mount -t tmpfs -o mode=755,size=1m rct-run /run && mkdir /run/sshd && exec "$@"'
        node.sshd = self.popen(node.index, ["sh", "-c", script, "sh", sshd, "-D", "-e", "-f", str(config)],
                               stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()

    def _wait_ready(self, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            while True:
                if node.sshd.poll() is not None:
                    log = (self.workdir / "ssh" / f"{node.host}_sshd.log").read_text()
                    raise RuntimeError(f"sshd of {node.host} exited ({node.sshd.returncode}): {log[-2000:]}")
                out = subprocess.run(["ip", "netns", "exec", node.netns, "ss", "-Hltn", f"src {node.address}"],
                                     capture_output=True, text=True, check=False)
                if ":22" in out.stdout:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"sshd of {node.host} does not listen after {timeout} s")
                time.sleep(0.05)

    def pids(self, node: int | None = None) -> list[int]:
        """Every process in one of the cluster's network namespaces (only node `node`'s, when given)."""
        found = []
        for ns in self._namespaces if node is None else [self.nodes[node].netns]:
            out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
            found += [int(p) for p in out.stdout.split()]
        return found

    def close(self) -> None:
        for node in self.nodes:
            if node.sshd is not None and node.sshd.poll() is None:
                node.sshd.terminate()
                try:
                    node.sshd.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.sshd.kill()
                    node.sshd.wait(timeout=10)
        for sig in (signal.SIGTERM, signal.SIGKILL):  # leftovers of commands run on the nodes, by PID
            left = self.pids()
            for pid in left:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 5
            while left and time.monotonic() < deadline:
                time.sleep(0.1)
                left = self.pids()
            if not left:
                break
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        self._namespaces.clear()
        for etc in self._etc_dirs:
            shutil.rmtree(etc, ignore_errors=True)
        self._etc_dirs.clear()
        try:  # /etc/netns itself, when this cluster was its only user
            Path("/etc/netns").rmdir()
        except OSError:
            pass


def main(argv: list[str]) -> int:
    """Start a cluster by hand: `python tests/cluster.py WORKDIR [NODES]`; Ctrl-C (or SIGTERM) removes it."""
    if len(argv) not in (1, 2):
        print("usage (as root): python tests/cluster.py WORKDIR [NODES]", file=sys.stderr)
        return 2
    reason = cannot_make_namespaces() or (f"missing: {', '.join(missing_tools())}" if missing_tools() else None)
    if reason:
        print(reason, file=sys.stderr)
        return 1
    workdir = Path(argv[0]).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM tears down like Ctrl-C
    with NamespaceCluster(workdir, int(argv[1]) if len(argv) == 2 else 2) as cluster:
        for node in cluster.nodes:
            print(f"{node.host}  {node.address}  shell: ip netns exec {node.netns} unshare --uts "
                  f"sh -c 'hostname {node.host} && exec bash'")
        print(f"hostfile:\n{cluster.hostfile(2)}Ctrl-C stops the sshds and removes the namespaces.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
