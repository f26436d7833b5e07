"""Attention masks and position ids rebuilt from per-sample lengths: one convention for all jobs.

Only lengths ``[B]`` cross the wire (FedSEA's attention-mask compression); every part rebuilds
what attention needs locally, with the same functions on every rank:

- training pads on the **right**: row ``b`` holds ``lengths[b]`` real tokens then pads;
- generation pads on the **left**, as transformers' ``generate`` does.

Positions count from each row's first real token (``0 .. len-1``). Right pads continue the
count (what a Hugging Face forward without ``position_ids`` does); left pads get 1 (what
``generate`` does with ``cumsum(mask) - 1``). Pads are masked out of attention and loss, so their
value never reaches a real token; matching Hugging Face keeps even the pad rows bit-identical.
"""
from __future__ import annotations

import torch
from transformers.masking_utils import create_causal_mask

PADDING_SIDES = ("left", "right")


class MaskError(ValueError):
    """Lengths that cannot describe a ``[B, T]`` batch, or an unknown padding side."""


def _check(lengths: torch.Tensor, seq_len: int, padding_side: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise MaskError(f"padding_side {padding_side!r} is not one of {PADDING_SIDES}")
    if lengths.dim() != 1:
        raise MaskError(f"lengths must be 1-d [B], got shape {list(lengths.shape)}")
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > seq_len):
        raise MaskError(f"lengths {lengths.tolist()} outside 0..{seq_len}")


def lengths_to_mask(lengths: torch.Tensor, seq_len: int, padding_side: str) -> torch.Tensor:
    """``lengths`` [B] (each in ``0..T``) -> the ``[B, T]`` int64 padding mask (1 = real token).

    Lives on ``lengths.device``; pads sit on ``padding_side`` ('right' or 'left'); T = ``seq_len``.
    """
    _check(lengths, seq_len, padding_side)
    pos = torch.arange(seq_len, device=lengths.device).unsqueeze(0)  # [1, T]
    lens = lengths.to(torch.int64).unsqueeze(1)  # [B, 1]
    mask = pos < lens if padding_side == "right" else pos >= seq_len - lens
    return mask.to(torch.int64)


def position_ids(lengths: torch.Tensor, seq_len: int, padding_side: str) -> torch.Tensor:
    """``[B, T]`` int64 position ids for ``lengths`` [B] (the module docstring's convention)."""
    _check(lengths, seq_len, padding_side)
    pos = torch.arange(seq_len, device=lengths.device).unsqueeze(0).expand(lengths.shape[0], -1)
    if padding_side == "right":
        return pos.clone()
    start = seq_len - lengths.to(torch.int64).unsqueeze(1)  # [B, 1] index of the first real token
    return (pos - start).masked_fill(pos < start, 1)


def attention_context(config, rotary_emb, hidden: torch.Tensor, lengths: torch.Tensor, padding_side: str, *,
                      past: int = 0, cache=None, layer_idx: int = 0, position_embeddings=None):
    """``(mask, position_ids, position_embeddings)`` for ``hidden`` [B, q, H].

    ``hidden`` holds the last q positions of sequences of ``past + q`` (``past`` > 0 only when
    decoding against ``cache``); ``lengths`` [B] counts each row's real tokens among all
    ``past + q``. ``mask`` is whatever transformers' ``create_causal_mask`` builds for the
    configured attention kernel; ``layer_idx`` is a block whose cache holds ``past`` entries.
    ``position_embeddings`` (cos, sin), when given, are used instead of calling ``rotary_emb``
    (rows sliced from a larger batch's: a ZeRO-3 rank must call its modules in a fixed order).
    """
    q = hidden.shape[1]
    lengths = lengths.to(hidden.device)
    mask2d = lengths_to_mask(lengths, past + q, padding_side)
    pos = position_ids(lengths, past + q, padding_side)[:, past:]
    mask = create_causal_mask(config=config, inputs_embeds=hidden, attention_mask=mask2d, cache=cache,
                              position_ids=pos, layer_idx=layer_idx)
    if position_embeddings is None:
        position_embeddings = rotary_emb(hidden, position_ids=pos)
    return mask, pos, position_embeddings
