"""The one collective of plain (unmasked) client aggregation: an in-place sum of one flat buffer.

FedAvg and FedSGD (:class:`fedsea_hpc.federated.client_sync.ClientSync`) pack everything, the
weights and the bad-input flag included, into one buffer and sum it once per round: for
LoRA-sized parameter sets latency, not bandwidth, dominates. Under secure aggregation the same
buffer goes through :class:`fedsea_hpc.privacy.secure_agg.SecureSum` instead.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from fedsea_hpc.distributed import reduce


def allreduce_sum_(buf: torch.Tensor, group=None) -> None:
    """Sum ``buf`` (any shape, float32 or float64) in place over the ranks of ``group``.

    Parameters
    ----------
    buf : torch.Tensor
        Same shape, dtype and device on every rank (CPU for gloo, CUDA for NCCL). Low-precision
        buffers are refused: a bf16 sum over clients loses digits fast, so callers promote first.
    group : ProcessGroup, optional
        Default: the world. Without an initialised process group this is a no-op, so
        single-process code needs no branches.
    """
    if buf.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"allreduce_sum_ sums float32/float64 buffers, got {buf.dtype}")
    if not (dist.is_available() and dist.is_initialized()):
        return
    reduce.sum_(buf, group=group)
