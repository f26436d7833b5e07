"""The point-to-point links of a job: a client's one link to its server, a server's to its clients.

Channels are built here only, from the ``comm.*`` section, so every link of every job has the
same size bound and timeout. A client's link is wrapped in :class:`PrivateSender`, so nothing it
sends can skip the noise.
"""
from __future__ import annotations

import torch

from fedsea_hpc.config import CommConfig, PrivacyConfig
from fedsea_hpc.distributed.topology import Topology
from fedsea_hpc.privacy.noise import PrivateSender
from fedsea_hpc.transport.p2p import ByteCounter, Channel


def channel(peer: int, comm: CommConfig, counter: ByteCounter, device: torch.device) -> Channel:
    return Channel(peer, counter=counter, max_bytes=int(comm.max_message_mb * 2**20), timeout_s=comm.timeout_s,
                   device=device)


def noise_generator(seed: int, client: int, device: torch.device) -> torch.Generator:
    """The noise generator of one client, on the device its activations live on.

    Fresh draws every send, independent across clients (one stream per client index).
    """
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + 7919 * (client + 1))


def client_link(topo: Topology, comm: CommConfig, privacy: PrivacyConfig, seed: int, counter: ByteCounter,
                device: torch.device, *, noise: bool = True) -> PrivateSender:
    """This client's link to its server; ``noise=False`` sends clean activations (generation default)."""
    c = topo.client_index
    return PrivateSender(channel(topo.server_of(c), comm, counter, device),
                         noise_std=privacy.noise_std if noise else 0.0, grad_clip=privacy.grad_clip,
                         grad_noise_std=privacy.grad_noise_std, generator=noise_generator(seed, c, device))


def server_links(topo: Topology, comm: CommConfig, counter: ByteCounter, device: torch.device) -> dict[int, Channel]:
    """This server rank's links, one per client it serves (by client index)."""
    return {c: channel(c, comm, counter, device) for c in topo.clients_of(topo.rank)}
