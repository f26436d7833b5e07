"""peft LoRA on a part (or on the whole model for the centralized reference).

Each part gets its own adapter. LoRA ``A`` matrices are re-initialised from a generator seeded
by (seed, module name), so a block's adapter starts identical whether it lives on a client, a
server or in the unsplit reference model: the split-vs-centralized exactness test relies on it.
"""
from __future__ import annotations

import hashlib
import math
import os
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn

_CANON = re.compile(r"(model\.layers\.\d+\..*)\.lora_A\.")


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def apply_lora(model: nn.Module, *, r: int, alpha: float, dropout: float, target_modules: list[str],
               seed: int) -> nn.Module:
    """Wrap ``model`` with a LoRA adapter, or make everything trainable when ``r == 0``.

    Returns the module to train (a ``PeftModel`` when ``r > 0``).
    """
    if r == 0:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules), bias="none")
    peft_model = get_peft_model(model, cfg)
    for name, module in peft_model.named_modules():
        m = _CANON.search(name) if name.endswith("lora_A.default") else None
        if m is None or not hasattr(module, "weight"):
            continue
        g = torch.Generator().manual_seed(_name_seed(seed, m.group(1)))
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


def save_adapter(model: nn.Module, out_dir: str) -> None:
    """peft's own format (adapter_config.json + adapter_model.safetensors), or, for full
    fine-tuning, the part's own weights as ``model.safetensors`` with HF names."""
    if isinstance(model, PeftModel):
        model.save_pretrained(out_dir)
        return
    # Clone: under ZeRO the parameters are views into flat buffers, which safetensors refuses;
    # a tied head is stored once, as the embedding.
    seen, state = set(), {}
    for name, t in model.state_dict().items():
        if name.startswith("model.rotary_emb.") or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        state[name] = t.detach().clone().contiguous()
    os.makedirs(out_dir, exist_ok=True)
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
