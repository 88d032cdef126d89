"""Who this process is in the job a launcher started, whichever launcher it was.

Launchers describe a job in environment variables of their own: torchrun, the DeepSpeed launcher and
accelerate set `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`; `srun` sets
`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID` and the node list; OpenMPI's `mpirun` sets
`OMPI_COMM_WORLD_*`. `discover_world` reads whichever is there, in that order, into one `World`, and
`World.export` writes it back as the torch.distributed variables, so everything after it (DeepSpeed,
torch) needs only the one convention.

Refusing is part of the job: a process that was clearly started as one of several but whose world
cannot be read (half-set variables, an MPI without OpenMPI's variables) raises `LaunchError` instead of
running as a one-process job, because N "one-process" jobs writing to one run folder lose work
silently. Only a process with no launcher variables at all runs alone.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, MutableMapping

from rct_dist.distributed.ports import free_port, port_is_free

DEFAULT_PORT = 29500
# Variables that say "a launcher started this process as one of several" without describing the world.
_FOREIGN_MARKERS = ("PMI_RANK", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_RANK", "MPI_LOCALRANKID")


class LaunchError(RuntimeError):
    """The environment describes no usable job: says which variables are wrong and how to fix them."""


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "env" (torchrun, deepspeed, accelerate), "slurm", "openmpi" or "single"
    local_size: int | None = None

    def export(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Write the torch.distributed variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*)."""
        environ = os.environ if environ is None else environ
        environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.size), LOCAL_RANK=str(self.local_rank),
                       MASTER_ADDR=self.master_addr, MASTER_PORT=str(self.master_port))
        if self.local_size is not None:
            environ["LOCAL_WORLD_SIZE"] = str(self.local_size)


def _int(environ: Mapping[str, str], name: str, source: str) -> int:
    text = environ.get(name)
    if text is None or not text.strip():
        raise LaunchError(f"{source}: {name} is not set")
    try:
        return int(text)
    except ValueError:
        raise LaunchError(f"{source}: {name}={text!r} is not an integer") from None


def _check(world: World) -> World:
    if world.size < 1:
        raise LaunchError(f"{world.source}: world size {world.size} must be >= 1")
    if not 0 <= world.rank < world.size:
        raise LaunchError(f"{world.source}: rank {world.rank} is outside the world of {world.size} processes")
    if world.local_rank < 0:
        raise LaunchError(f"{world.source}: local rank {world.local_rank} must be >= 0")
    if not 0 < world.master_port < 65536:
        raise LaunchError(f"{world.source}: MASTER_PORT {world.master_port} is not a TCP port")
    return world


def _port(environ: Mapping[str, str], default: int, source: str) -> int:
    return _int(environ, "MASTER_PORT", source) if environ.get("MASTER_PORT") else default


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (`gpu[003-005,010],cpu1` -> `gpu003`), as `scontrol show
    hostnames` would print it first; no SLURM command needed."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise LaunchError(f"slurm: cannot read the node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _from_env(environ: Mapping[str, str], local_rank_arg: int | None) -> World:
    """torchrun, the DeepSpeed launcher, accelerate, or variables set by hand."""
    source = "env"
    for name, other in (("RANK", "WORLD_SIZE"), ("WORLD_SIZE", "RANK")):
        if environ.get(name) and not environ.get(other):
            raise LaunchError(f"{name} is set but {other} is not: a launcher sets both (with LOCAL_RANK, "
                              "MASTER_ADDR, MASTER_PORT); set all of them, or none for a one-process run")
    size = _int(environ, "WORLD_SIZE", source)
    rank = _int(environ, "RANK", source)
    if environ.get("LOCAL_RANK"):
        local_rank = _int(environ, "LOCAL_RANK", source)
    elif local_rank_arg is not None:
        local_rank = local_rank_arg
    elif size == 1:
        local_rank = 0
    else:
        raise LaunchError(f"RANK={rank} and WORLD_SIZE={size} are set but LOCAL_RANK is not (nor --local_rank): "
                          "it picks this process's GPU; set it to the rank within the node")
    if size > 1:
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not environ.get(k)]
        if missing:
            raise LaunchError(f"WORLD_SIZE={size} but {' and '.join(missing)} not set: every rank needs the address "
                              "and port of rank 0")
        addr, port = environ["MASTER_ADDR"], _int(environ, "MASTER_PORT", source)
    else:
        addr, port = environ.get("MASTER_ADDR") or "127.0.0.1", _own_port(environ, source)
    local_size = _int(environ, "LOCAL_WORLD_SIZE", source) if environ.get("LOCAL_WORLD_SIZE") else None
    return World(rank, size, local_rank, addr, port, source, local_size)


def _from_slurm(environ: Mapping[str, str]) -> World:
    """One task per process started by `srun` (inside or outside `sbatch`)."""
    source = "slurm"
    size_var = "SLURM_STEP_NUM_TASKS" if environ.get("SLURM_STEP_NUM_TASKS") else "SLURM_NTASKS"
    size = _int(environ, size_var, source)
    rank = _int(environ, "SLURM_PROCID", source)
    local_rank = _int(environ, "SLURM_LOCALID", source)
    addr = environ.get("MASTER_ADDR")
    if not addr:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
        if not nodelist:
            if size > 1:
                raise LaunchError("slurm: no SLURM_JOB_NODELIST to find rank 0's host: set MASTER_ADDR")
            nodelist = "127.0.0.1"
        addr = first_host(nodelist)
    job_id = environ.get("SLURM_JOB_ID", "")
    default_port = 20000 + int(job_id) % 20000 if job_id.isdigit() else DEFAULT_PORT  # two jobs on a node differ
    local_size = _int(environ, "SLURM_NTASKS_PER_NODE", source) if (environ.get("SLURM_NTASKS_PER_NODE") or "").isdigit() else None
    return World(rank, size, local_rank, addr, _port(environ, default_port, source), source, local_size)


def _from_openmpi(environ: Mapping[str, str]) -> World:
    """`mpirun` (OpenMPI), directly or as the DeepSpeed launcher's `--launcher openmpi`."""
    source = "openmpi"
    size = _int(environ, "OMPI_COMM_WORLD_SIZE", source)
    rank = _int(environ, "OMPI_COMM_WORLD_RANK", source)
    local_rank = _int(environ, "OMPI_COMM_WORLD_LOCAL_RANK", source)
    local_size = _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", source) if environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") else None
    addr = environ.get("MASTER_ADDR")
    if not addr:
        if local_size == size:
            addr = "127.0.0.1"  # every rank on this node
        else:
            addr = _mpi_master_addr()
    return World(rank, size, local_rank, addr, _port(environ, DEFAULT_PORT, source), source, local_size)


def _mpi_master_addr() -> str:
    """Rank 0's address, broadcast over MPI (mpi4py), for multi-node OpenMPI jobs without MASTER_ADDR."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise LaunchError(
            "openmpi: the ranks span several nodes and MASTER_ADDR is not set: export it to every rank "
            "(`mpirun -x MASTER_ADDR=<first host> -x MASTER_PORT=29500 ...`; under the DeepSpeed launcher, a "
            "line MASTER_ADDR=<first host> in a .deepspeed_env file), or install mpi4py to find it") from None
    addr = socket.gethostbyname(socket.gethostname()) if MPI.COMM_WORLD.Get_rank() == 0 else None
    return MPI.COMM_WORLD.bcast(addr, root=0)


def _own_port(environ: Mapping[str, str], source: str) -> int:
    """The rendezvous port of a one-process job: MASTER_PORT when it is free here, else any free port.

    A one-process job hosts its own rendezvous, so any free port will do; an inherited MASTER_PORT
    (a parent process that ran a job in-process exported it) may still be held by that parent's
    store, and binding it again would fail with "address already in use"."""
    if environ.get("MASTER_PORT"):
        port = _int(environ, "MASTER_PORT", source)
        if port_is_free(port):
            return port
    return free_port()


def check_local_rank(local_rank: int | None, environ: Mapping[str, str] | None = None) -> None:
    """Refuse a `--local_rank` argument that disagrees with LOCAL_RANK (both pick this process's GPU; a
    launcher that sets both sets them equal). An unset or empty LOCAL_RANK agrees with anything."""
    environ = os.environ if environ is None else environ
    given = (environ.get("LOCAL_RANK") or "").strip()
    if local_rank is not None and given and given != str(local_rank):
        raise LaunchError(f"--local_rank={local_rank} disagrees with LOCAL_RANK={environ['LOCAL_RANK']}")


def adopt_local_rank(local_rank: int | None, environ: MutableMapping[str, str] | None = None) -> None:
    """A `--local_rank=N` argument becomes LOCAL_RANK (after `check_local_rank`), so that everything after
    it (discovery, DeepSpeed, torch) reads one place."""
    environ = os.environ if environ is None else environ
    check_local_rank(local_rank, environ)
    if local_rank is not None:
        environ["LOCAL_RANK"] = str(local_rank)


def discover_world(environ: Mapping[str, str] | None = None, local_rank: int | None = None) -> World:
    """The job this process belongs to (see the module docstring for the order and the refusals).

    `local_rank`: the `--local_rank` argument some launchers pass instead of (or besides) LOCAL_RANK;
    it must agree with LOCAL_RANK when both are given.
    """
    environ = os.environ if environ is None else environ
    check_local_rank(local_rank, environ)
    if environ.get("WORLD_SIZE") or environ.get("RANK"):
        return _check(_from_env(environ, local_rank))
    if environ.get("OMPI_COMM_WORLD_SIZE") or environ.get("OMPI_COMM_WORLD_RANK"):
        return _check(_from_openmpi(environ))
    if environ.get("SLURM_PROCID"):
        return _check(_from_slurm(environ))
    foreign = [k for k in _FOREIGN_MARKERS if environ.get(k)]
    if foreign:
        raise LaunchError(
            f"started by a launcher this trainer cannot read ({', '.join(foreign)} set, no RANK/WORLD_SIZE, "
            "OMPI_COMM_WORLD_* or SLURM_PROCID): set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for "
            "every process, or start it with torchrun, deepspeed, srun or OpenMPI's mpirun")
    if environ.get("LOCAL_RANK") or local_rank is not None:
        given = environ.get("LOCAL_RANK") or local_rank
        raise LaunchError(f"a local rank ({given}) is given but no RANK/WORLD_SIZE: this looks like one of several "
                          "processes whose job is not described; set RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT "
                          "too, or unset LOCAL_RANK for a one-process run")
    return World(0, 1, 0, "127.0.0.1", _own_port(environ, "single"), "single", 1)


def check_world() -> list[dict] | None:
    """`rct-dist world`: join the job the launcher started exactly as the trainer does (discovery, then
    the env:// rendezvous DeepSpeed also uses), prove every rank reaches the others with one all-reduce,
    and return what each rank sees, in rank order, on rank 0 (None elsewhere). Imports torch only, so it
    answers in seconds: the first thing to run on a new cluster or launcher."""
    import torch
    import torch.distributed as dist

    world = discover_world()
    world.export()
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        backend, device = "nccl", torch.device("cuda", world.local_rank)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", rank=world.rank, world_size=world.size)
    total = torch.tensor([float(world.rank)], device=device)
    dist.all_reduce(total)
    seen = {"rank": world.rank, "world_size": world.size, "local_rank": world.local_rank,
            "local_size": world.local_size, "found_by": world.source,
            "master": f"{world.master_addr}:{world.master_port}", "host": socket.gethostname(), "pid": os.getpid(),
            "backend": dist.get_backend(), "device": str(device),
            "all_reduce_ok": total.item() == world.size * (world.size - 1) / 2}
    everyone: list = [None] * world.size
    dist.all_gather_object(everyone, seen)
    return everyone if world.rank == 0 else None
