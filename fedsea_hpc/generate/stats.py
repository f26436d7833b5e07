"""The job-wide numbers of a generation run: counters summed over ranks, rank 0's summary."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from fedsea_hpc.components.links import noise_report
from fedsea_hpc.components.outputs import write_json
from fedsea_hpc.config import GenerateConfig, PrivacyConfig

# Summed over all ranks at the end (servers add zeros to the client counters and vice versa).
STAT_KEYS = ("sequences", "new_tokens", "prompt_tokens", "decode_steps", "bytes_prompt", "bytes_decode",
             "decode_row_tokens", "prompt_s", "decode_s", "server_forwards", "server_dummy_forwards")


def finish_stats(topo, device, stats: dict, wall: float, *, generate: GenerateConfig, privacy: PrivacyConfig,
                 output_dir: str) -> dict | None:
    """World all-reduce of the counters; rank 0 prints and writes ``output_dir/generate_summary.json``."""
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
        "clients": topo.clients, "servers": topo.servers, "kv_cache": generate.kv_cache,
        **noise_report(privacy, noise=generate.noise),
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
    write_json(os.path.join(output_dir, "generate_summary.json"), summary)
    return summary
