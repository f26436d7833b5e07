"""Who is a client, who is a server, and the process groups between them.

Built once from the world size and the config and passed explicitly (no module globals).
Client ranks are ``0..C-1`` (rank 0 is a client, so it owns the loss and writes metrics);
server ranks are ``C..C+S-1``. Client ``i`` is served by server ``C + i % S`` (round-robin) unless
a placement says otherwise (``topology.assignment=balanced``: :meth:`Topology.place`, at start and
when a rebalance re-plans it); server ranks are data-parallel over clients either way.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch.distributed as dist

from fedsea_hpc.config import check_world_size


class Role(enum.StrEnum):
    CLIENT = "client"
    SERVER = "server"
    CENTRALIZED = "centralized"


@dataclass
class Topology:
    """Rank layout of one job. ``create_groups`` must be called on every rank (world-collective)."""

    clients: int
    servers: int
    rank: int
    world_size: int
    client_group: object = field(default=None, repr=False)
    server_group: object = field(default=None, repr=False)
    self_group: object = field(default=None, repr=False)  # model-parallel group of 1 for DeepSpeed
    placement: tuple[int, ...] = ()  # server index (0..S-1) per client; () = round-robin

    def __post_init__(self) -> None:
        check_world_size(self.clients, self.servers, self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world of {self.world_size}")

    @property
    def role(self) -> Role:
        return Role.CLIENT if self.rank < self.clients else Role.SERVER

    @property
    def client_ranks(self) -> list[int]:
        return list(range(self.clients))

    @property
    def server_ranks(self) -> list[int]:
        return list(range(self.clients, self.clients + self.servers))

    @property
    def client_index(self) -> int:
        """Index of this client in ``0..C-1`` (equals its global rank)."""
        assert self.role is Role.CLIENT
        return self.rank

    @property
    def server_index(self) -> int:
        assert self.role is Role.SERVER
        return self.rank - self.clients

    def server_of(self, client: int) -> int:
        """Global rank of the server rank that serves ``client``."""
        return self.clients + (self.placement[client] if self.placement else client % self.servers)

    @property
    def assignment(self) -> list[int]:
        """Server index (0..S-1) serving each client, in client order."""
        return [self.server_of(c) - self.clients for c in range(self.clients)]

    def place(self, placement) -> None:
        """Serve client ``c`` from server index ``placement[c]`` from now on (the same on every rank;
        the links must then be rebuilt: ``relink`` on the workers)."""
        placement = tuple(int(s) for s in placement)
        if len(placement) != self.clients or not all(0 <= s < self.servers for s in placement):
            raise ValueError(f"placement: one server index in 0..{self.servers - 1} per client "
                             f"({self.clients}), got {list(placement)}")
        self.placement = placement

    def clients_of(self, server_rank: int) -> list[int]:
        """Client indices served by ``server_rank``, in ascending order."""
        return [c for c in range(self.clients) if self.server_of(c) == server_rank]

    def create_groups(self, server_backend: str | None = None) -> None:
        """Create every group on every rank (``new_group`` is collective over the world).
        ``server_backend``: the server groups' backend (NCCL for GPU servers in a gloo job;
        None = the world's)."""
        self.client_group = dist.new_group(self.client_ranks)
        self.server_group = dist.new_group(self.server_ranks, backend=server_backend)
        for r in self.server_ranks:
            g = dist.new_group([r], backend=server_backend)
            if r == self.rank:
                self.self_group = g


class ServerMPU:
    """The ``mpu`` DeepSpeed asks for: data parallel = the server group, no model parallelism.

    Passing it keeps DeepSpeed's gradient reduction and ZeRO partitioning inside the server
    ranks; the clients never take part in a DeepSpeed collective.
    """

    def __init__(self, topo: Topology):
        self.topo = topo

    def get_data_parallel_group(self):
        return self.topo.server_group

    def get_data_parallel_world_size(self) -> int:
        return self.topo.servers

    def get_data_parallel_rank(self) -> int:
        return self.topo.server_index

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topo.server_ranks

    def get_model_parallel_group(self):
        return self.topo.self_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_rank = get_model_parallel_rank

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.topo.rank
