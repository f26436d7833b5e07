"""``fedsea eval``: score a model (the base model, or a training run's adapters) on every client's
eval set, under the same split and on the same ranks as training.

Each client's eval set is what training held out (``data.eval_files`` / ``data.eval_fraction``
with the training run's config: the same records). Two passes per client, both over the
generation protocol (:mod:`fedsea_hpc.generate`), so Part B runs on the server ranks with its
adapters and ZeRO stage, and the eval data never leaves its client:

1. **Loss**: every eval example's whole sequence crosses once (as a prompt would), Part C takes
   the loss of every learned token: ``eval_loss`` (token-weighted) and ``eval_ppl = exp``.
2. **Generation** (``eval.generate``, default on): for each record with a reference (a
   ``{"prompt", "response"}`` record, or a chat whose last turn is the assistant's) the model
   answers the prompt (``generate.*``: greedy by default), scored against the reference by exact
   match and ROUGE-L F1 (:mod:`fedsea_hpc.evaluate.scores`).

Noise on the hidden states a client sends only with ``privacy.noise_in_eval``. Rank 0 writes
``run.output_dir/eval_summary.json`` (per client and overall); each client writes its own answers
to ``eval_predictions-client<i>.jsonl``.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist

from fedsea_hpc.components.outputs import write_json, write_text_atomically
from fedsea_hpc.config import validate_eval
from fedsea_hpc.distributed.env import store_barrier
from fedsea_hpc.distributed.topology import Role
from fedsea_hpc.evaluate.scores import exact_match, rouge_l, scorable

# Per client, summed over the world at the end.
FIELDS = ("loss_sum", "tokens", "samples", "scored", "exact", "rouge_l", "new_tokens", "skipped")
NORMALIZATION = "Unicode NFKC, case folded, whitespace runs made one space, stripped"


def check_inputs(job) -> None:
    """Every rank, before any communication: an eval set, the adapters (of this model, at the
    partition they were saved at). Generation then runs with eval.adapters_dir and noise only
    under privacy.noise_in_eval."""
    from fedsea_hpc.generate.run import follow_adapters

    cfg = job.cfg
    validate_eval(cfg)
    follow_adapters(job, cfg.eval.adapters_dir, "eval.adapters_dir")
    cfg.generate = dataclasses.replace(cfg.generate, adapters_dir=cfg.eval.adapters_dir,
                                       noise=bool(cfg.privacy.noise_in_eval))


def eval_split(job, devices) -> dict | None:
    """This rank's part of the job; rank 0 returns (and writes) the summary."""
    cfg, topo = job.cfg, job.topo
    mine = torch.zeros(len(FIELDS), dtype=torch.float64)
    t0 = time.perf_counter()
    if topo.role is Role.CLIENT:
        mine, phases = _client(job, devices)
    else:
        _server(job, devices)
        phases = {"loss_s": 0.0, "generate_s": 0.0}
    table = torch.zeros(topo.clients, len(FIELDS) + 2, dtype=torch.float64, device=devices.wire)
    if topo.role is Role.CLIENT:
        table[topo.client_index] = torch.cat([mine, torch.tensor([phases["loss_s"], phases["generate_s"]],
                                                                 dtype=torch.float64)]).to(devices.wire)
    dist.all_reduce(table)
    wall = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=devices.wire)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX)
    dist.barrier()
    if topo.rank != 0:
        return None
    summary = _summary(cfg, topo, table.cpu().tolist(), float(wall))
    write_json(os.path.join(cfg.run.output_dir, "eval_summary.json"), summary)
    o = summary["overall"]
    scored = "" if o["scored"] == 0 else (f", exact match {o['exact_match']:.3f}, ROUGE-L F1 {o['rouge_l_f1']:.3f} "
                                           f"over {o['scored']} generated answers")
    print(f"fedsea eval: loss {o['eval_loss']:.4f} (ppl {o['eval_ppl']:.2f}) over {o['eval_tokens']} tokens"
          f"{scored}; {summary['wall_s']:.1f} s; {os.path.join(cfg.run.output_dir, 'eval_summary.json')}", flush=True)
    return summary


def _client(job, devices) -> tuple[torch.Tensor, dict]:
    from fedsea_hpc.generate.client import GenClient

    cfg, topo, g = job.cfg, job.topo, job.cfg.generate
    _, eval_set = job.data
    worker = GenClient(topo, job.source, job.tokenizer, job.dtype, devices.compute, devices.wire,
                       split=cfg.split_for(topo.client_index), generate=g, privacy=cfg.privacy, comm=cfg.comm)
    items = scorable(eval_set.records, job.tokenizer) if cfg.eval.generate else []
    room = job.source.config.max_position_embeddings - g.max_new_tokens
    fits = [x for x in items if 0 < len(x.prompt.ids) <= room]  # a prompt with no token, or no room, is skipped
    skipped = len(items) - len(fits)
    items = fits[:cfg.eval.max_records] if cfg.eval.max_records else fits
    store_barrier("fedsea/eval-parts-ready", topo.world_size, cfg.comm.startup_timeout_s)
    v = dict.fromkeys(FIELDS, 0.0)
    t0 = time.perf_counter()
    answers = []
    with torch.no_grad():
        for batch in eval_set.eval_batches(g.batch_size):
            v["loss_sum"] += worker.score_batch(batch)
            v["tokens"] += batch.num_loss_tokens
            v["samples"] += batch.input_ids.shape[0]
        t1 = time.perf_counter()
        for i in range(0, len(items), g.batch_size):
            answers += worker.run_batch([x.prompt for x in items[i:i + g.batch_size]])
        worker.link.send_control(torch.tensor([0], dtype=torch.long), worker.s)  # done: no more batches
    t2 = time.perf_counter()
    rows = []
    for x, a in zip(items, answers):
        em, rl = exact_match(a["completion"], x.reference), rouge_l(a["completion"], x.reference)
        v["exact"] += em
        v["rouge_l"] += rl
        v["new_tokens"] += len(a["token_ids"])
        rows.append({"prompt": x.prompt.text, "reference": x.reference, "completion": a["completion"],
                     "finish_reason": a["finish_reason"], "exact_match": em, "rouge_l_f1": rl})
    v["scored"], v["skipped"] = len(items), skipped
    if cfg.eval.generate:  # the answers stay with their client, like its data
        path = os.path.join(cfg.run.output_dir, f"eval_predictions-client{topo.client_index}.jsonl")
        write_text_atomically(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return torch.tensor([v[k] for k in FIELDS], dtype=torch.float64), {"loss_s": t1 - t0, "generate_s": t2 - t1}


def _server(job, devices) -> None:
    from fedsea_hpc.generate.server import GenServer

    cfg, topo = job.cfg, job.topo
    worker = GenServer(topo, job.source, job.dtype, devices.compute, devices.wire, splits=cfg.splits(),
                       generate=cfg.generate, deepspeed=cfg.deepspeed, comm=cfg.comm)
    store_barrier("fedsea/eval-parts-ready", topo.world_size, cfg.comm.startup_timeout_s)
    with torch.no_grad():
        while worker.tick():
            pass


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _scores(v: dict) -> dict:
    """Loss and generation scores of one client (or of all: the sums)."""
    loss = v["loss_sum"] / max(v["tokens"], 1.0)
    scored = int(v["scored"])
    return {"eval_loss": loss, "eval_ppl": _ppl(loss), "eval_tokens": int(v["tokens"]),
            "eval_samples": int(v["samples"]), "scored": scored,
            "exact_match": v["exact"] / scored if scored else None,
            "rouge_l_f1": v["rouge_l"] / scored if scored else None,
            "skipped_prompts": int(v["skipped"]), "new_tokens": int(v["new_tokens"])}


def _summary(cfg, topo, table: list[list[float]], wall: float) -> dict:
    per = [dict(zip(FIELDS, row[:len(FIELDS)])) for row in table]
    total = {k: sum(p[k] for p in per) for k in FIELDS}
    g = cfg.generate
    return {
        "job": "eval", "model": cfg.model.name_or_path, "adapters_dir": cfg.eval.adapters_dir or None,
        "clients": topo.clients, "servers": topo.servers, "splits": [list(x) for x in cfg.splits()],
        "eval_set": {"eval_files": cfg.data.eval_files, "eval_fraction": cfg.data.eval_fraction, "seed": cfg.run.seed},
        "noise": bool(cfg.privacy.noise_in_eval),
        "generation": None if not cfg.eval.generate else {
            "max_new_tokens": g.max_new_tokens, "temperature": g.temperature, "top_k": g.top_k, "top_p": g.top_p,
            "stop": g.stop, "batch_size": g.batch_size, "kv_cache": g.kv_cache, "max_records": cfg.eval.max_records,
            "exact_match_normalization": NORMALIZATION, "rouge": "rouge-score ROUGE-L F1, no stemming"},
        "overall": _scores(total),  # loss token-weighted; exact match and ROUGE-L averaged over scored records
        "per_client": [{"client": c, **_scores(p), "loss_s": round(table[c][len(FIELDS)], 4),
                        "generate_s": round(table[c][len(FIELDS) + 1], 4)} for c, p in enumerate(per)],
        "wall_s": wall,
    }
