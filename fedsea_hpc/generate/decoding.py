"""Decoding pieces both sides of split generation share: KV caches and token choice."""
from __future__ import annotations

import torch
from transformers import DynamicCache

from fedsea_hpc.config import GenerateConfig


def new_cache(config) -> DynamicCache:
    """A cache with one slot per block of the *whole* model (``config``); a part fills only its own."""
    return DynamicCache(config=config)


def next_tokens(logits: torch.Tensor, g: GenerateConfig, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] last-position logits → [B] token ids (greedy when ``g.temperature == 0``).

    Sampling applies temperature, then top-k, then top-p (the smallest prefix of the sorted
    distribution whose mass reaches ``top_p``), then draws with ``generator`` (CPU).
    """
    logits = logits.float()
    if g.temperature == 0:
        return logits.argmax(-1)
    logits = logits / g.temperature
    if g.top_k > 0:
        kth = torch.topk(logits, min(g.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if g.top_p < 1.0:
        sorted_l, idx = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs > g.top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.scatter(-1, idx, sorted_l.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)
