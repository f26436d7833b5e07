"""The one collective of client aggregation: a flat, checked, in-place sum over a group.

FedAvg and FedSGD (:class:`fedsea_hpc.federated.client_sync.ClientSync`) pack everything into
one buffer and call :func:`allreduce_sum_` once per round: for LoRA-sized parameter sets latency,
not bandwidth, dominates. It takes an optional process group and is a no-op in a single process
without ``init_process_group``, so single-process code needs no branches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (
        group is None or dist.get_world_size(group) > 0)


def _acc_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    # Sum in float32 at least (bf16/fp16 sums lose digits fast); keep float64 if given.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def allreduce_sum_(tensors: list[torch.Tensor | None], group=None) -> None:
    """In-place sum of ``tensors`` over the ranks of ``group`` in one flat ``all_reduce``.

    Meant for gradients (e.g. the client-group sum of Part A/C adapter gradients), hence None
    entries (``p.grad is None``) are accepted and skipped. Every rank must have None at the same
    indices, as with DDP. That is checked in the same buffer (one presence flag per entry,
    ``[sum numel + N]``): if the patterns differ but the buffer sizes happen to agree, every rank
    raises ValueError; if the sizes differ the backend itself fails. Callers that cannot promise
    the same pattern pass ``torch.zeros_like(p)`` instead of None.

    Parameters
    ----------
    tensors : list of torch.Tensor or None, length N
        Same shapes, order and device on every rank; summed in float32 (float64 if any is).
    group : ProcessGroup, optional
        Default: the world. Without an initialised process group this is a no-op.
    """
    present = [t for t in tensors if t is not None]
    if not _active(group) or not tensors:
        return
    dtype = _acc_dtype(present)
    device = present[0].device if present else _default_device(group)
    flags = torch.tensor([float(t is not None) for t in tensors], dtype=dtype, device=device)
    buf = torch.cat([t.detach().reshape(-1).to(dtype) for t in present] + [flags])
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    n = len(tensors)
    counts = buf[-n:]
    # Each flag sums to 0 (None everywhere) or the group size (present everywhere).
    size = dist.get_world_size(group)
    if bool(((counts != 0) & (counts != size)).any()):
        mixed = torch.nonzero((counts != 0) & (counts != size)).flatten().tolist()
        raise ValueError(f"allreduce_sum_: entries {mixed[:8]} are None on some ranks only; "
                         "pass zeros_like instead of None")
    _unflatten_into(present, buf[:-n])


def _unflatten_into(tensors: list[torch.Tensor], flat: torch.Tensor) -> None:
    """Copy consecutive slices of ``flat`` [sum numel] back into ``tensors`` (cast to their dtype)."""
    offset = 0
    with torch.no_grad():  # params are leaves that require grad
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view(t.shape))
            offset += n


def _default_device(group) -> torch.device:
    # NCCL reduces CUDA tensors only; gloo CPU ones.
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
