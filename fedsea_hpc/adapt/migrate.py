"""Live migration: when the split points change, every block's trained state follows it.

A block lives in one or more *copies*: on each client that keeps it (Part A or C) and, once,
on the server group (Part B, every server rank a replica or a ZeRO shard of it). A copy's
trained state is its trainable tensors (LoRA ``A``/``B``, or the block's weights under full
fine-tuning) with AdamW's ``exp_avg`` and ``exp_avg_sq``.

When a repartition changes the set of holders of a block, the block's copies are **merged**
and every new holder starts from the merged state:

* merged = Σ_copies w · state / Σ w, for the tensors and both moments alike, where a copy's
  weight ``w`` is the number of samples per step that train it: a client's micro-batch for
  its own copy, the sum of the micro-batches of the clients the server runs that block for on
  the server's copy (a copy no client uses weighs 0; if every copy weighs 0 they count equally);
* AdamW's step counter is the *receiving* optimizer's own (a ZeRO partition keeps one per
  parameter group), so bias correction stays consistent inside each optimizer.

Blocks whose holder set does not change are not touched: their copies keep their own state.
Holders of a changed block exchange exactly one sum, over a process group of the holders
(old and new) of the blocks that share that holder set, so no other rank sees a copy. With
identical copies (FedSGD, no noise) a merge returns that copy, so a run whose partition moves
reproduces an unmoved one (the invariant tested in ``tests/test_multirank_train.py``).

This module is the pure part (who holds what, what moves, the weights) and the one collective
(:func:`merge`); the workers extract and load their own states (torch on clients,
:mod:`fedsea_hpc.distributed.deepspeed_glue` on servers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from fedsea_hpc.model.names import layer_of, with_layer
from fedsea_hpc.model.partition import client_layers, server_layers

SERVER = -1  # the holder id of the server group's copy
KEYS = ("param", "exp_avg", "exp_avg_sq")  # what a copy's state holds per trainable tensor

Splits = Sequence[tuple[int, int]]


def holders(num_layers: int, splits: Splits) -> dict[int, frozenset[int]]:
    """Per block, who holds a copy: client indices, and :data:`SERVER` for the server group."""
    out: dict[int, set[int]] = {k: set() for k in range(num_layers)}
    for c, (p, q) in enumerate(splits):
        for k in client_layers(num_layers, p, q):
            out[k].add(c)
    for k in server_layers(num_layers, splits):
        out[k].add(SERVER)
    return {k: frozenset(v) for k, v in out.items()}


@dataclass(frozen=True)
class Move:
    block: int
    before: frozenset[int]  # holders before the repartition
    after: frozenset[int]


def moves(num_layers: int, old: Splits, new: Splits) -> list[Move]:
    """The blocks whose holder set changes, ascending."""
    a, b = holders(num_layers, old), holders(num_layers, new)
    return [Move(k, a[k], b[k]) for k in range(num_layers) if a[k] != b[k]]


def merge_groups(changes: list[Move]) -> list[tuple[frozenset[int], list[int]]]:
    """Blocks grouped by the holders that take part in their merge (old ∪ new), in a fixed
    order every rank computes alike (one process group and one sum per entry)."""
    groups: dict[frozenset[int], list[int]] = {}
    for m in changes:
        groups.setdefault(m.before | m.after, []).append(m.block)
    return sorted(groups.items(), key=lambda kv: kv[1][0])


def copy_weights(num_layers: int, splits: Splits, block: int, rows: Sequence[int]) -> dict[int, float]:
    """Normalised merge weight of each existing copy of ``block`` under ``splits``.

    ``rows[c]``: client c's samples per step. A client copy weighs its client's rows; the server
    copy the rows of every client whose server span holds the block."""
    have = holders(num_layers, splits)[block]
    w = {}
    for h in sorted(have):
        if h == SERVER:
            w[h] = float(sum(r for (p, q), r in zip(splits, rows) if p <= block < num_layers - q))
        else:
            w[h] = float(rows[h])
    total = sum(w.values())
    return {h: (v / total if total > 0 else 1.0 / len(w)) for h, v in w.items()}


def ranks_of(members: frozenset[int], client_ranks: Sequence[int], server_ranks: Sequence[int]) -> list[int]:
    """Global ranks of a merge's members: its clients, and every server rank if the server is one."""
    out = [client_ranks[c] for c in sorted(members) if c != SERVER]
    return sorted(out + (list(server_ranks) if SERVER in members else []))


def names_for(named: Sequence[tuple[str, torch.Tensor]], blocks: Sequence[int]) -> dict[int, list[tuple[str, torch.Size]]]:
    """Per block in ``blocks``, its trainable tensors' names and shapes, sorted by name.

    Every block of a Llama has the same tensors, so any block this rank holds is the template
    (a rank that is about to receive a block knows its names before it has it)."""
    template = min((k for k in (layer_of(n) for n, _ in named) if k is not None), default=None)
    if template is None:
        raise RuntimeError("migration: this rank holds no block to take names from; this is a bug")
    own = sorted((n, t.shape) for n, t in named if layer_of(n) == template)
    return {k: sorted((with_layer(n, k), shape) for n, shape in own) for k in blocks}


def merge_dtype(dtype: torch.dtype) -> torch.dtype:
    """Merges sum in fp32 (fp64 for float64 runs): moments and master weights are fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge(changes: list[Move], *, me: int, contributes: bool, old_state: dict[str, dict[str, torch.Tensor]],
          names: dict[int, list[tuple[str, torch.Size]]], weights: dict[int, dict[int, float]],
          client_ranks: Sequence[int], server_ranks: Sequence[int], rank: int, dtype: torch.dtype,
          device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """Merge every changed block's copies; returns the merged state of the blocks this rank
    takes part in (as a holder before or after).

    Every rank calls this with the same ``changes`` (the group creation is world-collective).
    ``me``: this rank's holder id (client index or :data:`SERVER`); ``contributes``: whether
    this rank adds its copy (one server rank speaks for the server's copy); ``old_state``: this
    rank's copies before the move (name → :data:`KEYS` → full fp32 tensor); ``names``: per block,
    the trainable names and shapes (from the old or the new part; the same on every holder);
    ``weights[block]``: :func:`copy_weights` under the old splits.
    """
    out: dict[str, dict[str, torch.Tensor]] = {}
    for members, blocks in merge_groups(changes):
        ranks = ranks_of(members, client_ranks, server_ranks)
        group = dist.new_group(ranks)  # collective over the world: every rank creates every group
        if rank not in ranks:
            continue
        layout = [(k, name, shape) for k in blocks for name, shape in names[k]]
        parts = []
        for k, name, shape in layout:
            w = weights[k].get(me, 0.0) if contributes else 0.0
            have = name in old_state and w > 0
            for key in KEYS:
                parts.append(old_state[name][key].to(device=device, dtype=dtype).flatten() * w if have
                             else torch.zeros(shape.numel(), dtype=dtype, device=device))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        off = 0
        for _, name, shape in layout:
            out[name] = {}
            for key in KEYS:
                n = shape.numel()
                out[name][key] = flat[off:off + n].reshape(shape).cpu()
                off += n
    return out


def torch_state(named: Sequence[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer) -> tuple[dict, float]:
    """A plain torch AdamW's copies (name → :data:`KEYS`) and its step counter."""
    state, step = {}, 0.0
    for name, p in named:
        st = opt.state.get(p, {})
        state[name] = {"param": p.detach().float().cpu().clone(),
                       "exp_avg": st["exp_avg"].float().cpu().clone() if "exp_avg" in st else torch.zeros(p.shape),
                       "exp_avg_sq": st["exp_avg_sq"].float().cpu().clone() if "exp_avg_sq" in st
                       else torch.zeros(p.shape)}
        if "step" in st:
            step = max(step, float(st["step"]))
    return state, step


def load_torch_state(named: Sequence[tuple[str, torch.Tensor]], opt: torch.optim.Optimizer,
                     state: dict[str, dict[str, torch.Tensor]], step: float) -> None:
    """Write parameters and AdamW moments into ``opt`` (state created here, at ``step``)."""
    for name, p in named:
        s = state[name]
        with torch.no_grad():
            p.copy_(s["param"].to(p.dtype))
        opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32),
                        "exp_avg": s["exp_avg"].to(device=p.device, dtype=p.dtype).clone(),
                        "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=p.dtype).clone()}


@dataclass
class Moved:
    """What a rank's new part starts from after a migration: its own old copies, the merged
    changed blocks, and the step counter of its optimizer."""

    old: dict[str, dict[str, torch.Tensor]]
    merged: dict[str, dict[str, torch.Tensor]]
    changed: set[int]
    step: float

    def for_part(self, named: Sequence[tuple[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """The state of each tensor of the new part: merged for a changed block, this rank's own
        old copy otherwise (every kept non-block tensor too)."""
        out = {}
        for name, _ in named:
            k = layer_of(name)
            src = self.merged if k is not None and k in self.changed else self.old
            if name not in src:
                raise RuntimeError(f"migration: no state for {name} (block {k}); this is a bug")
            out[name] = src[name]
        return out


def exchange(num_layers: int, old_splits: Splits, new_splits: Splits, rows: Sequence[int], *, me: int,
             contributes: bool, old_state: dict, step: float, named, topo, dtype: torch.dtype,
             device: torch.device) -> Moved:
    """One rank's side of a repartition: which blocks change, their weights, the merge.

    ``named``: this rank's trainable tensors before the move (names of any block it holds);
    ``topo``: the job's :class:`~fedsea_hpc.distributed.topology.Topology`."""
    changes = moves(num_layers, old_splits, new_splits)
    mine = [m for m in changes if me in m.before | m.after]
    names = names_for(named, [m.block for m in mine])
    weights = {m.block: copy_weights(num_layers, old_splits, m.block, rows) for m in changes}
    merged = merge(changes, me=me, contributes=contributes, old_state=old_state, names=names, weights=weights,
                   client_ranks=topo.client_ranks, server_ranks=topo.server_ranks, rank=topo.rank,
                   dtype=merge_dtype(dtype), device=device)
    return Moved(old_state, merged, {m.block for m in mine}, step)
