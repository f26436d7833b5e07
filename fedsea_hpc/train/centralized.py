"""``train.mode=centralized``: the unsplit HF model in one process, the reference for every claim.

Each step takes the micro-batch every client would take at that step (same data order), stacks
them into one batch in client order, and minimises the token-mean loss of that union: exactly
the objective the split modes optimise together.
"""
from __future__ import annotations

import os
import time

import torch

from fedsea_hpc.components import footprint
from fedsea_hpc.components.metrics import BYTE_KEYS, PHASES, MetricsLog
from fedsea_hpc.components.outputs import save_atomically, write_text_atomically
from fedsea_hpc.trace import OPTIM, STEP, TRACE, assemble, span, to_json
from fedsea_hpc.config import Config
from fedsea_hpc.data.dataset import concat_batches
from fedsea_hpc.model.adapters import save_adapter
from fedsea_hpc.model.lora import apply_lora, trainable
from fedsea_hpc.model.masks import lengths_to_mask
from fedsea_hpc.model.partition import loss_sum
from fedsea_hpc.train import evaluation


def train_centralized(cfg: Config, source, tokenizer, dtype: torch.dtype, data: list) -> dict:
    """``data``: every client's (training set, eval set or None), in client order
    (:func:`fedsea_hpc.components.setup.load_data`)."""
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.comm.backend != "gloo" else "cpu")
    model = source.build_model().to(device=device, dtype=dtype)
    model.config._attn_implementation = cfg.model.attn_implementation
    model = apply_lora(model, cfg.peft, cfg.run.seed)
    model.train()
    params = trainable(model)
    opt = torch.optim.AdamW([p for _, p in params], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    datas = [train for train, _ in data]
    eval_sets = [ev for _, ev in data if ev is not None]
    streams = [d.batches(cfg.train.micro_batch_size) for d in datas]
    log = MetricsLog(cfg.run, cfg.train, enabled=True)
    if cfg.run.trace:
        TRACE.begin(0, "centralized", torch.get_num_threads())
    t_start = time.perf_counter()
    for step in range(cfg.train.steps):
        t0, stamp = time.perf_counter(), TRACE.stamp()
        batch = concat_batches([next(s) for s in streams], tokenizer.pad_token_id).to(device)
        mask = lengths_to_mask(batch.lengths, batch.input_ids.shape[1], "right")
        with span("forward+loss+backward (whole model)"):
            logits = model(input_ids=batch.input_ids, attention_mask=mask).logits
            total = loss_sum(logits, batch.labels)
            (total / max(batch.num_loss_tokens, 1)).backward()
        t1 = time.perf_counter()
        with span("optimizer step (AdamW)", OPTIM):
            opt.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        TRACE.close(stamp, f"step {step + 1}", STEP, step=step + 1)
        times = dict.fromkeys(PHASES, 0.0)
        times["client_compute_s"], times["optim_s"] = t1 - t0, t2 - t1
        sums = torch.tensor([float(total.detach()), float(batch.num_loss_tokens), float(batch.input_ids.shape[0])]
                            + [0.0] * len(BYTE_KEYS), dtype=torch.float64)
        maxima = torch.tensor([t2 - t0] + [times[p] for p in PHASES], dtype=torch.float64)
        log.step(step, sums, maxima)
        if evaluation.due(cfg, step + 1):
            log.eval(evaluation.evaluate_centralized(model, eval_sets, cfg.train.micro_batch_size, device, step + 1))
    wall = time.perf_counter() - t_start
    save_atomically(os.path.join(cfg.run.output_dir, "adapters", "centralized"), lambda d: save_adapter(model, d))
    if cfg.run.trace:
        from fedsea_hpc.study.machine import machine_info

        path = os.path.join(cfg.run.output_dir, "trace.json")
        meta = {"job": "train", "config": cfg.to_dict(), "machine": machine_info()}
        write_text_atomically(path, to_json(assemble([TRACE.end()], meta)))
        print(f"trace: {path} (open in https://ui.perfetto.dev or chrome://tracing)", flush=True)
    return log.finish(wall, extra={"truncated_sequences": sum(d.truncated_sequences for d in datas),
                                   "truncated_tokens": sum(d.truncated_tokens for d in datas)}
                            | footprint.local_report(device, footprint.part_bytes(model, params, opt)))
