"""Split generation (``fedsea generate``): shared pieces and the per-rank entry point.

Clients keep Part A + Part C and their own KV cache; server ranks keep Part B and one KV cache
per round for all the sequences of their clients. Only per-sample prompt lengths, hidden states
``[B, T, H]`` (prompt) / ``[B, 1, H]`` (each later step) and a few control words cross the wire.
Both sides rebuild the left-padded attention mask and position ids from the lengths exactly as
Hugging Face ``generate`` does (``position = cumsum(mask) - 1``), so greedy outputs equal HF's.

The loops live in :mod:`fedsea_hpc.engine.gen_client` and :mod:`fedsea_hpc.engine.gen_server`;
this module holds what both need (prompt loading, masks, cached layer runs, adapters, sampling).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from fedsea_hpc.config import Config, ConfigError
from fedsea_hpc.data.dataset import DataError, encode_prompt, read_numbered_jsonl
from fedsea_hpc.model.partition import PartModel, client_layers, server_layers
from fedsea_hpc.transport.wire import lengths_to_mask


# ---------------------------------------------------------------- prompts

@dataclass
class Prompt:
    text: str  # what the model sees (the rendered chat template for 'messages' records)
    ids: list[int]


def _check_prompt_record(rec: object) -> None:
    ok = isinstance(rec, dict) and (
        (isinstance(rec.get("prompt"), str) and rec["prompt"]) or
        (isinstance(rec.get("messages"), list) and rec["messages"] and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in rec["messages"])))
    if not ok:
        raise DataError("record needs a non-empty 'prompt' string or a 'messages' list of {role, content}")


def load_prompts(cfg: Config, tokenizer, client: int, max_positions: int) -> list[Prompt]:
    """Client ``client``'s prompts, tokenized, in input order (may be empty for a small shard).

    Raises ``DataError`` for unreadable files, bad records and prompts that leave no room for
    ``generate.max_new_tokens`` within ``max_positions``.
    """
    g, n_clients = cfg.generate, cfg.topology.clients
    files = g.prompts_files
    index = client if len(files) == n_clients else 0
    label, path = f"generate.prompts_files[{index}]", files[index]
    records = read_numbered_jsonl(path, label, _check_prompt_record)
    if len(files) != n_clients:
        records = records[client::n_clients]
    out = []
    for line, rec in records:
        use_template = g.chat_template is True or (g.chat_template == "auto" and "messages" in rec)
        if use_template:
            if getattr(tokenizer, "chat_template", None) is None:
                raise DataError(f"{label}: line {line}: the tokenizer has no chat_template")
            msgs = rec.get("messages") or [{"role": "user", "content": rec["prompt"]}]
            text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        elif "prompt" in rec:
            text, ids = rec["prompt"], encode_prompt(rec["prompt"], tokenizer)
        else:
            raise DataError(f"{label}: line {line}: 'messages' records need generate.chat_template true or auto")
        if not ids:
            raise DataError(f"{label}: line {line}: the prompt encodes to no tokens")
        if len(ids) + g.max_new_tokens > max_positions:
            raise DataError(f"{label}: line {line}: prompt of {len(ids)} tokens + generate.max_new_tokens="
                            f"{g.max_new_tokens} exceeds the model's max_position_embeddings={max_positions}")
        out.append(Prompt(text, ids))
    return out


# ---------------------------------------------------------------- adapters

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def _adapter_shapes(d: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    files = [d / "adapter_model.safetensors", d / "model.safetensors"]
    f = next((p for p in files if p.is_file()), None)
    if f is None:
        raise ConfigError(f"generate.adapters_dir: {d} has neither adapter_model.safetensors nor model.safetensors")
    try:
        with safe_open(str(f), "pt") as h:
            return {k: tuple(h.get_slice(k).get_shape()) for k in h.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input error
        raise ConfigError(f"generate.adapters_dir: cannot read {f}: {str(e).splitlines()[0]}") from None


def _expected_dims(config) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Llama linear, from the model config."""
    h, i = config.hidden_size, config.intermediate_size
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * hd, config.num_key_value_heads * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def check_adapters(cfg: Config, source) -> None:
    """Every rank checks every adapter dir against this model and split (no communication).

    Raises ``ConfigError`` (one line) for a missing dir or one trained on another model/split.
    """
    root = Path(cfg.generate.adapters_dir)
    n_layers = source.config.num_hidden_layers
    want = {f"client{c}": client_layers(n_layers, *cfg.split_for(c)) for c in range(cfg.topology.clients)}
    want["server"] = server_layers(n_layers, [cfg.split_for(c) for c in range(cfg.topology.clients)])
    dims = _expected_dims(source.config)
    ref_shapes = None
    for name, layers in want.items():
        d = root / name
        if not d.is_dir():
            raise ConfigError(f"generate.adapters_dir: {root} has no {name}/ (is it a training run's adapters/ dir?)")
        shapes = _adapter_shapes(d)
        for key, shape in shapes.items():
            mod = next((m for m in dims if f".{m}." in key), None)
            if "lora_A" in key and mod:
                ok = len(shape) == 2 and shape[1] == dims[mod][0]
            elif "lora_B" in key and mod:
                ok = len(shape) == 2 and shape[0] == dims[mod][1]
            else:  # full fine-tuning: a slice of the base model's own tensors
                if ref_shapes is None:
                    ref_shapes = {k: tuple(v.shape) for k, v in source.load_tensors(
                        [k for k in source.keys() if ".layers.0." in k or "layers" not in k]).items()}
                ref = ref_shapes.get(_LAYER.sub(".layers.0.", key))
                ok = ref is not None and ref == shape
            if not ok:
                raise ConfigError(f"generate.adapters_dir: {d}: tensor {key} of shape {list(shape)} does not fit "
                                  f"this model ({cfg.model.name_or_path}); adapters from another model?")
        got = sorted({int(m.group(1)) for k in shapes if (m := _LAYER.search(k))})
        if got != layers:
            raise ConfigError(f"generate.adapters_dir: {d} holds layers {got}, but this split gives {name} "
                              f"layers {layers}; use the training run's model and split.* settings")


def load_adapter(part: PartModel, d: str | None) -> torch.nn.Module:
    """Put a saved adapter (peft LoRA or full fine-tuned weights) onto ``part``; returns the module."""
    if not d:
        return part
    p = Path(d)
    if (p / "adapter_model.safetensors").is_file():
        from peft import PeftModel

        model = PeftModel.from_pretrained(part, str(p), is_trainable=False)
        return model
    from safetensors.torch import load_file

    state = load_file(str(p / "model.safetensors"))
    own = part.state_dict()
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v.to(own[k].dtype))
    if part.has_embed and part.has_head and part.config.tie_word_embeddings:
        part.lm_head.weight = part.model.embed_tokens.weight
    return part


# ---------------------------------------------------------------- masks and cached layer runs

def new_cache(part: PartModel) -> DynamicCache:
    """A cache with one slot per block of the *whole* model; a part fills only its own."""
    return DynamicCache(config=part.config)


def step_context(part: PartModel, hidden: torch.Tensor, lengths: torch.Tensor, past: int,
                 cache: DynamicCache | None, layer_idx: int):
    """``(mask, position_ids, position_embeddings)`` for ``hidden`` [B, q, H] at cache length ``past``.

    ``lengths`` [B]: real (non-pad) tokens of each row *including* these q, left-padded in a
    sequence of ``past + q``. Positions count from each row's first real token, pads get 1,
    exactly like HF ``generate`` (``cumsum(attention_mask) - 1``).
    """
    b, q = hidden.shape[:2]
    mask2d = lengths_to_mask(lengths.to(hidden.device), past + q, "left")
    pos = (mask2d.cumsum(-1) - 1).masked_fill(mask2d == 0, 1)[:, -q:]
    mask = create_causal_mask(config=part.config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache,
                              position_ids=pos, layer_idx=layer_idx)
    return mask, pos, part.model.rotary_emb(hidden, position_ids=pos)


def run_cached(part: PartModel, hidden: torch.Tensor, layer_ids, ctx, cache: DynamicCache | None,
               active: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Blocks ``layer_ids`` on [B, q, H], appending their keys/values to ``cache`` (if any).

    ``active`` as in :meth:`PartModel.run_layers`: rows outside a layer pass through unchanged
    (their cache entries for that layer are never read by them).
    """
    mask, pos, emb = ctx
    for i in layer_ids:
        out = part.model.layers[str(i)](hidden, attention_mask=mask, position_ids=pos, cache=cache,
                                         use_cache=cache is not None, position_embeddings=emb)
        rows = None if active is None else active.get(i)
        hidden = out if rows is None else torch.where(rows[:, None, None], out, hidden)
    return hidden


class CachedPartB(torch.nn.Module):
    """Part B's generation forward as one module call, so DeepSpeed ZeRO-3 gathers its parameters.

    ``forward(hidden [B, q, H], lengths [B], past, cache, active) -> [B, q, H]``.
    """

    def __init__(self, part: PartModel, model: torch.nn.Module):
        super().__init__()
        self.part = part
        self.model = model  # the (possibly peft-wrapped) module that owns the parameters

    def forward(self, hidden, lengths, past: int, cache, active=None):
        ids = self.part.layer_ids
        ctx = step_context(self.part, hidden, lengths, past, cache, ids[0])
        return run_cached(self.part, hidden, ids, ctx, cache, active)


# ---------------------------------------------------------------- sampling

def next_tokens(logits: torch.Tensor, g, generator: torch.Generator | None) -> torch.Tensor:
    """[B, V] last-position logits → [B] token ids (greedy when ``generate.temperature == 0``)."""
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


def generate_split(cfg: Config, topo, source, tokenizer, prompts, dtype: torch.dtype,
                   device: torch.device) -> dict | None:
    """Run this rank's role; rank 0 returns (and writes) the job summary."""
    from fedsea_hpc.distributed.topology import Role

    if topo.role is Role.CLIENT:
        from fedsea_hpc.engine.gen_client import run_client

        return run_client(cfg, topo, source, tokenizer, prompts, dtype, device)
    from fedsea_hpc.engine.gen_server import run_server

    return run_server(cfg, topo, source, dtype, device)
