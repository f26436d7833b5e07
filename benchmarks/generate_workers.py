"""Single-process workers that ``benchmarks/generate.py`` starts, one measurement each.

    python benchmarks/generate_workers.py centralized --model-dir D --prompts-file F --worker-out OUT.json ...
    python benchmarks/generate_workers.py breakdown --model-dir D --config C --prompts-file F --worker-out OUT.json ...

``centralized``: transformers ``generate`` on the unsplit model, every step time-stamped.
``breakdown``: the split's decode step timed piece by piece in one process (no wire).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def centralized_worker(args) -> int:
    """HF ``generate`` on the unsplit model; writes JSON to ``--worker-out``."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from fedsea_hpc.data.dataset import encode_prompt
    from fedsea_hpc.data.tokenizer import load_tokenizer
    from fedsea_hpc.model.loading import resolve_model

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    torch.manual_seed(0)
    model = resolve_model(args.model_dir, tiny_vocab_size=0, seed=0).build_model().to(getattr(torch, args.dtype))
    model.generation_config.eos_token_id = None  # only what we pass
    tok = load_tokenizer(args.model_dir)
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    class Stamp(LogitsProcessor):  # called once per step, right after that step's forward
        def __init__(self):
            self.t: list[float] = []

        def __call__(self, input_ids, scores):
            self.t.append(time.perf_counter())
            return scores

    records, batches = [], []
    with torch.no_grad():
        for i in range(0, len(prompts), args.batch_size):
            enc = [encode_prompt(p, tok) for p in prompts[i:i + args.batch_size]]
            t = max(map(len, enc))
            ids = torch.tensor([[pad] * (t - len(e)) + e for e in enc])
            mask = torch.tensor([[0] * (t - len(e)) + [1] * len(e) for e in enc])
            stamp = Stamp()
            t0 = time.perf_counter()
            gen = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=args.max_new_tokens,
                                 pad_token_id=pad, eos_token_id=tok.eos_token_id,
                                 logits_processor=LogitsProcessorList([stamp]))
            t1 = time.perf_counter()
            batches.append({"rows": len(enc), "prompt_len": t, "t_start": t0, "t_end": t1, "stamps": stamp.t})
            for row in gen[:, t:].tolist():
                if tok.eos_token_id in row:
                    row = row[:row.index(tok.eos_token_id) + 1]
                    records.append({"token_ids": row, "finish_reason": "eos"})
                else:
                    records.append({"token_ids": row, "finish_reason": "length"})
    wall = sum(b["t_end"] - b["t_start"] for b in batches)
    prompt_s = sum(b["stamps"][0] - b["t_start"] for b in batches)
    decode_s = sum(b["t_end"] - b["stamps"][0] for b in batches)
    steps = sum(len(b["stamps"]) - 1 for b in batches)
    new = sum(len(r["token_ids"]) for r in records)
    out = {"wall_s": wall, "new_tokens": new, "tokens_per_s": new / wall, "prompt_phase_s": prompt_s,
           "decode_phase_s": decode_s, "decode_steps": steps, "per_token_latency_s": decode_s / max(steps, 1),
           "torch_threads": torch.get_num_threads(),
           "step_times_s": [[b2 - b1 for b1, b2 in zip([b["t_start"]] + b["stamps"], b["stamps"])]
                            for b in batches],
           "records": records}
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


def breakdown_worker(args) -> int:
    """The split's decode step, compute only, in one process (no wire).

    Builds the client part (embed, head blocks, tail blocks, LM head) and the server part exactly as
    the CLI does and runs the client's ``_logits`` sequence with both caches, timing each piece per
    decode step: client A (embed, mask/positions, head blocks), server B (its own mask/positions and
    blocks: ``PartModel.forward``), client C (tail blocks, LM head, argmax). Their sum is the split's
    critical path without communication or process hand-offs.
    """
    import torch

    from fedsea_hpc.config import load_config
    from fedsea_hpc.data.dataset import encode_prompt
    from fedsea_hpc.data.tokenizer import load_tokenizer
    from fedsea_hpc.generate.decoding import new_cache
    from fedsea_hpc.model.loading import resolve_model
    from fedsea_hpc.model.partition import build_part, client_layers, server_layers

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    cfg = load_config(args.config, [f"model.name_or_path={args.model_dir}", "topology.clients=1",
                                    "topology.servers=1"])
    dtype = getattr(torch, args.dtype)
    source = resolve_model(args.model_dir, tiny_vocab_size=0, seed=0)
    n_layers = source.config.num_hidden_layers
    p, q = cfg.split_for(0)
    head_ids, tail_ids = list(range(p)), list(range(n_layers - q, n_layers))
    cpart = build_part(source, client_layers(n_layers, p, q), embed=True, head=True, dtype=dtype).eval()
    spart = build_part(source, server_layers(n_layers, [(p, q)]), embed=False, head=False, dtype=dtype)
    server = spart.eval()
    tok = load_tokenizer(args.model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    prompts = [json.loads(line)["prompt"] for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    enc = [encode_prompt(x, tok) for x in prompts[:args.batch_size]]
    t = max(map(len, enc))
    ids = torch.tensor([[pad] * (t - len(e)) + e for e in enc])
    n = torch.tensor([len(e) for e in enc])
    ccache, scache = new_cache(cpart.config), new_cache(spart.config)
    rows = []
    with torch.no_grad():
        for k in range(args.max_new_tokens):
            x, lengths, past = (ids, n, 0) if k == 0 else (nxt[:, None], n + k, t + k - 1)
            t0 = time.perf_counter()
            h = cpart.embed(x)
            ctx = cpart.context(h, lengths, "left", past=past, cache=ccache)
            h = cpart.run_layers(h, head_ids, ctx, cache=ccache)
            t1 = time.perf_counter()
            h = server(h, lengths, None, "left", past, scache)
            t2 = time.perf_counter()
            h = cpart.run_layers(h, tail_ids, ctx, cache=ccache)
            nxt = cpart.head_logits(h[:, -1:])[:, 0].float().argmax(-1)
            t3 = time.perf_counter()
            rows.append((t1 - t0, t2 - t1, t3 - t2))
    dec = rows[1:]
    mean = [sum(r[i] for r in dec) / max(len(dec), 1) for i in range(3)]
    out = {"torch_threads": torch.get_num_threads(), "head_layers": head_ids, "tail_layers": tail_ids,
           "server_layers": spart.layer_ids, "prompt_step_s": dict(zip(("client_a", "server_b", "client_c"), rows[0])),
           "decode_step_s": dict(zip(("client_a", "server_b", "client_c"), mean)),
           "decode_compute_s": sum(mean), "decode_steps": len(dec)}
    Path(args.worker_out).write_text(json.dumps(out))
    return 0


# ------------------------------------------------------------------ driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("worker", choices=["centralized", "breakdown"])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--config", default="configs/generate.yaml")
    ap.add_argument("--prompts-file", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--worker-out", required=True)
    args = ap.parse_args(argv)
    return centralized_worker(args) if args.worker == "centralized" else breakdown_worker(args)


if __name__ == "__main__":
    sys.exit(main())
