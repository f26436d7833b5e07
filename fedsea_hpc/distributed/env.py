"""Launcher environment → torch.distributed environment.

One entry point runs under torchrun, Open MPI, MPICH/Hydra (PMI) or Slurm's ``srun``. We read
rank / world size / local rank from the first launcher whose variables are present, and we
never rely on DeepSpeed's own MPI discovery (it picks a non-loopback address).
"""
from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Mapping

# (rank, world size, local rank) variable names, in order of precedence.
_LAUNCHERS = (
    ("torchrun", "RANK", "WORLD_SIZE", "LOCAL_RANK"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("pmi", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
    ("slurm", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),
)


@dataclass(frozen=True)
class LaunchInfo:
    launcher: str
    rank: int
    world_size: int
    local_rank: int


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank/world/local rank from the environment; a plain ``python`` run is rank 0 of 1."""
    env = os.environ if environ is None else environ
    for name, r, w, lr in _LAUNCHERS:
        if r in env and w in env:
            rank, world = int(env[r]), int(env[w])
            # MPICH's Hydra only sets MPI_LOCALRANKID on some versions; PMI_LOCAL_RANK on others.
            local = env.get(lr) or env.get("PMI_LOCAL_RANK") or "0"
            return LaunchInfo(name, rank, world, int(local))
    return LaunchInfo("none", 0, 1, 0)


def say(line: str) -> None:
    """One line to stderr in a single write: ranks sharing the launcher's pipe never interleave."""
    sys.stderr.flush()
    os.write(2, (line.rstrip("\n") + "\n").encode())


def free_port() -> int:
    """A TCP port free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_port(job_id: int) -> int:
    """The rendezvous port of Slurm job ``job_id`` (slurm/job.sh uses the same rule): one port
    per job, so two jobs sharing a node do not collide."""
    return 20000 + job_id % 20000


def setup_torch_env(info: LaunchInfo) -> None:
    """Export RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT for ``init_process_group``.

    MASTER_ADDR/PORT come from the environment when set (Slurm scripts export them). A rank
    started by ``srun`` without them takes the first host of ``SLURM_JOB_NODELIST`` and
    :func:`slurm_port` of ``SLURM_JOB_ID``. Otherwise the job is single-node: loopback, and a
    free port chosen by rank 0 and agreed over MPI. ``FEDSEA_IFNAME`` names the network
    interface for gloo and NCCL (``GLOO_SOCKET_IFNAME``/``NCCL_SOCKET_IFNAME``, unless set).
    """
    os.environ["RANK"] = str(info.rank)
    os.environ["WORLD_SIZE"] = str(info.world_size)
    os.environ["LOCAL_RANK"] = str(info.local_rank)
    if ifname := os.environ.get("FEDSEA_IFNAME"):  # the interface gloo and NCCL talk over (e.g. ib0)
        os.environ.setdefault("GLOO_SOCKET_IFNAME", ifname)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", ifname)
    if info.launcher == "slurm":  # srun without slurm/job.sh: the same address and port it would export
        if "MASTER_ADDR" not in os.environ and os.environ.get("SLURM_JOB_NODELIST") is not None:
            from fedsea_hpc.distributed.nodelist import NodeListError, first

            try:
                os.environ["MASTER_ADDR"] = first(os.environ["SLURM_JOB_NODELIST"])
            except NodeListError as e:
                raise NodeListError(f"SLURM_JOB_NODELIST: {e}; allowed: host names with [lo-hi,n] ranges, "
                                    "e.g. node[01-04,07]") from None
        if "MASTER_PORT" not in os.environ and os.environ.get("SLURM_JOB_ID", "").isdigit():
            os.environ["MASTER_PORT"] = str(slurm_port(int(os.environ["SLURM_JOB_ID"])))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if os.environ["MASTER_ADDR"] in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if "MASTER_PORT" not in os.environ:
        if info.world_size == 1:
            port = free_port()
        elif info.launcher in ("openmpi", "pmi"):
            from mpi4py import MPI  # imported only under an MPI launcher: it initialises MPI

            port = MPI.COMM_WORLD.bcast(free_port() if info.rank == 0 else None, root=0)
        else:
            raise RuntimeError("MASTER_PORT is not set and no MPI launcher is present to agree on one; "
                               "export MASTER_ADDR and MASTER_PORT")
        os.environ["MASTER_PORT"] = str(port)


def store_barrier(name: str, world_size: int, timeout_s: float) -> None:
    """Wait until ``world_size`` ranks have called this with ``name``, up to ``timeout_s``.

    Goes through the rendezvous store rather than a collective, so it has its own deadline: the
    process group's timeout (``comm.timeout_s``) is meant for a stuck peer mid-run, not for the
    minutes a large checkpoint may take to load before the first step.
    """
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store.add(name, 1)
    deadline = time.monotonic() + timeout_s
    while (ready := store.add(name, 0)) < world_size:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {ready} of {world_size} ranks were ready after comm.startup_timeout_s="
                               f"{timeout_s:g} s ('{name}')")
        time.sleep(0.05)
