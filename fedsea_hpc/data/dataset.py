"""Client-local training data: JSONL records -> token ids + loss labels -> padded batches.

Record formats (one JSON object per line; other keys are ignored):

- ``{"text"}``: loss on every token; EOS is appended so the model learns to stop.
- ``{"prompt", "response"}``: joined verbatim (a separator belongs at the end of the prompt);
  loss on the response and the appended EOS only. Generation must encode prompts with
  `encode_prompt`, as training does.
- ``{"messages": [{"role", "content"}, ...]}``: the tokenizer's chat template; loss on each
  assistant turn's content and end marker only (see `_chat_segments`).

BOS follows the tokenizer's default (``add_special_tokens=True`` for text and prompts; chat
templates carry their own); the byte tokenizer adds none. Labels are aligned with ``input_ids``
(the HF model shifts them), -100 where no loss is taken.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedsea_hpc.errors import InputError

IGNORE_INDEX = -100
CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles a chat record may use


class DataError(InputError):
    """A problem with the training data, as a one-line message naming the file and line."""


@dataclass
class Example:
    """One encoded record. ``input_ids`` and ``labels`` have the same length (<= seq_len)."""

    input_ids: list[int]
    labels: list[int]
    truncated_tokens: int = 0

    @property
    def num_loss_tokens(self) -> int:
        """Positions that contribute to the shifted next-token loss: ``labels[1:] != -100``."""
        return sum(label != IGNORE_INDEX for label in self.labels[1:])


@dataclass
class Batch:
    """A right-padded micro-batch.

    Attributes
    ----------
    input_ids : LongTensor ``[B, T]``; pad id after each row's length; T = the longest row.
    labels : LongTensor ``[B, T]``; aligned with input_ids, -100 on padding and unlearned tokens.
    lengths : LongTensor ``[B]``; real (unpadded) length of each row.
    num_loss_tokens : int; ``(labels[:, 1:] != -100).sum()``, the token-mean loss denominator.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    lengths: torch.Tensor
    num_loss_tokens: int

    def to(self, device: torch.device | str) -> Batch:
        """Copy the tensors to ``device``."""
        return Batch(self.input_ids.to(device), self.labels.to(device), self.lengths.to(device),
                     self.num_loss_tokens)


def _record_format(record: object) -> str:
    """Validate one record; return 'text', 'prompt' or 'messages'. DataError has no location."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    present = [k for k in ("text", "prompt", "messages") if k in record]
    if len(present) != 1 or ("prompt" in record) != ("response" in record):
        raise DataError("record needs 'text', 'prompt'+'response' or 'messages'"
                        + (f" (only one; it has {', '.join(present)})" if len(present) > 1 else ""))
    kind, value = present[0], record[present[0]]
    if kind == "text" and not (isinstance(value, str) and value):
        raise DataError("'text' must be a non-empty string")
    if kind == "prompt" and not (isinstance(value, str) and isinstance(record["response"], str)
                                 and record["response"]):
        raise DataError("'prompt' must be a string and 'response' a non-empty string")
    if kind == "messages":
        if not isinstance(value, list) or not value:
            raise DataError("'messages' must be a non-empty list")
        for j, m in enumerate(value):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                raise DataError(f"messages[{j}] needs string 'role' and 'content'")
            if m["role"] not in CHAT_ROLES:
                raise DataError(f"messages[{j}]: unknown role {m['role']!r}; allowed: {', '.join(CHAT_ROLES)}")
        if not any(m["role"] == "assistant" for m in value):
            raise DataError("'messages' needs at least one 'assistant' turn to learn from")
    return kind


def _locate(path: str | Path, label: str | None, line: int | None, msg: str) -> DataError:
    """Build ``"<label or path>: line N: msg (file PATH)"``; the path is appended when labelled."""
    where = label or str(path)
    where += f": line {line}" if line is not None else ""
    return DataError(f"{where}: {msg}" + (f" (file {path})" if label else ""))


def read_numbered_jsonl(path: str | Path, label: str | None,
                        check: Callable[[object], object] | None = None) -> list[tuple[int, dict]]:
    """Read a JSONL file; return ``(1-based line number, record)`` pairs.

    ``check(record)`` raises ``DataError`` for a record of the wrong shape (default: a training
    record); errors name the label (or path) and the line.
    """
    check = check or _record_format
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _locate(path, label, None, f"file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:  # a directory, no permission, not UTF-8, ...
        raise _locate(path, label, None, f"cannot read {path}: {e}") from None
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():  # blank lines (e.g. a trailing newline) are not records
            continue
        try:
            check(record := json.loads(line))
        except json.JSONDecodeError as e:
            raise _locate(path, label, n, f"invalid JSON: {e.msg} at column {e.colno}") from None
        except DataError as e:
            raise _locate(path, label, n, str(e)) from None
        out.append((n, record))
    if not out:
        raise _locate(path, label, None, "file has no records")
    return out


def read_jsonl(path: str | Path, *, label: str | None = None) -> list[dict]:
    """Read a JSONL file of training records, validating each one.

    ``label`` (e.g. ``"data.train_files[1]"``) is how errors name the file; the path is then
    appended. Blank lines are skipped. Raises `DataError` for a missing/unreadable file, invalid
    JSON, an invalid record, or a file without records.
    """
    return [record for _, record in read_numbered_jsonl(path, label)]


def encode_prompt(prompt: str, tokenizer) -> list[int]:
    """Token ids of a prompt exactly as training sees it (tokenizer's default special tokens)."""
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def _chat_segments(messages: list[dict], tokenizer) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, learn)`` pieces.

    For assistant turn k the prompt is ``render(messages[:k], add_generation_prompt=True)`` and
    the turn is what ``render(messages[:k + 1])`` adds to it. Each piece is tokenized on its own,
    so the learned span starts on a token boundary, exactly as when the model generates it.
    """
    def render(msgs, gen):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def after(prefix, text):  # a template that rewrites earlier turns can't be split this way
        if not text.startswith(prefix):
            raise DataError("chat template does not render conversation prefixes as prefixes")
        return text[len(prefix):]

    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError("'messages' records need a tokenizer with a chat_template")
    pieces, done = [], ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt, full = render(messages[:k], True), render(messages[: k + 1], False)
            turn = after(prompt, full)
            learned = turn.rstrip()  # content + end marker; the newline after it is template glue
            pieces += [(after(done, prompt), False), (learned, True), (turn[len(learned):], False)]
            done = full
    pieces.append((after(done, render(messages, False)), False))
    return [(text, learn) for text, learn in pieces if text]


def encode_record(record: dict, tokenizer, seq_len: int) -> Example:
    """Tokenize one record and label the tokens the loss should learn.

    ``record`` is one of the formats in the module docstring; the tokenizer needs an EOS token
    (and a chat template for ``messages``). Returns an `Example` whose ``input_ids`` and
    ``labels`` have equal length ``<= seq_len``: longer sequences keep their first ``seq_len``
    tokens and ``truncated_tokens`` counts the rest.
    """
    kind = _record_format(record)
    eos = tokenizer.eos_token_id
    if eos is None and kind != "messages":
        raise DataError("tokenizer has no eos token")

    def ids(text):
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    if kind == "text":
        input_ids = encode_prompt(record["text"], tokenizer) + [eos]
        labels = list(input_ids)
    elif kind == "prompt":
        prompt = encode_prompt(record["prompt"], tokenizer)
        response = ids(record["response"]) + [eos]
        input_ids = prompt + response
        labels = [IGNORE_INDEX] * len(prompt) + response
    else:
        input_ids, labels = [], []
        for text, learn in _chat_segments(record["messages"], tokenizer):
            piece = ids(text)
            input_ids += piece
            labels += piece if learn else [IGNORE_INDEX] * len(piece)
    cut = max(0, len(input_ids) - seq_len)
    return Example(input_ids[:seq_len], labels[:seq_len], cut)


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad examples into a `Batch` of shape ``[B, max length]``."""
    if not examples:
        raise ValueError("collate needs at least one example")
    lengths = torch.tensor([len(e.input_ids) for e in examples], dtype=torch.long)
    T = int(lengths.max())
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        labels[i, : len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
    return Batch(input_ids, labels, lengths, int((labels[:, 1:] != IGNORE_INDEX).sum()))


def concat_batches(batches: Sequence[Batch], pad_id: int) -> Batch:
    """Stack batches along B in the given order into ``[sum B_i, max T_i]``, right-padding
    each to the longest T; ``num_loss_tokens`` is the sum of the parts'."""
    if not batches:
        raise ValueError("concat_batches needs at least one batch")
    T = max(b.input_ids.shape[1] for b in batches)

    def cat(name, value):  # [B_i, T_i] -> right-pad each to [B_i, T] -> [sum B_i, T]
        return torch.cat([F.pad(getattr(b, name), (0, T - b.input_ids.shape[1]), value=value)
                          for b in batches])

    return Batch(cat("input_ids", pad_id), cat("labels", IGNORE_INDEX),
                 torch.cat([b.lengths for b in batches]), sum(b.num_loss_tokens for b in batches))


class ClientData:
    """The encoded training examples of one client, and its infinite batch stream.

    ``files`` is ``data.train_files``: one file per client (client i reads ``files[i]``) or a
    single file sharded round-robin by record (client i gets records ``i::num_clients``).
    Records longer than ``seq_len`` are truncated and counted (``truncated_sequences``,
    ``truncated_tokens``). Records left without a loss position are dropped and counted in
    ``dropped_examples``: they would only add padding and a zero-loss row. ``examples`` holds the
    rest (``num_examples`` of them); ``pad_id`` (the tokenizer's pad, else EOS) pads batches.
    ``seed`` (>= 0), the client index and the epoch fix each epoch's shuffle.
    """

    def __init__(self, files: list[str], client_index: int, num_clients: int, tokenizer,
                 seq_len: int, seed: int, silo: int | None = None, shards: int | None = None, *,
                 key: str = "data.train_files", holdout: float = 0.0, part: str = "train"):
        """``silo``/``shards``: which data silo this client is and how many shards a single file
        was cut into (default: ``client_index`` of ``num_clients``). A run resumed with fewer
        clients keeps each silo's shard and shuffle (``run.resume_clients``).

        ``key`` names the files in errors (``data.eval_files`` for an eval set). ``holdout`` > 0
        (``data.eval_fraction``) sets aside ``held_out_indices`` of the shard: ``part="train"``
        keeps the rest, ``part="eval"`` exactly those."""
        silo = client_index if silo is None else silo
        shards = num_clients if shards is None else shards
        if not (0 <= client_index < num_clients and seq_len >= 2 and seed >= 0):
            raise ValueError("need 0 <= client_index < num_clients, seq_len >= 2, seed >= 0; got "
                             f"{client_index}, {num_clients}, {seq_len}, {seed}")
        if len(files) == num_clients:
            index, records = client_index, None
        elif len(files) == 1:
            index, records = 0, slice(silo, None, shards)
        else:
            raise DataError(f"{key}: got {len(files)} files for {num_clients} clients; "
                            f"give 1 (sharded round-robin) or {num_clients} (one per client)")
        label, path = f"{key}[{index}]", files[index]
        numbered = read_numbered_jsonl(path, label)
        shard = numbered[records] if records is not None else numbered
        if not shard:
            raise _locate(path, label, None, f"client {client_index} of {num_clients} gets no "
                          f"records (the file has {len(numbered)})")
        if holdout > 0:
            held = held_out_indices(len(shard), holdout, seed, silo)
            if len(held) >= len(shard):
                raise DataError(f"data.eval_fraction: client {client_index} has {len(shard)} training record(s) "
                                f"in {label} ({path}); holding out {len(held)} leaves none to train on")
            keep = set(held) if part == "eval" else set(range(len(shard))) - set(held)
            shard = [r for i, r in enumerate(shard) if i in keep]
        self.seed, self.client_index, self.silo = seed, client_index, silo
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
            else tokenizer.eos_token_id
        self.examples: list[Example] = []
        self.records: list[dict] = []  # the record of each example, in the same order (fedsea eval's references)
        self.truncated_sequences = self.truncated_tokens = self.dropped_examples = 0
        for line, record in shard:
            try:
                ex = encode_record(record, tokenizer, seq_len)
            except DataError as e:
                raise _locate(path, label, line, str(e)) from None
            self.truncated_sequences += ex.truncated_tokens > 0
            self.truncated_tokens += ex.truncated_tokens
            self.dropped_examples += ex.num_loss_tokens == 0
            self.examples += [ex] if ex.num_loss_tokens else []
            self.records += [record] if ex.num_loss_tokens else []
        if not self.examples:
            what = " held out by data.eval_fraction" if holdout > 0 and part == "eval" else ""
            raise _locate(path, label, None, f"client {client_index}: no record{what} keeps a loss "
                          f"token within seq_len={seq_len}")
        self.num_examples = len(self.examples)

    def eval_batches(self, micro_batch_size: int) -> list[Batch]:
        """Every example once, in file order, ``micro_batch_size`` per batch (the last may be
        smaller): an eval set's fixed pass."""
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        return [collate(self.examples[i:i + micro_batch_size], self.pad_id)
                for i in range(0, self.num_examples, micro_batch_size)]

    def steps_per_epoch(self, micro_batch_size: int) -> int:
        """Batches per epoch (the last one may be partial)."""
        return -(-self.num_examples // micro_batch_size)

    def batches(self, micro_batch_size: int, skip: int = 0) -> Iterator[Batch]:
        """Yield batches forever, epoch by epoch; each epoch visits every example exactly once.

        The order is a permutation drawn from ``numpy.random.default_rng([seed, silo, epoch])``
        (a private generator, so global RNG state is untouched and runs are reproducible). The last
        batch of an epoch holds the remainder, so ``B <= micro_batch_size``. ``skip``: start after
        that many batches (a resumed run: the same stream, without building the skipped batches).
        """
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        per_epoch = -(-self.num_examples // micro_batch_size)
        epoch, first = divmod(skip, per_epoch)
        while True:
            order = np.random.default_rng([self.seed, self.silo, epoch]).permutation(
                self.num_examples)
            for start in range(first * micro_batch_size, self.num_examples, micro_batch_size):
                yield collate([self.examples[i] for i in order[start:start + micro_batch_size]],
                              self.pad_id)
            epoch, first = epoch + 1, 0


# Mixed into the hold-out generator's seed so the held-out records do not follow the
# training shuffle's stream ([seed, silo, epoch]).
_HOLDOUT_STREAM = 0xE7A1


def held_out_indices(n: int, fraction: float, seed: int, silo: int) -> list[int]:
    """Which of a shard's ``n`` records ``data.eval_fraction`` holds out: ``ceil(fraction * n)``
    of them (at least 1), drawn by ``numpy.random.default_rng([seed, silo, _HOLDOUT_STREAM])``
    and returned sorted. The same for every run with the same seed, shard and fraction."""
    if not (0 < fraction <= 1 and n >= 1):
        raise ValueError(f"need 0 < fraction <= 1 and n >= 1, got {fraction}, {n}")
    k = max(1, math.ceil(fraction * n - 1e-9))
    return sorted(int(i) for i in np.random.default_rng([seed, silo, _HOLDOUT_STREAM]).permutation(n)[:k])


def client_datasets(data, index: int, clients: int, tokenizer, seq_len: int, seed: int,
                    silo: int | None = None, shards: int | None = None) -> tuple[ClientData, ClientData | None]:
    """One client's training set and eval set (None without one) from the ``data`` config section:
    ``data.eval_files`` (same per-client/sharded rules as the training files), else
    ``data.eval_fraction`` held out of the client's own training records."""
    args = (index, clients, tokenizer, seq_len, seed, silo, shards)
    if data.eval_files:
        return (ClientData(data.train_files, *args),
                ClientData(data.eval_files, *args, key="data.eval_files"))
    if data.eval_fraction > 0:
        return (ClientData(data.train_files, *args, holdout=data.eval_fraction),
                ClientData(data.train_files, *args, holdout=data.eval_fraction, part="eval"))
    return ClientData(data.train_files, *args), None
