"""Cut a Hugging Face Llama into Part A / B / C and build only the part a rank owns.

A :class:`PartModel` is a slice of ``LlamaForCausalLM`` that keeps Hugging Face's parameter
names (``model.layers.7.self_attn.q_proj.weight``), so a rank loads exactly its own keys from a
checkpoint and its LoRA adapters load onto the full model later. Layers are transformers' own
``LlamaDecoderLayer`` / ``LlamaRMSNorm`` / ``LlamaRotaryEmbedding``; masks and positions are
rebuilt from per-sample lengths by :mod:`fedsea_hpc.model.masks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from fedsea_hpc.data.dataset import IGNORE_INDEX
from fedsea_hpc.model.masks import attention_context


def client_layers(num_layers: int, p: int, q: int) -> list[int]:
    """Block indices a client owns: Part A ``[0, p)`` and Part C ``[L-q, L)``."""
    return list(range(p)) + list(range(num_layers - q, num_layers))


def client_union_layers(num_layers: int, splits: Iterable[tuple[int, int]]) -> list[int]:
    """Blocks held by at least one client (sorted): what client FedAvg iterates over."""
    return sorted({i for p, q in splits for i in client_layers(num_layers, p, q)})


def server_layers(num_layers: int, splits: Iterable[tuple[int, int]]) -> list[int]:
    """Blocks the server group owns: the union of ``[p_i, L-q_i)`` over all clients.

    Every server rank holds the same span (DeepSpeed data parallelism needs identical replicas).
    """
    splits = list(splits)
    lo = min(p for p, _ in splits)
    hi = max(num_layers - q for _, q in splits)
    return list(range(lo, hi))


@dataclass(frozen=True)
class ServerSpans:
    """What the server group runs for each client: client ``c`` uses blocks ``[p_c, L - q_c)``.

    Build with :meth:`from_splits`. ``layer_ids`` is the union the server group holds.
    """

    layer_ids: tuple[int, ...]
    spans: tuple[tuple[int, int], ...]  # per client: [lo, hi) on the server

    @classmethod
    def from_splits(cls, num_layers: int, splits: Iterable[tuple[int, int]]) -> ServerSpans:
        splits = list(splits)
        return cls(tuple(server_layers(num_layers, splits)), tuple((p, num_layers - q) for p, q in splits))

    @property
    def uniform(self) -> bool:
        """Every client uses the same span (no row ever skips a block)."""
        return len(set(self.spans)) == 1

    def active_rows(self, owners: list[int], device: torch.device) -> dict[int, torch.Tensor] | None:
        """Per block, a bool [B] mask of the rows (by owning client) that go through it.

        ``owners`` [B]: the client of each row of a client-batch. None when every row runs
        every block (uniform spans, or a dummy batch with no owners).
        """
        if self.uniform or not owners:
            return None
        return {i: torch.tensor([lo <= i < hi for lo, hi in (self.spans[c] for c in owners)], device=device)
                for i in self.layer_ids}


def part_keys(config: LlamaConfig, layers: Iterable[int], *, embed: bool, head: bool,
              all_keys: Iterable[str]) -> list[str]:
    """Checkpoint keys a part needs, out of ``all_keys`` (the checkpoint's tensor names)."""
    prefixes = tuple(f"model.layers.{i}." for i in layers)
    want = [k for k in all_keys if k.startswith(prefixes)]
    if embed:
        want.append("model.embed_tokens.weight")
    if head:
        want.append("model.norm.weight")
        if not (embed and config.tie_word_embeddings):
            want.append("lm_head.weight")
    return want


class PartModel(nn.Module):
    """Embedding (optional) + a set of decoder blocks + norm/head (optional).

    Parameters
    ----------
    config : LlamaConfig
        Config of the *whole* model (``num_hidden_layers`` = L).
    layers : list of int
        Global indices of the blocks this part owns.
    embed, head : bool
        Whether this part owns ``embed_tokens`` / ``norm`` + ``lm_head``.
    """

    def __init__(self, config: LlamaConfig, layers: list[int], *, embed: bool, head: bool):
        super().__init__()
        self.config = config
        self.layer_ids = sorted(layers)
        self.model = nn.Module()
        with torch.device("meta"):  # weights are assigned from the checkpoint slice
            if embed:
                self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
            self.model.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(config, layer_idx=i) for i in self.layer_ids})
            if head:
                self.model.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
                self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.model.rotary_emb = LlamaRotaryEmbedding(config)  # buffers only, computed on CPU
        self.has_embed, self.has_head = embed, head

    def load_slice(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Assign this part's weights (exactly its own keys) and tie the head if configured."""
        tensors = dict(tensors)
        tied = self.has_embed and self.has_head and self.config.tie_word_embeddings
        if tied:
            tensors.pop("lm_head.weight", None)
        own = {k for k in self.state_dict() if not k.startswith("model.rotary_emb.")}
        if tied:
            own.discard("lm_head.weight")
        missing, unexpected = own - tensors.keys(), tensors.keys() - own
        if missing or unexpected:
            raise ValueError(f"checkpoint slice mismatch: missing {sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}")
        self.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False, assign=True)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.model.rotary_emb.to(torch.float32)

    # ------------------------------------------------------------------ compute

    def context(self, hidden: torch.Tensor, lengths: torch.Tensor, padding_side: str = "right", *,
                past: int = 0, cache=None):
        """``(mask, position_ids, position_embeddings)`` for ``hidden`` [B, q, H], rebuilt from
        ``lengths`` [B] (see :func:`fedsea_hpc.model.masks.attention_context`)."""
        return attention_context(self.config, self.model.rotary_emb, hidden, lengths, padding_side,
                                 past=past, cache=cache, layer_idx=self.layer_ids[0])

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, T] token ids → [B, T, H] embeddings."""
        return self.model.embed_tokens(input_ids)

    def run_layers(self, hidden: torch.Tensor, layer_ids: Iterable[int], ctx,
                   active: dict[int, torch.Tensor] | None = None, cache=None) -> torch.Tensor:
        """Run blocks ``layer_ids`` in order on every row of [B, T, H] hidden states.

        ``active`` optionally maps a layer to a bool [B] row mask: rows outside it pass through
        unchanged, though the layer still computes them. Generation uses this (its ``cache``, a
        ``DynamicCache``, holds one tensor per block over all rows; a row outside a block never
        reads that block's entries); training uses :meth:`run_rows`, which computes only the
        rows a block serves.
        """
        mask, position_ids, pos_emb = ctx
        for i in layer_ids:
            out = self.model.layers[str(i)](hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                                            use_cache=cache is not None, position_embeddings=pos_emb)
            rows = None if active is None else active.get(i)
            hidden = out if rows is None else torch.where(rows[:, None, None], out, hidden)
        return hidden

    def run_rows(self, hidden: torch.Tensor, lengths: torch.Tensor, active: dict[int, torch.Tensor],
                 padding_side: str = "right") -> torch.Tensor:
        """Run each owned block only on the rows it serves: block ``i`` on ``hidden[active[i]]``.

        ``hidden`` [B, T, H], ``lengths`` [B], ``active[i]`` a bool [B] mask (every owned block
        has one). Compute is Σ over blocks of its rows, not B × blocks. A block that serves no
        row here still runs once, on row 0, and adds ``0 × its output`` to the
        result: every server rank then calls every block in the same order and every block's
        parameters get a (zero) gradient, as ZeRO's lockstep and gradient buckets need, without
        changing a single value. Rotary embeddings are computed once for all rows and sliced (every
        rank then calls the same modules in the same order, as ZeRO-3's prefetch trace requires);
        masks are rebuilt for each distinct row set.
        """
        everyone = tuple(range(hidden.shape[0]))
        contexts = {everyone: self.context(hidden, lengths, padding_side)}  # one rotary call per step
        cos, sin = contexts[everyone][2]
        for i in self.layer_ids:
            idx = active[i].nonzero().squeeze(1)
            dummy = idx.numel() == 0
            if dummy:
                idx = idx.new_zeros(1)
            key = tuple(idx.tolist())
            if key not in contexts:
                contexts[key] = attention_context(self.config, None, hidden[idx], lengths[idx], padding_side,
                                                  layer_idx=self.layer_ids[0],
                                                  position_embeddings=(cos[idx], sin[idx]))
            mask, position_ids, pos_emb = contexts[key]
            x = hidden if len(key) == hidden.shape[0] else hidden[idx]
            out = self.model.layers[str(i)](x, attention_mask=mask, position_ids=position_ids,
                                            position_embeddings=pos_emb)
            if dummy:
                hidden = hidden + 0 * out.sum()
            elif len(key) == hidden.shape[0]:
                hidden = out
            else:
                hidden = hidden.index_copy(0, idx, out)
        return hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, H] → [B, T, V] logits (norm + lm_head)."""
        return self.lm_head(self.model.norm(hidden))

    def forward(self, hidden: torch.Tensor, lengths: torch.Tensor, active: dict[int, torch.Tensor] | None = None,
                padding_side: str = "right", past: int = 0, cache=None) -> torch.Tensor:
        """Server entry point (what DeepSpeed's engine calls): all owned blocks on [B, q, H].

        Training: right-padded whole sequences; with ``active`` (clients with different spans in
        one client-batch) each block runs only on its rows (:meth:`run_rows`). Generation:
        left-padded, the last q positions of ``past + q`` against ``cache``, every row through
        every block. One module call, so ZeRO-3 gathers the parameters.
        """
        if active is not None and cache is None:
            return self.run_rows(hidden, lengths, active, padding_side)
        ctx = self.context(hidden, lengths, padding_side, past=past, cache=cache)
        return self.run_layers(hidden, self.layer_ids, ctx, active, cache)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy of [B, T, V] logits vs [B, T] labels (fp32)."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, v).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def build_part(source, layers: list[int], *, embed: bool, head: bool, dtype: torch.dtype) -> PartModel:
    """Materialise one part from a :class:`~fedsea_hpc.model.loading.ModelSource`.

    Only this part's tensors are read from the checkpoint.
    """
    part = PartModel(source.config, layers, embed=embed, head=head)
    keys = part_keys(source.config, layers, embed=embed, head=head, all_keys=source.keys())
    part.load_slice(source.load_tensors(keys), dtype)
    return part
