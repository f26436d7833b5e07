"""Where each role computes and where its messages travel: ``topology.client_device`` /
``topology.server_device`` and ``comm.backend``.

FedSEA's real deployment is weak edge clients and a strong server: CPU clients, GPU server
ranks. A rank computes on its role's device; what crosses between ranks is staged on the
*wire* device the world backend moves: the GPU under NCCL (every rank on a GPU), host memory
under gloo (received tensors are then moved to the compute device by the workers). GPU server
ranks in a gloo job get an NCCL server group, so DeepSpeed's collectives (ZeRO's reduce-scatter
and all-gather, which gloo cannot run on GPU tensors) stay on the GPUs.

The choice is made from the config alone wherever it can be, so that every rank of a job picks
the same backend even when only some nodes have GPUs:

* both devices ``cuda`` → NCCL; either one ``cpu`` → gloo; one ``cuda`` and one ``auto`` → gloo
  (``auto`` then means CPU);
* both ``auto`` → NCCL where this rank sees a GPU, else gloo (set the devices on mixed nodes);
* ``comm.backend`` other than ``auto`` is used as given (``auto`` devices follow it).
"""
from __future__ import annotations

from dataclasses import dataclass

from fedsea_hpc.errors import InputError

DEVICES = ("auto", "cpu", "cuda")


class DeviceError(InputError):
    """A device this rank cannot use (a user error: exit 2)."""


@dataclass(frozen=True)
class Devices:
    compute: "torch.device"  # noqa: F821  where this rank's part computes
    wire: "torch.device"  # noqa: F821  where messages and world collectives are staged
    backend: str  # the world's backend
    server_backend: str  # the server group's (NCCL for GPU servers in a gloo job)


def backends(comm_backend: str, client_device: str, server_device: str, cuda_available: bool) -> tuple[str, str]:
    """(world backend, server group backend) for the job."""
    if comm_backend != "auto":
        world = comm_backend
    elif client_device == server_device == "cuda":
        world = "nccl"
    elif client_device == server_device == "auto":
        world = "nccl" if cuda_available else "gloo"
    else:
        world = "gloo"
    server = "nccl" if world == "gloo" and server_device == "cuda" else world
    return world, server


def role_device(device: str, world_backend: str, cuda_available: bool) -> str:
    """``cpu`` or ``cuda`` for a role's ``auto`` | ``cpu`` | ``cuda`` under ``world_backend``."""
    if device == "auto":
        return "cuda" if cuda_available and world_backend == "nccl" else "cpu"
    return device


def resolve(comm_backend: str, client_device: str, server_device: str, *, server: bool, rank: int,
            local_rank: int, cuda_available: bool, device_count: int) -> Devices:
    """This rank's :class:`Devices`; a :class:`DeviceError` naming the key when it cannot be."""
    import torch

    world, server_group = backends(comm_backend, client_device, server_device, cuda_available)
    key, asked = ("topology.server_device", server_device) if server else ("topology.client_device", client_device)
    kind = role_device(asked, world, cuda_available)
    if kind == "cuda" and not (cuda_available and device_count > 0):
        raise DeviceError(f"{key}: cuda, but rank {rank} sees no GPU (torch.cuda.is_available() is False); "
                          "allowed here: auto, cpu")
    if world == "nccl" and kind == "cpu":
        raise DeviceError(f"{key}: cpu, but comm.backend is nccl, which moves only GPU tensors; "
                          "allowed: comm.backend=gloo or auto with a CPU role")
    compute = torch.device("cuda", local_rank % device_count) if kind == "cuda" else torch.device("cpu")
    wire = compute if world == "nccl" else torch.device("cpu")
    return Devices(compute=compute, wire=wire, backend=world, server_backend=server_group)
