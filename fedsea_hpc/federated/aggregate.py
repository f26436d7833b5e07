"""Federated averaging: small pure numpy functions, and thin torch.distributed wrappers.

The pure part (:func:`weighted_average`, :func:`normalize_weights`) is the reference the
distributed part (:func:`fedavg_`, :func:`allreduce_sum_`) is tested against. The wrappers take
an optional process group and are no-ops in a single process without ``init_process_group``,
so single-process code needs no branches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist


def normalize_weights(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Weights scaled to sum to one.

    Parameters
    ----------
    weights : sequence of float, shape [N]
        Non-negative, finite, with a positive sum (e.g. number of samples per client).

    Returns
    -------
    np.ndarray, shape [N], float64, summing to 1.

    Raises
    ------
    ValueError
        Empty, not 1-D, negative or non-finite entries, or zero total.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D sequence, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"weights must be finite and >= 0, got {w.tolist()}")
    total = w.sum()
    if total <= 0:
        raise ValueError("weights sum to zero: nothing to average")
    return w / total


def weighted_average(arrays: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """FedAvg of one tensor: ``sum_i w_i * a_i / sum_i w_i``.

    Parameters
    ----------
    arrays : list of np.ndarray, N arrays of the same shape [*S]
        One per client.
    weights : list of float, length N
        Non-negative client weights with a positive sum.

    Returns
    -------
    np.ndarray, shape [*S], float64 (float64 so the reference is more precise than what it checks).

    Raises
    ------
    ValueError
        Empty list, length mismatch, shape mismatch, negative weight or zero total.
    """
    if len(arrays) == 0:
        raise ValueError("weighted_average of an empty list")
    if len(arrays) != len(weights):
        raise ValueError(f"{len(arrays)} arrays but {len(weights)} weights")
    shapes = {np.shape(a) for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"arrays differ in shape: {sorted(shapes)}")
    w = normalize_weights(weights)
    out = np.zeros(shapes.pop(), dtype=np.float64)
    for wi, a in zip(w, arrays):
        out += wi * np.asarray(a, dtype=np.float64)
    return out


def _active(group) -> bool:
    return dist.is_available() and dist.is_initialized() and (
        group is None or dist.get_world_size(group) > 0)


def _acc_dtype(tensors: list[torch.Tensor]) -> torch.dtype:
    # Sum in float32 at least (bf16/fp16 sums lose digits fast); keep float64 if given.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fedavg_(params: list[torch.Tensor], weight: float, group=None) -> float:
    """In-place weighted average of ``params`` over the ranks of ``group`` (FedAvg).

    Every rank ends with ``p = sum_r w_r * p_r / sum_r w_r``. All parameters and the weight go in
    one flat buffer ``[sum numel + 2]`` so it is a single ``all_reduce`` (latency, not bandwidth,
    dominates for LoRA-sized parameter sets).

    Parameters
    ----------
    params : list of torch.Tensor
        Same shapes, order and device on every rank of ``group``; any dtype (summed in float32,
        or float64 if any is float64).
    weight : float
        This rank's weight (e.g. its number of samples), ``>= 0``. A rank may give 0 to take
        part without contributing.
    group : ProcessGroup, optional
        Default: the world. Without an initialised process group this is a no-op.

    Returns
    -------
    float
        The total weight over the group (``weight`` itself in the no-op case).

    Raises
    ------
    ValueError
        On every rank alike if some rank gave a negative/NaN weight or the total is zero (the check
        rides in the same buffer, so a bad rank cannot leave the others blocked in a collective).
    """
    bad = not (weight >= 0 and np.isfinite(weight))  # NaN fails the >= test
    if not _active(group):
        if bad:
            raise ValueError(f"fedavg_: weight must be finite and >= 0, got {weight}")
        return float(weight)
    dtype = _acc_dtype(params)
    device = params[0].device if params else _default_device(group)
    w = 0.0 if bad else float(weight)
    flat = [p.detach().reshape(-1).to(dtype) * w for p in params]
    flat.append(torch.tensor([w, float(bad)], dtype=dtype, device=device))
    buf = torch.cat(flat)
    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
    total, n_bad = float(buf[-2]), int(buf[-1])
    if n_bad:
        raise ValueError(f"fedavg_: {n_bad} rank(s) gave a negative or non-finite weight")
    if total <= 0:
        raise ValueError("fedavg_: total weight over the group is zero")
    _unflatten_into(params, buf[:-2] / total)
    return total


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
