"""A rank's life as a process: torch threads, process-group start, and how it ends.

Once ranks talk to each other, any exception prints ``[rank r] fatal: ...`` and ends the process
at once, so the launcher tears the job down and peers see a closed connection rather than
waiting forever. A finished distributed rank skips Python's teardown (see :func:`exit_now`).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from datetime import timedelta
from typing import Callable

from fedsea_hpc.distributed.env import LaunchInfo, say, setup_torch_env
from fedsea_hpc.distributed.topology import Role, Topology
from fedsea_hpc.errors import InputError


def role_threads(cores: int, clients: int, servers: int) -> dict[str, int]:
    """Torch threads per role when one node holds the whole job: ``{"client": .., "server": ..}``."""
    return {"client": max(1, cores // max(clients, 1)), "server": max(1, cores // max(servers, 1))}


def threads_for(launch: LaunchInfo, topo: Topology | None) -> int:
    """Torch threads for this rank: ``OMP_NUM_THREADS`` if set, else a share of the cores.

    In the split schedule clients and servers take turns (a client waits while the server runs
    its blocks, and the other way round), so on a node that holds the whole job a server rank may
    use ``cores // servers`` threads and a client ``cores // clients`` without oversubscribing.
    Spread over several nodes, ranks get an equal share of their node.
    """
    if "OMP_NUM_THREADS" in os.environ:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("MPI_LOCALNRANKS") or os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE")
                or os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("LOCAL_WORLD_SIZE")
                or launch.world_size)
    if topo is not None and local == launch.world_size:
        return role_threads(cores, topo.clients, topo.servers)["server" if topo.role is Role.SERVER else "client"]
    return max(1, cores // max(local, 1))


def rank_devices(launch: LaunchInfo, topo: Topology, cfg):
    """This rank's :class:`~fedsea_hpc.distributed.devices.Devices` from ``topology.*_device`` and
    ``comm.backend``, before any rank waits on another (a GPU this rank lacks: DeviceError)."""
    import torch

    from fedsea_hpc.distributed.devices import resolve

    available = torch.cuda.is_available()
    return resolve(cfg.comm.backend, cfg.topology.client_device, cfg.topology.server_device,
                   server=topo.role is Role.SERVER, rank=launch.rank, local_rank=launch.local_rank,
                   cuda_available=available, device_count=torch.cuda.device_count() if available else 0)


class PreflightError(InputError):
    """A rank found a problem with its own set-up (a GPU it lacks): every rank stops with it, exit 2."""


def rendezvous(launch: LaunchInfo, comm):
    """The job's TCPStore (hosted by rank 0 at MASTER_ADDR:MASTER_PORT), before any process group:
    :func:`preflight` and ``init_process_group`` both use it."""
    import torch.distributed as dist

    setup_torch_env(launch)
    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), launch.world_size,
                         is_master=launch.rank == 0, timeout=timedelta(seconds=comm.startup_timeout_s),
                         wait_for_workers=False)


def preflight(store, launch: LaunchInfo, problem: str | None, timeout_s: float, stage: str = "preflight") -> None:
    """Every rank says whether its set-up is sound and hears every other's, through ``store``.

    A problem only one rank can see (this node has no GPU) must not leave the others waiting in
    ``init_process_group``: each rank posts its problem (or none), waits for all, and if any rank
    has one every rank raises :class:`PreflightError` with the first (a one-line error, exit 2).
    No rank returns before every rank has posted, so a later ``stage`` (its own keys) also orders
    work: what a rank did before posting is done when the others return."""
    keys = [f"fedsea/{stage}/{r}" for r in range(launch.world_size)]
    store.set(keys[launch.rank], problem or "")
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:  # a rank that never got here: it died, or is still loading
        raise RuntimeError(f"rank {launch.rank}: not every rank reached the start within comm.startup_timeout_s="
                           f"{timeout_s:g} s ({e})") from None
    found = [store.get(key).decode() for key in keys]
    problems = [p for p in found if p]
    if not problems:
        return
    # Rank 0 hosts the store: it leaves only once every rank has read the verdict, or a rank
    # still reading would see "connection reset" instead of the one-line error.
    store.add(f"fedsea/{stage}/read", 1)
    if launch.rank == 0:
        deadline = time.monotonic() + timeout_s
        while store.add(f"fedsea/{stage}/read", 0) < launch.world_size and time.monotonic() < deadline:
            time.sleep(0.01)
    raise PreflightError(problems[0])


def start(launch: LaunchInfo, topo: Topology, comm, devices, store) -> None:
    """Start torch.distributed on ``devices.backend`` over the rendezvous ``store``, every process
    group and the heartbeat.

    A GPU rank computes on local GPU ``local_rank % device_count`` (``devices.compute``).
    Collectives wait up to ``comm.max_wait_s`` (no limit for 0); a dead peer is found by
    :mod:`fedsea_hpc.distributed.liveness` within ``comm.timeout_s``.
    """
    import torch
    import torch.distributed as dist

    from fedsea_hpc.components.links import wait_limit_s
    from fedsea_hpc.distributed import liveness

    if devices.compute.type == "cuda":
        torch.cuda.set_device(devices.compute)
    dist.init_process_group(devices.backend, store=store, rank=launch.rank, world_size=launch.world_size,
                            timeout=timedelta(seconds=wait_limit_s(comm)))
    liveness.start(launch.rank, launch.world_size, comm.timeout_s)
    topo.create_groups(server_backend=devices.server_backend)


def stop() -> None:
    import torch.distributed as dist

    from fedsea_hpc.distributed import liveness

    liveness.stop()
    if dist.is_initialized():
        dist.destroy_process_group()


def run_rank(launch: LaunchInfo, body: Callable[[], int]) -> int:
    """Run ``body``; a failure ends this process at once with a message, never a hang.

    Returns ``body``'s code in a one-process run; a distributed rank leaves through
    :func:`exit_now` instead of returning.
    """
    try:
        rc = body()
    except BaseException as e:  # noqa: BLE001 - a failed rank must take the job down, not hang it
        if isinstance(e, SystemExit) and not e.code:
            raise
        traceback.print_exc()
        say(f"[rank {launch.rank}] fatal: {type(e).__name__}: {e}")
        sys.stdout.flush()
        os._exit(1)
    if launch.world_size > 1:
        exit_now(rc)
    return rc


def exit_now(rc: int) -> None:
    """Leave a finished distributed run without running interpreter teardown.

    Under load we saw C++ threads of the communication stack abort the process during Python's
    teardown ("terminate called without an active exception") after all work was done and saved;
    the launcher then reports a failed job. Everything is flushed and the process group destroyed
    before this point, so skipping the Python side of teardown loses nothing.

    Where MPI was initialised the process must still end through C ``exit``, not ``os._exit``:
    MPICH (4.1 and later) tells its process manager "finalized" from an ``atexit`` hook, not
    from ``MPI_Finalize``. A rank that skips the hook looks to Hydra like an MPI process that died,
    and Hydra SIGKILLs every rank still running, so whichever rank left last failed the job.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized():
        if not mpi.Is_finalized():
            mpi.Finalize()
        import ctypes

        ctypes.CDLL(None).exit(rc)
    os._exit(rc)


EXIT_PREEMPTED = 75  # stopped on SIGTERM/SIGUSR1 at a step boundary with a checkpoint saved (EX_TEMPFAIL)


class StopRequest:
    """SIGTERM or SIGUSR1 (Slurm preemption, ``--signal``, ``scancel``, a user's kill) asks this
    rank to stop at the next step boundary. The request rides on the step's maxima all-reduce, so
    one rank that got the signal is enough: every rank then saves the same checkpoint and exits
    with :data:`EXIT_PREEMPTED`. A second signal before the boundary ends the rank at once."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        import signal

        self.requested = 0.0
        self._previous = {}
        for name in self.SIGNALS:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        import signal

        if self.requested:
            say(f"fedsea: second {signal.Signals(signum).name}: exiting now")
            os._exit(128 + signum)
        self.requested = float(signum)
        say(f"fedsea: {signal.Signals(signum).name} received: stopping after this step with a checkpoint")

    def restore(self) -> None:
        import signal

        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
