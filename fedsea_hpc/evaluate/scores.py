"""What ``fedsea eval`` compares a generated answer with: the record's reference response.

- References: a ``{"prompt", "response"}`` record's ``response``; a ``{"messages"}`` record's last
  assistant turn, the prompt being the conversation before it (rendered with the chat template and
  its generation prompt, exactly as training renders that turn's prefix). ``{"text"}`` records have
  no reference: they count in the loss only.
- Exact match after :func:`normalize`: Unicode NFKC, case folded, every run of whitespace made one
  space, leading/trailing whitespace removed. Nothing else (punctuation and digits count).
- ROUGE-L F1 of the completion against the reference, from the ``rouge-score`` package (its default
  word tokenizer: lower-cased ASCII letters and digits, no stemming).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from fedsea_hpc.data.dataset import encode_prompt
from fedsea_hpc.data.prompts import Prompt

_SPACE = re.compile(r"\s+")


def normalize(text: str) -> str:
    """The exact-match normalisation (module docstring)."""
    return _SPACE.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def exact_match(prediction: str, reference: str) -> bool:
    return normalize(prediction) == normalize(reference)


_SCORER = None


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 of one pair (0 when either side has no word)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return _SCORER.score(reference, prediction)["rougeL"].fmeasure


@dataclass
class Scored:
    """A record that can be scored by generation: its prompt (as the model sees it) and reference."""

    prompt: Prompt
    reference: str


def scorable(records: list[dict], tokenizer) -> list[Scored]:
    """The records of an eval set that have a reference, in order, with their prompts encoded."""
    out = []
    for rec in records:
        if "prompt" in rec:  # encoded exactly as training encodes prompts (no chat template)
            out.append(Scored(Prompt(rec["prompt"], encode_prompt(rec["prompt"], tokenizer)), rec["response"]))
        elif "messages" in rec:
            msgs = rec["messages"]
            last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
            text = tokenizer.apply_chat_template(msgs[:last], tokenize=False, add_generation_prompt=True)
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            out.append(Scored(Prompt(text, ids), msgs[last]["content"]))
    return out
