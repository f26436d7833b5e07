"""A client rank during generation: Part A + Part C, its own KV cache, sampling, outputs.

Protocol with its server, per batch (``s`` = this client's exchange counter, the header step)::

    CONTROL [B] (B > 0), LENGTHS [B], ACTIVATION h_A [B, T, H]  →   ← ACTIVATION h_B [B, T, H]
    then per new token:  ACTIVATION [B, 1, H]                   →   ← ACTIVATION [B, 1, H]
    (kv_cache=false:     ACTIVATION [B, T+k, H]                 →   ← ACTIVATION [B, T+k, H])
    batch end:           ACTIVATION [0, 1, H] (header only)     →
    no more prompts:     CONTROL [0]                            →

Rows that finished keep being fed the pad token until the whole batch is done, exactly as HF
``generate`` does; rows never attend to each other, so this changes nothing for the others.
"""
from __future__ import annotations

import json
import os
import time

import torch

from fedsea_hpc.components.links import client_link
from fedsea_hpc.components.outputs import write_text_atomically
from fedsea_hpc.config import CommConfig, Config, GenerateConfig, PrivacyConfig
from fedsea_hpc.data.dataset import IGNORE_INDEX
from fedsea_hpc.distributed.env import store_barrier
from fedsea_hpc.generate.decoding import new_cache, next_tokens
from fedsea_hpc.generate.stats import STAT_KEYS, finish_stats
from fedsea_hpc.model.adapters import load_adapter, part_dir
from fedsea_hpc.model.partition import build_part, client_layers, loss_sum
from fedsea_hpc.transport.p2p import ByteCounter
from fedsea_hpc.transport.wire import Expect


class GenClient:
    """Parts A and C of one client with their KV cache; ``split`` is this client's (p, q)."""

    def __init__(self, topo, source, tokenizer, dtype: torch.dtype, device: torch.device, wire: torch.device, *,
                 split: tuple[int, int], generate: GenerateConfig, privacy: PrivacyConfig, comm: CommConfig):
        self.g, self.device, self.tok = generate, device, tokenizer
        self.index = topo.client_index
        n_layers = source.config.num_hidden_layers
        p, q = split
        self.head_ids, self.tail_ids = list(range(p)), list(range(n_layers - q, n_layers))
        self.part = build_part(source, client_layers(n_layers, p, q), embed=True, head=True, dtype=dtype).to(device)
        self.model = load_adapter(self.part, part_dir(self.g.adapters_dir, f"client{self.index}")).eval()
        self.counter = ByteCounter()
        self.link = client_link(topo, comm, privacy, self.counter, wire, noise=self.g.noise, noise_device=device)
        self.sampler = torch.Generator().manual_seed(self.g.seed + self.index)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.hidden = source.config.hidden_size
        self.s = 0  # exchange counter shared with the server (header step)
        self.stats = dict.fromkeys(STAT_KEYS, 0.0)

    def _exchange(self, h: torch.Tensor) -> torch.Tensor:
        self.link.send_activation(h, self.s)
        out = self.link.recv_activation(self.s, Expect(h.dtype, tuple(h.shape)))  # Part B keeps the shape
        self.s += 1
        return out.to(device=h.device, dtype=h.dtype)  # off the wire device

    def _logits(self, ids: torch.Tensor, lengths: torch.Tensor, past: int, cache) -> torch.Tensor:
        """A → server → C for new tokens ``ids`` [B, q]; returns the last position's logits [B, V]."""
        h = self.part.embed(ids)
        ctx = self.part.context(h, lengths, "left", past=past, cache=cache)  # before any cache update
        h_b = self._exchange(self.part.run_layers(h, self.head_ids, ctx, cache=cache))
        out = self.part.run_layers(h_b, self.tail_ids, ctx, cache=cache)
        return self.part.head_logits(out[:, -1:])[:, 0]

    def score_batch(self, batch) -> float:
        """The loss sum of a training-style ``Batch`` (right-padded ids and labels) through the
        same protocol as a prompt: CONTROL, LENGTHS, one exchange of the whole (left-padded)
        sequences, then the batch end; C computes every position's logits (``fedsea eval``)."""
        dev, b = self.device, batch.input_ids.shape[0]
        n = batch.lengths.to(dev)
        t = int(n.max())
        ids = torch.full((b, t), self.pad_id, dtype=torch.long, device=dev)
        labels = torch.full((b, t), IGNORE_INDEX, dtype=torch.long, device=dev)
        for r in range(b):  # left padding, as for a prompt
            k = int(n[r])
            ids[r, t - k:], labels[r, t - k:] = batch.input_ids[r, :k], batch.labels[r, :k]
        self.link.send_control(torch.tensor([b], dtype=torch.long), self.s)
        self.link.send_lengths(n, self.s)
        h = self.part.embed(ids)
        ctx = self.part.context(h, n, "left", past=0, cache=None)
        h_b = self._exchange(self.part.run_layers(h, self.head_ids, ctx))
        total = loss_sum(self.part.head_logits(self.part.run_layers(h_b, self.tail_ids, ctx)), labels)
        self.link.send_activation(torch.zeros(0, 1, self.hidden, dtype=h.dtype, device=dev), self.s)  # batch end
        self.s += 1
        return float(total)

    def run_batch(self, prompts) -> list[dict]:
        g, dev = self.g, self.device
        b = len(prompts)
        n = torch.tensor([len(p.ids) for p in prompts], dtype=torch.long, device=dev)
        t = int(n.max())
        ids = torch.full((b, t), self.pad_id, dtype=torch.long, device=dev)
        for r, p in enumerate(prompts):  # left padding, as for HF generate
            ids[r, t - len(p.ids):] = torch.tensor(p.ids, device=dev)
        t0 = time.perf_counter()
        before = self.counter.sent_total() + self.counter.recv_total()
        self.link.send_control(torch.tensor([b], dtype=torch.long), self.s)
        self.link.send_lengths(n, self.s)
        cache = new_cache(self.part.config) if g.kv_cache else None
        logits = self._logits(ids, n, 0, cache)
        t1 = time.perf_counter()
        mid = self.counter.sent_total() + self.counter.recv_total()
        gen = [[] for _ in range(b)]
        reason: list[str | None] = [None] * b
        cut: list[int | None] = [None] * b
        seq, k = ids, 0
        while True:
            tok = next_tokens(logits, g, self.sampler)
            live = torch.tensor([x is None for x in reason], device=dev)
            fed = torch.where(live, tok, torch.full_like(tok, self.pad_id))  # HF feeds pad to finished rows
            k += 1
            for r in range(b):
                if reason[r] is None:
                    self._extend(r, int(tok[r]), gen, reason, cut, k)
            if all(x is not None for x in reason):
                break
            seq = torch.cat([seq, fed[:, None]], dim=1)
            if g.kv_cache:
                logits = self._logits(fed[:, None], n + k, t + k - 1, cache)
            else:  # baseline: the whole sequence again, no cache on either side
                logits = self._logits(seq, n + k, 0, None)
            self.stats["decode_steps"] += 1
            self.stats["decode_row_tokens"] += b
        self.link.send_activation(torch.zeros(0, 1, self.hidden, dtype=self.part.model.embed_tokens.weight.dtype,
                                              device=dev), self.s)  # batch end (header only)
        self.s += 1
        del cache  # this batch's keys/values are freed here
        t2 = time.perf_counter()
        after = self.counter.sent_total() + self.counter.recv_total()
        st = self.stats
        st["sequences"] += b
        st["prompt_tokens"] += int(n.sum())
        st["new_tokens"] += sum(len(x) for x in gen)
        st["bytes_prompt"] += mid - before
        st["bytes_decode"] += after - mid
        st["prompt_s"] += t1 - t0
        st["decode_s"] += t2 - t1
        return [self._record(p, gen[r], reason[r], cut[r]) for r, p in enumerate(prompts)]

    def _extend(self, r: int, tok: int, gen, reason, cut, k: int) -> None:
        gen[r].append(tok)
        if tok == self.eos_id:
            reason[r] = "eos"
            return
        if self.g.stop:
            text = self.tok.decode(gen[r], skip_special_tokens=True)
            hits = [text.find(s) for s in self.g.stop if s in text]
            if hits:
                reason[r], cut[r] = "stop", min(hits)
                return
        if k >= self.g.max_new_tokens:
            reason[r] = "length"

    def _record(self, prompt, ids: list[int], reason: str, cut: int | None) -> dict:
        text = self.tok.decode(ids, skip_special_tokens=True)
        if cut is not None:
            text = text[:cut]
        return {"prompt": prompt.text, "completion": text, "token_ids": ids, "finish_reason": reason}


def run_client(cfg: Config, topo, source, tokenizer, prompts, dtype, devices) -> dict | None:
    worker = GenClient(topo, source, tokenizer, dtype, devices.compute, devices.wire,
                       split=cfg.split_for(topo.client_index), generate=cfg.generate, privacy=cfg.privacy, comm=cfg.comm)
    bs = cfg.generate.batch_size
    # every part is built: start the clock together
    store_barrier("fedsea/gen-parts-ready", topo.world_size, cfg.comm.startup_timeout_s)
    t0 = time.perf_counter()
    records = []
    with torch.no_grad():
        for i in range(0, len(prompts), bs):
            records += worker.run_batch(prompts[i:i + bs])
        worker.link.send_control(torch.tensor([0], dtype=torch.long), worker.s)  # done: no more prompts
    wall = time.perf_counter() - t0
    path = os.path.join(cfg.run.output_dir, f"generations-client{worker.index}.jsonl")
    write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return finish_stats(topo, devices.wire, worker.stats, wall, generate=cfg.generate, privacy=cfg.privacy,
                        output_dir=cfg.run.output_dir)
