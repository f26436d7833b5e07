"""What a training run keeps of each part, checked and loaded back for generation.

A part's trainable state is saved in peft's own format (``adapter_config.json`` +
``adapter_model.safetensors``) or, for full fine-tuning, as the part's weights with Hugging Face
names (``model.safetensors``). A run's ``adapters/`` dir holds ``client<i>/`` (Parts A + C of
client i) and ``server/`` (Part B).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from fedsea_hpc.config import ConfigError
from fedsea_hpc.model.names import layer_of, with_layer
from fedsea_hpc.model.partition import PartModel, client_layers, server_layers

ADAPTER_FILE = "adapter_model.safetensors"
FULL_FILE = "model.safetensors"
PARTITION_FILE = "partition.json"  # the per-client (p, q) the saved parts were cut at (the final one)


def save_adapter(model: nn.Module, out_dir: str) -> None:
    """peft's format for a ``PeftModel``; else the part's own weights as ``model.safetensors``."""
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
    save_file(state, os.path.join(out_dir, FULL_FILE), metadata={"format": "pt"})


def _shapes(d: Path, key: str) -> dict[str, tuple[int, ...]]:
    f = next((p for p in (d / ADAPTER_FILE, d / FULL_FILE) if p.is_file()), None)
    if f is None:
        raise ConfigError(f"{key}: {d} has neither {ADAPTER_FILE} nor {FULL_FILE}")
    try:
        with safe_open(str(f), "pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ConfigError(f"{key}: cannot read {f}: {str(e).splitlines()[0]}") from None


def linear_dims(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Llama linear, from the model config."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def saved_partition(root: str, clients: int, *, key: str) -> list[tuple[int, int]] | None:
    """The per-client splits a run's ``adapters/`` were saved at (``partition.json``), if recorded:
    after a run that rebalanced, the final partition, which generation must use."""
    f = Path(root) / PARTITION_FILE
    if not f.is_file():
        return None
    try:
        splits = [tuple(int(v) for v in pq) for pq in json.loads(f.read_text())["splits"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{key}: cannot read {f}: {e}") from None
    if len(splits) != clients or any(len(pq) != 2 for pq in splits):
        raise ConfigError(f"{key}: {f} records {len(splits)} clients' splits, but topology.clients = {clients}; "
                          f"generate with the training run's topology.clients")
    return splits


def is_whole_model(root: str) -> bool:
    """Whether ``root`` is one whole-model adapter (``train.mode`` centralized or local:
    ``adapters/centralized/``, ``adapters/local<i>/``) rather than a split run's ``adapters/``."""
    return bool(root) and any((Path(root) / f).is_file() for f in (ADAPTER_FILE, FULL_FILE))


def part_dir(root: str, part: str) -> str | None:
    """Where part ``part`` (``client<i>``, ``server``) loads its adapter from: ``root/part`` for a
    split run's ``adapters/``, ``root`` itself for a whole-model adapter (every part takes its own
    layers of it), None for no adapter."""
    if not root:
        return None
    return root if is_whole_model(root) else os.path.join(root, part)


def check_adapters(root: str, source, splits: list[tuple[int, int]], *, key: str, model_name: str) -> None:
    """Check a run's ``adapters/`` dir (or one whole-model adapter, :func:`is_whole_model`)
    against this model and these per-client splits.

    Reads only file headers (no communication, every rank can do it). Raises ``ConfigError``
    naming ``key`` for a missing part or one trained on another model or split.
    """
    root_p = Path(root)
    n_layers = source.config.num_hidden_layers
    if is_whole_model(root):  # every layer, for every part to take its own
        want = {"": list(range(n_layers))}
    else:
        want = {f"client{c}": client_layers(n_layers, p, q) for c, (p, q) in enumerate(splits)}
        want["server"] = server_layers(n_layers, splits)
    dims = linear_dims(source.config)
    ref_shapes = None
    for name, layers in want.items():
        d = root_p / name
        if not d.is_dir():
            raise ConfigError(f"{key}: {root} has no {name}/ (is it a training run's adapters/ dir?)")
        shapes = _shapes(d, key)
        for tensor, shape in shapes.items():
            mod = next((m for m in dims if f".{m}." in tensor), None)
            if "lora_A" in tensor and mod:
                ok = len(shape) == 2 and shape[1] == dims[mod][0]
            elif "lora_B" in tensor and mod:
                ok = len(shape) == 2 and shape[0] == dims[mod][1]
            else:  # full fine-tuning: a slice of the base model's own tensors
                if ref_shapes is None:
                    ref_shapes = {k: tuple(v.shape) for k, v in source.load_tensors(
                        [k for k in source.keys() if layer_of(k) in (None, 0)]).items()}
                ok = ref_shapes.get(with_layer(tensor, 0)) == shape
            if not ok:
                raise ConfigError(f"{key}: {d}: tensor {tensor} of shape {list(shape)} does not fit "
                                  f"this model ({model_name}); adapters from another model?")
        got = sorted({i for k in shapes if (i := layer_of(k)) is not None})
        if got != layers:
            raise ConfigError(f"{key}: {d} holds layers {got}, but this split gives {name} "
                              f"layers {layers}; use the training run's model and split.* settings")


def load_adapter(part: PartModel, d: str | None) -> nn.Module:
    """Put a saved adapter (peft LoRA or full fine-tuned weights) onto ``part``; returns the module."""
    if not d:
        return part
    p = Path(d)
    if (p / ADAPTER_FILE).is_file():
        return PeftModel.from_pretrained(part, str(p), is_trainable=False)
    state = load_file(str(p / FULL_FILE))
    own = part.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            if k in own:  # a whole-model file holds the other parts' layers too (check_adapters vetted it)
                own[k].copy_(v.to(own[k].dtype))
    if part.has_embed and part.has_head and part.config.tie_word_embeddings:
        part.lm_head.weight = part.model.embed_tokens.weight
    return part
