"""Client memory per block, for ``split.client_memory_mb``: what one more block costs a client.

Static part, from the model config alone (so it is checked at start, before any rank talks):

* a block's base weights (model dtype), and with LoRA its adapter: parameter + gradient + AdamW's
  two moments (4 × its bytes; with ``peft.lora_r=0`` the block's weights themselves are trained
  and pay the same 4 ×);
* the split-independent part: embedding, final norm and head (untied head only), trained or not
  the same way.

Measured part, during training: the bytes autograd saves for backward (``saved_tensors_hooks``
over the client's forward passes), per block (A phase / p) and outside the blocks (embedding,
head, loss: the [B, T, V] logits dominate); parameters saved by autograd are left out (they are
in the static part). The step's largest value is kept, since memory must fit the peak. Views of
one storage are counted once per save, so this is an upper bound.

A budget no partition can meet is an error at start: :func:`check_budgets`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fedsea_hpc.adapt import planner
from fedsea_hpc.config import ConfigError
from fedsea_hpc.model.adapters import linear_dims

MiB = 2**20


@dataclass(frozen=True)
class StaticMemory:
    """MiB one client block costs, and the split-independent MiB, before activations."""

    block_mb: float
    fixed_mb: float

    def need(self, k: int) -> float:
        return self.fixed_mb + self.block_mb * k


def static_memory(config, dtype: torch.dtype, lora_r: int, target_modules) -> StaticMemory:
    item = torch.empty(0, dtype=dtype).element_size()
    dims = linear_dims(config)
    base = sum(i * o for i, o in dims.values()) + 2 * config.hidden_size  # + the two RMSNorms
    if lora_r > 0:
        trained = sum(lora_r * (i + o) for m, (i, o) in dims.items() if m in set(target_modules))
        block = base * item + 4 * trained * item
    else:
        block = 4 * base * item
    embed = config.vocab_size * config.hidden_size
    head = 0 if config.tie_word_embeddings else embed
    fixed = (embed + head + config.hidden_size) * item * (1 if lora_r > 0 else 4)
    return StaticMemory(block / MiB, fixed / MiB)


def check_budgets(cfg, config, dtype: torch.dtype) -> None:
    """``split.client_memory_mb`` against the static memory: the initial split of each client, and
    the smallest split the floors allow, must fit (activations come on top, measured later)."""
    budgets = cfg.split.client_memory_mb
    if not budgets:
        return
    mem = static_memory(config, dtype, cfg.peft.lora_r, cfg.peft.target_modules)
    n = len(budgets)
    zeros = [0.0] * n  # times do not matter here: only the planner's budget rule
    try:
        planner.feasible_ks(planner.Costs(zeros, zeros, zeros, zeros, client_fixed_mb=[mem.fixed_mb] * n,
                                          client_block_mb=[mem.block_mb] * n),
                            planner.Limits(config.num_hidden_layers, cfg.split.min_head_layers,
                                           cfg.split.min_tail_layers, budgets))
    except planner.PlanError as e:
        raise ConfigError(f"{e} (weights, adapters and optimizer state; activations come on top)") from None
    for c, budget in enumerate(budgets):
        if budget is None:
            continue
        p, q = cfg.split_for(c)
        if mem.need(p + q) > budget:
            where = f"split.per_client[{c}]" if cfg.split.per_client else "split.head_layers/tail_layers"
            raise ConfigError(f"{where}: p + q = {p + q} needs {mem.need(p + q):.1f} MiB on client {c}, over its "
                              f"split.client_memory_mb budget of {budget:g} MiB; use at most "
                              f"{int((budget - mem.fixed_mb) // mem.block_mb)} blocks")


class SavedBytes:
    """Counts the bytes autograd saves for backward inside ``with counter:`` (a saved-tensor hook)."""

    def __init__(self):
        self.bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not isinstance(t._base if t._base is not None else t, torch.nn.Parameter):  # weights: counted statically
            self.bytes += t.numel() * t.element_size()
        return t

    def __enter__(self) -> SavedBytes:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
