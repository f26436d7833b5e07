"""FedAvg / FedSGD of client-side parameters over the client group, partition-aware.

Clients may own different blocks (per-client partition points): block 2 can live on client 0
but on the server for client 1. Each tensor is therefore averaged over the clients that *hold*
it. All clients build the same slot list from the config alone (the union of client-held blocks
× the per-block parameter suffixes, then the non-block parameters), contribute zeros with zero
weight where they hold nothing, and one flat sum over the clients does the rest: a plain
all-reduce, or ``secure_sum`` (pairwise-masked, :mod:`fedsea_hpc.privacy.secure_agg`) so that
no client sees another's individual update, only the sum.
"""
from __future__ import annotations

import math

import torch

from typing import Callable

from fedsea_hpc.federated.aggregate import allreduce_sum_
from fedsea_hpc.model.names import split_layer_name


class ClientSync:
    """Precomputed slot layout for one client.

    Parameters
    ----------
    named : list of (str, Tensor)
        This client's trainable tensors with canonical HF names.
    union_layers : list of int
        Blocks held by at least one client (the same list on every client).
    group : ProcessGroup or None
        The client group.
    secure_sum : callable, optional
        Replaces a flat float vector by its sum over the group without revealing the parts
        (e.g. :class:`fedsea_hpc.privacy.secure_agg.SecureSum`); None = a plain all-reduce.
    """

    def __init__(self, named: list[tuple[str, torch.Tensor]], union_layers: list[int], group=None,
                 secure_sum: Callable[[torch.Tensor], None] | None = None):
        self.group, self.secure_sum = group, secure_sum
        own = dict(named)
        by_suffix: dict[str, torch.Tensor] = {}
        others: list[str] = []
        for name, t in named:
            where = split_layer_name(name)
            if where:
                by_suffix.setdefault(where[1], t)
            else:
                others.append(name)
        self.union_layers = list(union_layers)
        # slot = (name, shape, weight index): the block's position in the union, or
        # len(union) for the tensors every client holds (embedding, norm, head)
        self.slots: list[tuple[str, torch.Size, int]] = []
        for li, layer in enumerate(self.union_layers):
            for suffix in sorted(by_suffix):
                self.slots.append((f"model.layers.{layer}.{suffix}", by_suffix[suffix].shape, li))
        self.slots += [(n, own[n].shape, len(self.union_layers)) for n in sorted(others)]
        self.own = own
        held = {where[0] for n in own if (where := split_layer_name(n))}
        self.held_layers = [li for li, layer in enumerate(self.union_layers) if layer in held]

    def nbytes(self) -> int:
        """Bytes of the flat vector one sum moves (values, then weights; float32 or wider)."""
        dtype = torch.promote_types(next(iter(self.own.values())).dtype, torch.float32)
        n = sum(s.numel() for _, s, _ in self.slots) + len(self.union_layers) + 2
        return n * torch.empty(0, dtype=dtype).element_size()

    def _reduce(self, tensors: dict[str, torch.Tensor], weight: float, average: bool) -> None:
        # A bad weight on one client must fail every client alike, never leave the others in a
        # collective: the check rides in the same buffer as the values ([union layers, shared, bad]).
        bad = not (weight >= 0 and math.isfinite(weight))  # NaN fails the >= test
        weight = 0.0 if bad else weight
        ref = next(iter(tensors.values()))
        chunks = [(tensors[n] * weight).reshape(-1) if n in tensors else torch.zeros(s.numel(), dtype=ref.dtype, device=ref.device)
                  for n, s, _ in self.slots]
        w = torch.zeros(len(self.union_layers) + 2, dtype=ref.dtype, device=ref.device)
        w[self.held_layers] = weight
        w[-2], w[-1] = weight, float(bad)  # w[-2] is w[len(union)]: the shared tensors' weight
        # Weights are summed with the values: under secure aggregation a peer learns neither.
        buf = torch.cat(chunks + [w]).to(torch.promote_types(ref.dtype, torch.float32))
        if self.secure_sum is None:
            allreduce_sum_(buf, group=self.group)
        else:
            self.secure_sum(buf)
        flat, w = buf[:-len(w)], buf[-len(w):]
        if w[-1] > 0:
            raise ValueError(f"FedAvg: {int(w[-1])} client(s) gave a negative or non-finite weight")
        if average and bool((w[:-1] <= 0).any()):  # the same verdict on every client
            raise ValueError("FedAvg: the holders of some tensor have a total weight of zero (no samples)")
        offset = 0
        for name, shape, li in self.slots:
            n = shape.numel()
            if name in tensors:
                seg = flat[offset:offset + n].view(shape)
                if average:
                    seg = seg / w[li].item()
                tensors[name].copy_(seg)
            offset += n

    @torch.no_grad()
    def average_params(self, weight: float) -> None:
        """In-place FedAvg of parameters, each weighted by its holder's ``weight`` (samples)."""
        self._reduce({n: p.data for n, p in self.own.items()}, float(weight), average=True)

    @torch.no_grad()
    def sum_grads(self) -> None:
        """In-place sum of gradients over holders (FedSGD: equals the centralized gradient)."""
        grads = {}
        for n, p in self.own.items():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads[n] = p.grad
        self._reduce(grads, 1.0, average=False)
