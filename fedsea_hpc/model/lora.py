"""peft LoRA on a part (or on the whole model for the centralized reference).

Each part gets its own adapter. LoRA ``A`` matrices are re-initialised from a generator seeded
by (seed, module name), so a block's adapter starts identical whether it lives on a client, a
server or in the unsplit reference model: the split-vs-centralized exactness test relies on it.
"""
from __future__ import annotations

import math
import re

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedsea_hpc.config import PeftConfig
from fedsea_hpc.model.names import name_seed

# The base module a LoRA A matrix belongs to, e.g. "model.layers.3.self_attn.q_proj".
_CANON = re.compile(r"(model\.layers\.\d+\..*)\.lora_A\.")


def apply_lora(model: nn.Module, peft: PeftConfig, seed: int) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter, or make everything trainable when ``peft.lora_r == 0``.

    Returns the module to train (a ``PeftModel`` when ``lora_r > 0``).
    """
    if peft.lora_r == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    cfg = LoraConfig(r=peft.lora_r, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                     target_modules=list(peft.target_modules), bias="none")
    peft_model = get_peft_model(model, cfg)
    for name, module in peft_model.named_modules():
        m = _CANON.search(name) if name.endswith("lora_A.default") else None
        if m is None or not hasattr(module, "weight"):
            continue
        g = torch.Generator().manual_seed(name_seed(seed, m.group(1)))
        with torch.no_grad():
            w = torch.empty(module.weight.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=g)  # peft's default init, reseeded
            module.weight.copy_(w.to(module.weight.dtype))
    return peft_model


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Named trainable parameters with canonical (peft-prefix-free) names, sorted by name.

    Shared (tied) parameters appear once.
    """
    seen, out = set(), []
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append((canonical_name(name), p))
    return sorted(out, key=lambda kv: kv[0])


def canonical_name(name: str) -> str:
    """Strip peft's ``base_model.model.`` prefix so names match the HF model's."""
    return name.removeprefix("base_model.model.")
