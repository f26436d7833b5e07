"""Hugging Face parameter names: which block a tensor belongs to, and per-name seeds.

One place for the naming conventions that loading, LoRA, adapters and FedAvg all rely on.
"""
from __future__ import annotations

import hashlib
import re

# "model.layers.7.self_attn.q_proj.lora_A.weight" -> block 7, rest "self_attn.q_proj.lora_A.weight".
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.(.+)$")
_INDEX = re.compile(r"(^|\.)layers\.\d+\.")


def layer_of(name: str) -> int | None:
    """Index of the decoder block ``name`` belongs to, or None (embedding, norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def split_layer_name(name: str) -> tuple[int, str] | None:
    """``(block, suffix)`` of a block tensor's name, or None: ``layers.3.mlp.x`` -> (3, "mlp.x")."""
    m = _LAYER.search(name)
    return (int(m.group(1)), m.group(2)) if m else None


def with_layer(name: str, layer: int) -> str:
    """``name`` moved to block ``layer`` (for shape look-ups: every block has the same shapes)."""
    return _INDEX.sub(rf"\g<1>layers.{layer}.", name, count=1)


def name_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (run seed, tensor name), the same in every process.

    Tiny-model weights and LoRA ``A`` matrices are drawn from it, so a tensor's initial value
    depends only on its name: a block starts identical on a client, a server or in the unsplit
    reference model (the split-vs-centralized exactness tests rely on this).
    """
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1
