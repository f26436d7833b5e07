"""The cost model: what each rank measures for the planner, during training, with no extra job.

Per step a client times its A phase (p blocks, forward and backward, plus an embedding lookup)
and the rest of its compute (q blocks, norm, head, loss, optimizer); a server rank times its
compute and counts the row-tokens × blocks it ran (``PartModel.run_rows`` runs a block only on
its rows, so work is proportional to that count). Normalised per row-token (rows × padded
tokens, what a block's compute scales with) and smoothed by an EWMA, this gives, per client:

* ``client_block_s``  = (A forward + A backward) / p                      (one client block)
* ``client_fixed_s``  = client compute − client_block_s · (p + q)         (embedding, head, loss, optimizer;
  not the FedSGD sum, which waits on the slowest peer)
* ``server_block_s``  = server compute / Σ rows·tokens·blocks × this client's rows·tokens
* ``wire_s``          = 5 × latency + 4 × row-tokens × H × itemsize × seconds per byte, from the
  start-up probe (:mod:`fedsea_hpc.adapt.probe`)

each scaled to the client's smoothed row-tokens per step: the planner's
:class:`~fedsea_hpc.adapt.planner.Costs`. The first step (warm-up: allocator, DeepSpeed's first
gathers) is not measured. Emulated slowdowns (:mod:`fedsea_hpc.adapt.emulate`) count as real.

Every rank writes its slot of one flat vector that rides on the step's existing sum
all-reduce, so measuring adds no collective.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SLOT = 8  # per rank: client block rate, client fixed rate, row-tokens per step, server block rate,
#          link latency (s), link seconds per byte (from the start-up wire probe), client MiB per
#          block and split-independent client MiB (adapt.memory: static + largest saved activations)
WARMUP_STEPS = 1


@dataclass
class Ewma:
    alpha: float = 0.3
    value: float | None = None

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.alpha * x + (1 - self.alpha) * self.value
        return self.value


class CostMeter:
    """This rank's smoothed rates (seconds per row-token), and the job-wide view from the reduce."""

    def __init__(self, rank: int, world_size: int, alpha: float = 0.3):
        self.rank, self.world_size = rank, world_size
        self.block, self.fixed, self.tokens, self.server = (Ewma(alpha) for _ in range(4))
        self.latency_s = self.s_per_byte = 0.0
        self.static = None  # adapt.memory.StaticMemory of a client
        self.act_block_b = self.act_fixed_b = 0  # largest activation bytes seen (memory must fit the peak)

    def set_link(self, latency_s: float, s_per_byte: float) -> None:
        """This client's link, from :func:`fedsea_hpc.adapt.probe.probe_client`."""
        self.latency_s, self.s_per_byte = latency_s, s_per_byte

    def observe_client(self, step: int, *, a_phase_s: float, compute_s: float, p: int, q: int, row_tokens: int,
                       saved_a: int = 0, saved_c: int = 0) -> None:
        """``a_phase_s``: A forward + backward; ``compute_s``: every compute second of the step;
        ``saved_a`` / ``saved_c``: bytes autograd saved in the A / C forward (adapt.memory.SavedBytes)."""
        block_b = saved_a / p
        self.act_block_b = max(self.act_block_b, block_b)
        self.act_fixed_b = max(self.act_fixed_b, saved_c - block_b * q)
        if step < WARMUP_STEPS or row_tokens <= 0:
            return
        block = a_phase_s / p
        self.block.update(block / row_tokens)
        self.fixed.update(max(compute_s - block * (p + q), 0.0) / row_tokens)
        self.tokens.update(float(row_tokens))

    def observe_server(self, step: int, *, compute_s: float, row_token_blocks: int) -> None:
        if step < WARMUP_STEPS or row_token_blocks <= 0:
            return
        self.server.update(compute_s / row_token_blocks)

    def slot_vector(self, dtype=torch.float64, device=None) -> torch.Tensor:
        """World-sized flat vector, zero except this rank's slot (sum-reduced with the step's sums)."""
        v = torch.zeros(self.world_size * SLOT, dtype=dtype, device=device)
        vals = [e.value or 0.0 for e in (self.block, self.fixed, self.tokens, self.server)]
        vals += [self.latency_s, self.s_per_byte]
        if self.static is not None:
            vals += [self.static.block_mb + self.act_block_b / 2**20, self.static.fixed_mb + self.act_fixed_b / 2**20]
        else:
            vals += [0.0, 0.0]
        v[self.rank * SLOT:(self.rank + 1) * SLOT] = torch.tensor(vals, dtype=dtype)
        return v


def job_costs(reduced: torch.Tensor, clients: int, server_rank_of: list[int], bytes_per_row_token: int) -> dict | None:
    """Per-client per-step costs (seconds) from the reduced slot vector; None before the first
    measurement. ``server_rank_of[c]``: the world rank of the server serving client c;
    ``bytes_per_row_token``: hidden size × element size (what one row-token of h costs on the
    wire). A step crosses the link 5 times (lengths, h_A, h_B, their two gradients): ``wire_s`` =
    5 × latency + 4 × row-tokens × bytes_per_row_token × seconds per byte."""
    slots = reduced.reshape(-1, SLOT).tolist()
    block = [slots[c][0] * slots[c][2] for c in range(clients)]
    fixed = [slots[c][1] * slots[c][2] for c in range(clients)]
    server = [slots[server_rank_of[c]][3] * slots[c][2] for c in range(clients)]
    if not all(v > 0 for v in block + server):
        return None
    wire = [5 * slots[c][4] + 4 * slots[c][2] * bytes_per_row_token * slots[c][5] for c in range(clients)]
    return {"client_block_s": block, "client_fixed_s": fixed, "server_block_s": server, "wire_s": wire,
            "row_tokens": [slots[c][2] for c in range(clients)],
            "link_latency_s": [slots[c][4] for c in range(clients)],
            "link_s_per_byte": [slots[c][5] for c in range(clients)],
            "client_block_mb": [slots[c][6] for c in range(clients)],
            "client_fixed_mb": [slots[c][7] for c in range(clients)]}
