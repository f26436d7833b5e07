"""``train.mode=local``: the silo-alone baseline, "what if each client trained by itself?".

Every client trains its own full copy of the model (the same initial weights and adapters as the
federated run starts from) on its own training data only: no server, no federation, no wire. It
runs in one process, like ``centralized``: client c's step takes the micro-batch client c would
take at that step in the split modes (same data order) and minimises the token mean of its own
loss; the models step together, so a metrics row is one step of every client (``loss`` the
token-weighted mean over them, ``client_loss`` each one's). Eval passes score every client's
model on every client's eval set (:func:`fedsea_hpc.train.evaluation.evaluate_local`), so the
question "does federating help?" is ``eval_loss`` here against a federated run's.
"""
from __future__ import annotations

import os
import time

import torch

from fedsea_hpc.components import footprint
from fedsea_hpc.components.metrics import BYTE_KEYS, PHASES, MetricsLog
from fedsea_hpc.components.outputs import save_atomically
from fedsea_hpc.config import Config
from fedsea_hpc.model.adapters import save_adapter
from fedsea_hpc.model.lora import apply_lora, trainable
from fedsea_hpc.model.masks import lengths_to_mask
from fedsea_hpc.model.partition import loss_sum
from fedsea_hpc.train import evaluation


def train_local(cfg: Config, source, tokenizer, dtype: torch.dtype, data: list) -> dict:
    """``data``: every client's (training set, eval set or None), in client order."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.comm.backend != "gloo" else "cpu")
    if cfg.run.trace:
        print("fedsea: warning: run.trace: not recorded in train.mode=local", flush=True)
    models, opts, params = [], [], []
    for _ in data:
        model = source.build_model().to(device=device, dtype=dtype)
        model.config._attn_implementation = cfg.model.attn_implementation
        model = apply_lora(model, cfg.peft, cfg.run.seed)  # every silo starts where the federation does
        model.train()
        named = trainable(model)
        models.append(model)
        params.append(named)
        opts.append(torch.optim.AdamW([p for _, p in named], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay))
    streams = [train.batches(cfg.train.micro_batch_size) for train, _ in data]
    eval_sets = [ev for _, ev in data if ev is not None]
    log = MetricsLog(cfg.run, cfg.train, enabled=True)
    t_start = time.perf_counter()
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        times = dict.fromkeys(PHASES, 0.0)
        loss_c, tok_c, samples = [], [], 0
        for model, opt, stream in zip(models, opts, streams):
            t1 = time.perf_counter()
            batch = next(stream).to(device)
            mask = lengths_to_mask(batch.lengths, batch.input_ids.shape[1], "right")
            total = loss_sum(model(input_ids=batch.input_ids, attention_mask=mask).logits, batch.labels)
            (total / max(batch.num_loss_tokens, 1)).backward()  # this silo's own token mean
            t2 = time.perf_counter()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times["client_compute_s"] += t2 - t1
            times["optim_s"] += time.perf_counter() - t2
            loss_c.append(float(total.detach()))
            tok_c.append(batch.num_loss_tokens)
            samples += batch.input_ids.shape[0]
        sums = torch.tensor([sum(loss_c), float(sum(tok_c)), float(samples)] + [0.0] * len(BYTE_KEYS),
                            dtype=torch.float64)
        maxima = torch.tensor([time.perf_counter() - t0] + [times[p] for p in PHASES], dtype=torch.float64)
        log.step(step, sums, maxima, extra={"client_loss": [ls / max(t, 1) for ls, t in zip(loss_c, tok_c)]})
        if evaluation.due(cfg, step + 1):
            log.eval(evaluation.evaluate_local(models, eval_sets, cfg.train.micro_batch_size, device, step + 1))
    wall = time.perf_counter() - t_start
    for c, model in enumerate(models):
        save_atomically(os.path.join(cfg.run.output_dir, "adapters", f"local{c}"), lambda d, m=model: save_adapter(m, d))
    parts = {f"local{c}": footprint.part_bytes(m, p, o) for c, (m, p, o) in enumerate(zip(models, params, opts))}
    return log.finish(wall, extra={"truncated_sequences": sum(t.truncated_sequences for t, _ in data),
                                   "truncated_tokens": sum(t.truncated_tokens for t, _ in data)}
                            | footprint.local_report(device, parts, role="local"))
