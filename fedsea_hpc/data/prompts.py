"""Prompts for ``fedsea generate``: JSONL records -> token ids, per client, checked up front.

Records are ``{"prompt": str}`` (encoded exactly as training encodes prompts) or
``{"messages": [{"role", "content"}, ...]}`` (the tokenizer's chat template with the generation
prompt). Prompts stay on their client, like training data.
"""
from __future__ import annotations

from dataclasses import dataclass

from fedsea_hpc.config import GenerateConfig
from fedsea_hpc.data.dataset import CHAT_ROLES, DataError, encode_prompt, read_numbered_jsonl


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
    msgs = rec.get("messages") if isinstance(rec.get("messages"), list) else []
    for j, m in enumerate(msgs):
        if m["role"] not in CHAT_ROLES:
            raise DataError(f"messages[{j}]: unknown role {m['role']!r}; allowed: {', '.join(CHAT_ROLES)}")


def load_prompts(g: GenerateConfig, n_clients: int, tokenizer, client: int, max_positions: int) -> list[Prompt]:
    """Client ``client``'s prompts, tokenized, in input order (may be empty for a small shard).

    ``g.prompts_files`` holds one file per client or one file sharded round-robin over
    ``n_clients``. Raises ``DataError`` for unreadable files, bad records and prompts that leave
    no room for ``g.max_new_tokens`` within ``max_positions``.
    """
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
