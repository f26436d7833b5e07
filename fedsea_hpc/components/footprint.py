"""summary.json's ``memory``: peak memory per rank and role, and the bytes each part holds.

* Peak: the process's peak resident set (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated``
  on GPU; ``measure`` says which. RSS includes the Python interpreter, torch and DeepSpeed
  themselves (~0.3–0.5 GB a process), so on a small model it is dominated by them.
* Parts: bytes of this rank's parameters (all of its part, the frozen base included), of the
  trainable ones (LoRA adapters; everything trained when LoRA is off) and of the optimizer's
  state tensors (AdamW's two moments; under ZeRO the partition this rank keeps). A server's
  numbers are per rank (a ZeRO-3 rank holds 1/servers of the blocks); ``server`` sums them.
"""
from __future__ import annotations

import resource

import torch
import torch.distributed as dist

MEASURES = ("rss", "cuda_max_allocated")


def peak_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), MEASURES[1]
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, MEASURES[0]  # Linux: KiB


def _tensor_bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    shard = getattr(t, "ds_tensor", None)  # ZeRO-3: the local partition, the full tensor is released
    t = shard if shard is not None else t
    return t.numel() * t.element_size()


def _inner_optimizer(opt):
    """The torch optimizer under DeepSpeed's ZeRO wrappers (their ``.optimizer``)."""
    seen = 0
    while opt is not None and not isinstance(opt, torch.optim.Optimizer) and seen < 4:
        opt, seen = getattr(opt, "optimizer", None), seen + 1
    return opt


def part_bytes(module: torch.nn.Module, trainable: list, optimizer) -> dict:
    inner = _inner_optimizer(optimizer)
    state = 0
    if inner is not None:
        state = sum(_tensor_bytes(v) for s in inner.state.values() for v in s.values())
    return {"parameters": sum(_tensor_bytes(p) for p in module.parameters()),
            "trainable": sum(_tensor_bytes(p) for _, p in trainable),
            "optimizer": state}


FIELDS = ("parameters", "trainable", "optimizer")


def world_report(topo, device: torch.device, wire: torch.device, parts: dict) -> dict:
    """Every rank: one all-reduce (staged on ``wire``) of [peak per rank | its measure | part bytes
    per rank]; the summary entry. ``measure`` is one word when every rank measured the same way,
    else one per role (CPU clients report RSS, GPU servers ``cuda_max_allocated``)."""
    n = topo.world_size
    v = torch.zeros(n * (2 + len(FIELDS)), dtype=torch.float64, device=wire)
    peak, measure = peak_bytes(device)
    v[topo.rank] = peak
    v[n + topo.rank] = MEASURES.index(measure)
    for i, k in enumerate(FIELDS):
        v[2 * n + topo.rank * len(FIELDS) + i] = parts[k]
    dist.all_reduce(v)
    per_rank = [int(x) for x in v[:n].tolist()]
    measures = [MEASURES[int(x)] for x in v[n:2 * n].tolist()]
    table = v[2 * n:].view(n, len(FIELDS)).tolist()
    clients, servers = topo.client_ranks, topo.server_ranks
    out_parts = {f"client{i}": dict(zip(FIELDS, map(int, table[r]))) for i, r in enumerate(clients)}
    out_parts["server"] = {k: int(sum(table[r][i] for r in servers)) for i, k in enumerate(FIELDS)}
    peak_by_role = {"client": max(per_rank[r] for r in clients)}
    if servers:
        peak_by_role["server"] = max(per_rank[r] for r in servers)
    by_role = {"client": measures[clients[0]], **({"server": measures[servers[0]]} if servers else {})}
    return {"memory": {"measure": measures[0] if len(set(measures)) == 1 else by_role, "peak_bytes": peak_by_role,
                       "per_rank_peak_bytes": per_rank, "parts": out_parts}}


def local_report(device: torch.device, parts: dict, role: str = "centralized") -> dict:
    """One process: ``train.mode=centralized`` holds the whole model (``parts`` its bytes);
    ``train.mode=local`` (``role="local"``) one whole model per client (``parts``: ``local<i>`` each)."""
    peak, measure = peak_bytes(device)
    return {"memory": {"measure": measure, "peak_bytes": {role: peak}, "per_rank_peak_bytes": [peak],
                       "parts": {role: parts} if role == "centralized" else parts}}
