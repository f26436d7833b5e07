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
import torch.distributed as dist

from fedsea_hpc.config import Config
from fedsea_hpc.distributed.env import store_barrier
from fedsea_hpc.engine.generate import load_adapter, new_cache, next_tokens, run_cached, step_context
from fedsea_hpc.engine.outputs import write_json, write_text_atomically
from fedsea_hpc.model.partition import build_part, client_layers
from fedsea_hpc.privacy.noise import PrivateSender
from fedsea_hpc.transport.p2p import ByteCounter, Channel

# Summed over all ranks at the end (servers add zeros).
STAT_KEYS = ("sequences", "new_tokens", "prompt_tokens", "decode_steps", "bytes_prompt", "bytes_decode",
             "decode_row_tokens", "prompt_s", "decode_s", "server_forwards", "server_dummy_forwards")


class GenClient:
    def __init__(self, cfg: Config, topo, source, tokenizer, dtype: torch.dtype, device: torch.device):
        self.cfg, self.g, self.device, self.tok = cfg, cfg.generate, device, tokenizer
        self.index = topo.client_index
        n_layers = source.config.num_hidden_layers
        p, q = cfg.split_for(self.index)
        self.head_ids, self.tail_ids = list(range(p)), list(range(n_layers - q, n_layers))
        self.part = build_part(source, client_layers(n_layers, p, q), embed=True, head=True, dtype=dtype).to(device)
        adapter = os.path.join(self.g.adapters_dir, f"client{self.index}") if self.g.adapters_dir else None
        self.model = load_adapter(self.part, adapter).eval()
        self.counter = ByteCounter()
        channel = Channel(topo.server_of(self.index), counter=self.counter,
                          max_bytes=int(cfg.comm.max_message_mb * 2**20), timeout_s=cfg.comm.timeout_s, device=device)
        noise_gen = torch.Generator(device=device).manual_seed(cfg.run.seed * 1_000_003 + 7919 * (self.index + 1))
        self.link = PrivateSender(channel, noise_std=cfg.privacy.noise_std if self.g.noise else 0.0,
                                  generator=noise_gen)
        self.sampler = torch.Generator().manual_seed(self.g.seed + self.index)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.hidden = source.config.hidden_size
        self.s = 0  # exchange counter shared with the server (header step)
        self.stats = dict.fromkeys(STAT_KEYS, 0.0)

    def _exchange(self, h: torch.Tensor) -> torch.Tensor:
        self.link.send_activation(h, self.s)
        out = self.link.recv_activation(self.s)
        self.s += 1
        return out.to(h.dtype)

    def _logits(self, ids: torch.Tensor, lengths: torch.Tensor, past: int, cache) -> torch.Tensor:
        """A → server → C for new tokens ``ids`` [B, q]; returns the last position's logits [B, V]."""
        h = self.part.embed(ids)
        ctx = step_context(self.part, h, lengths, past, cache, self.head_ids[0])  # before any cache update
        h_b = self._exchange(run_cached(self.part, h, self.head_ids, ctx, cache))
        out = run_cached(self.part, h_b, self.tail_ids, ctx, cache)
        return self.part.head_logits(out[:, -1:])[:, 0]

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
        cache = new_cache(self.part) if g.kv_cache else None
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


def run_client(cfg: Config, topo, source, tokenizer, prompts, dtype, device) -> dict | None:
    worker = GenClient(cfg, topo, source, tokenizer, dtype, device)
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
    return finish_stats(cfg, topo, device, worker.stats, wall)


def finish_stats(cfg: Config, topo, device, stats: dict, wall: float) -> dict | None:
    """World all-reduce of the counters; rank 0 prints and writes ``generate_summary.json``."""
    sums = torch.tensor([stats[k] for k in STAT_KEYS], dtype=torch.float64, device=device)
    dist.all_reduce(sums)
    w = torch.tensor([wall], dtype=torch.float64, device=device)
    dist.all_reduce(w, op=dist.ReduceOp.MAX)
    dist.barrier()
    if topo.rank != 0:
        return None
    s = dict(zip(STAT_KEYS, sums.tolist()))
    wall = float(w)
    new = max(s["new_tokens"], 1.0)
    summary = {
        "clients": topo.clients, "servers": topo.servers, "kv_cache": cfg.generate.kv_cache,
        "noise_std": cfg.privacy.noise_std if cfg.generate.noise else 0.0,
        "sequences": int(s["sequences"]), "prompt_tokens": int(s["prompt_tokens"]), "new_tokens": int(s["new_tokens"]),
        "wall_s": wall, "tokens_per_s": s["new_tokens"] / wall if wall > 0 else 0.0,
        # Mean wall time of one decode step of a client batch (every row gets one token per step).
        "per_token_latency_s": s["decode_s"] / max(s["decode_steps"], 1.0),
        "prompt_phase_s": s["prompt_s"], "decode_phase_s": s["decode_s"],
        "bytes_total": int(s["bytes_prompt"] + s["bytes_decode"]),
        "bytes_per_new_token": (s["bytes_prompt"] + s["bytes_decode"]) / new,
        # Both directions, headers included, per token of one sequence in the decode phase:
        # with the KV cache this is about 2·H·itemsize + headers/B, independent of the length.
        "decode_bytes_per_token_per_sequence": s["bytes_decode"] / max(s["decode_row_tokens"], 1.0),
        # Forward calls summed over server ranks; dummy ones kept ZeRO-3 in step on an idle rank.
        "server_forwards": int(s["server_forwards"]), "server_dummy_forwards": int(s["server_dummy_forwards"]),
    }
    print(f"fedsea generate: {summary['sequences']} sequences, {summary['new_tokens']} new tokens in "
          f"{wall:.2f} s ({summary['tokens_per_s']:.1f} tok/s), {summary['per_token_latency_s'] * 1e3:.1f} ms per "
          f"decode step, {summary['decode_bytes_per_token_per_sequence']:.0f} B/token/sequence on the wire", flush=True)
    write_json(os.path.join(cfg.run.output_dir, "generate_summary.json"), summary)
    return summary
