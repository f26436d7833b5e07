"""The point-to-point links of a job: a client's one link to its server, a server's to its clients.

Channels are built here only, from the ``comm.*`` section, so every link of every job has the
same size bound and timeout. A client's link is wrapped in :class:`PrivateSender`, so nothing it
sends can skip the noise.
"""
from __future__ import annotations

import os

import torch

from fedsea_hpc.config import CommConfig, PrivacyConfig
from fedsea_hpc.distributed.topology import Topology
from fedsea_hpc.privacy.noise import PrivateSender
from fedsea_hpc.transport.p2p import ByteCounter, Channel


def wait_limit_s(comm: CommConfig) -> float:
    """The bound on one wait: ``comm.max_wait_s``, or 30 days for 0 (a dead peer is found by the heartbeat)."""
    return comm.max_wait_s or 30 * 86400.0


def channel(peer: int, comm: CommConfig, counter: ByteCounter, device: torch.device) -> Channel:
    return Channel(peer, counter=counter, max_bytes=int(comm.max_message_mb * 2**20), timeout_s=wait_limit_s(comm),
                   device=device)


def noise_generator(noise_seed: int, client: int, device: torch.device) -> torch.Generator:
    """The noise generator of one client, on the device its activations live on.

    ``noise_seed == -1`` (the default): seeded from OS entropy on this rank, known to no other
    rank, so a server cannot regenerate ε and subtract it. ``>= 0`` (tests only): a reproducible
    stream per client index, which every rank reading the config could recompute.
    """
    seed = (int.from_bytes(os.urandom(8), "little") >> 1 if noise_seed < 0
            else noise_seed * 1_000_003 + 7919 * (client + 1))
    return torch.Generator(device=device).manual_seed(seed)


def client_link(topo: Topology, comm: CommConfig, privacy: PrivacyConfig, counter: ByteCounter,
                device: torch.device, *, noise: bool = True, noise_device: torch.device | None = None) -> PrivateSender:
    """This client's link to its server, staged on ``device`` (the wire device); the noise is drawn
    where the activations are (``noise_device``, default ``device``). ``noise=False`` sends clean
    activations (generation default)."""
    c = topo.client_index
    gen = noise_generator(privacy.noise_seed, c, noise_device or device)
    return PrivateSender(channel(topo.server_of(c), comm, counter, device),
                         noise_std=privacy.noise_std if noise else 0.0, grad_clip=privacy.grad_clip,
                         grad_noise_std=privacy.grad_noise_std, generator=gen,
                         relative=privacy.noise_mode == "relative")


def relink_client(sender: PrivateSender, topo: Topology, comm: CommConfig, counter: ByteCounter,
                  device: torch.device) -> None:
    """Point this client's link at the server ``topo`` now places it on; the noise generator and
    every other setting of ``sender`` carry on (a new peer must not restart the noise stream)."""
    peer = topo.server_of(topo.client_index)
    if sender.channel.peer != peer:
        sender.channel = channel(peer, comm, counter, device)


def server_links(topo: Topology, comm: CommConfig, counter: ByteCounter, device: torch.device) -> dict[int, Channel]:
    """This server rank's links, one per client it serves (by client index)."""
    return {c: channel(c, comm, counter, device) for c in topo.clients_of(topo.rank)}


def noise_report(privacy: PrivacyConfig, *, noise: bool = True) -> dict:
    """What summary.json says about the activation noise; a reproducible seed is flagged."""
    out = {"noise_mode": privacy.noise_mode, "noise_std": privacy.noise_std if noise else 0.0,
           "noise_seed": "os-entropy" if privacy.noise_seed < 0 else "fixed"}
    if noise and privacy.noise_seed >= 0:
        out["noise_seed_test_only"] = privacy.noise_seed  # every rank could regenerate the noise
    return out
