"""Small sums over a group in one round trip, where gloo's ring pays several.

Every step ends with a world sum of a few dozen numbers (loss, bytes, phase times: the metrics
row), and every FedSGD/FedAvg round sums a LoRA-sized buffer over the clients. On gloo these are
latency-bound, and ``dist.all_reduce`` walks a ring of ``2 (n - 1)`` dependent messages, each
waking a process: measured on the 2-core CI machine, a 3-rank all-reduce of 60 float64 took
~3.4-4.3 ms and a 2-rank one ~1.9 ms, where gathering to one rank and sending the sum back with
point-to-point ops took ~0.6 ms (``benchmarks/small_reduce.py``, which also shows the ring
winning again for a 2 MB buffer).

:func:`sum_` is that star: the group's first rank receives every other rank's buffer, adds them
in rank order and sends the sum back, so every rank ends with the same bits. Two ranks swap
buffers instead (one message each way; IEEE addition is commutative, so both get the same bits).
It is used on gloo CPU buffers of at most :data:`STAR_MAX_BYTES`; NCCL and larger buffers go to
``dist.all_reduce``; a one-rank group has nothing to do. The messages carry their own tag, so
they never match a link's messages (tag 0) between the same two ranks. A message that fails
names the peer it was for.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

STAR_MAX_BYTES = 256 * 1024  # above this bandwidth counts: the ring moves less per link
TAG = 0x5EA  # point-to-point tag of these messages; the links use 0


def sum_(buf: torch.Tensor, group=None) -> None:
    """Sum ``buf`` in place over ``group`` (default: the world); same shape and dtype on every rank."""
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    n = len(ranks)
    if n == 1:
        return
    small = buf.numel() * buf.element_size() <= STAR_MAX_BYTES
    if buf.device.type != "cpu" or dist.get_backend(group) != "gloo" or not small:
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        return
    flat = buf.view(-1) if buf.is_contiguous() else buf.reshape(-1).contiguous()  # a copy: written back below
    me = dist.get_rank()
    if n == 2:
        other = ranks[1] if me == ranks[0] else ranks[0]
        theirs = torch.empty_like(flat)
        for w in [dist.isend(flat, other, group=group, tag=TAG), dist.irecv(theirs, other, group=group, tag=TAG)]:
            _wait(w, me, other)
        first, second = (flat, theirs) if me == ranks[0] else (theirs, flat)
        total = first + second
    elif me == ranks[0]:
        parts = [torch.empty_like(flat) for _ in ranks[1:]]
        for w, r in [(dist.irecv(p, r, group=group, tag=TAG), r) for p, r in zip(parts, ranks[1:])]:
            _wait(w, me, r)
        total = flat.clone()
        for p in parts:  # rank order: the same sum whatever order the messages arrived in
            total += p
        for w, r in [(dist.isend(total, r, group=group, tag=TAG), r) for r in ranks[1:]]:
            _wait(w, me, r)
    else:
        total = torch.empty_like(flat)
        _wait(dist.isend(flat, ranks[0], group=group, tag=TAG), me, ranks[0])
        _wait(dist.irecv(total, ranks[0], group=group, tag=TAG), me, ranks[0])
    if buf.is_contiguous():
        flat.copy_(total)
    else:
        buf.copy_(total.view_as(buf))


def _wait(work, me: int, peer: int) -> None:
    """Wait on one message of a sum; a failure names the peer (a rank that died, a node gone)."""
    try:
        work.wait()
    except Exception as e:  # gloo raises RuntimeError with a transport message
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"rank {me}: lost rank {peer} during a sum ({cause})") from None
