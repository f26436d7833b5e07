"""Memory per role: a client's peak against the centralized peak (SmolLM2-135M, p = q = 2).

Runs the real CLI twice on the same data: ``train.mode=centralized`` (one process, the whole
model) and ``train.mode=parallel`` under ``mpiexec -n clients+servers``; both record
``summary.json["memory"]`` (peak RSS per rank on CPU, ``cuda.max_memory_allocated`` on GPU, and
the bytes of parameters / trainable tensors / optimizer state per part). Reported:

* the **measured peak** ratio, client / centralized (the paper's 28.2 GB -> 3.4 GB on Llama-2-7B
  is 12 %; target here <= 15 %);
* the same ratio **above the import baseline**: a rank's RSS includes the interpreter, torch,
  transformers (and DeepSpeed on a server), measured here as the peak RSS of a process that only
  imports what a rank imports; on a 135M model that baseline is a large share of every peak;
* the **model's share** from the parts' own bytes (parameters + optimizer state), client / centralized;
* a **projection** (no run: parameter counts of the model config on the meta device, through the
  same ``part_keys`` the loader uses) of the client's share of the parameters for SmolLM2-135M and
  Llama-2-7B at p = q = 2 and p = q = 1. Labelled PROJECTION wherever it is shown.

    python benchmarks/memory.py --out benchmarks/results/memory.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, SMOLLM2_DIR, machine_info, run_cmd, tail  # noqa: E402
from _common import ensure_smollm2 as _ensure_smollm2  # noqa: E402
from _common import mpiexec as _mpiexec  # noqa: E402

GIB = 2**30
# Llama-2-7B's published architecture (config.json of meta-llama/Llama-2-7b-hf).
LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False)
BASELINE_IMPORTS = {
    "client": "import fedsea_hpc.cli, fedsea_hpc.train.loop",
    "server": "import fedsea_hpc.cli, fedsea_hpc.train.loop, deepspeed",
}


def import_baseline(what: str) -> int:
    """Peak RSS (bytes) of a fresh interpreter that only imports what a rank of role ``what`` imports."""
    code = f"{BASELINE_IMPORTS[what]}\nimport resource\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1]) * 1024


def client_share(config_kwargs: dict | None, config_dir: str | None, p: int, q: int) -> dict:
    """PROJECTION: parameters of Part A + C (embedding, p + q blocks, norm, head) / all parameters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedsea_hpc.model.partition import client_layers, part_keys

    cfg = LlamaConfig(**config_kwargs) if config_kwargs else LlamaConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    sizes = {n: t.numel() for n, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sizes.pop("lm_head.weight", None)  # one tensor, counted once
    keys = part_keys(cfg, client_layers(cfg.num_hidden_layers, p, q), embed=True, head=True, all_keys=sizes)
    client = sum(sizes[k] for k in keys)
    total = sum(sizes.values())
    return {"p": p, "q": q, "client_params": client, "total_params": total, "client_fraction": client / total}


def run_mode(mode: str, common: list[str], world: int, root: Path, timeout: float) -> dict:
    odir = root / mode
    odir.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "fedsea_hpc", "train", *common, f"train.mode={mode}", f"run.output_dir={odir}"]
    cmd = base if mode == "centralized" else [_mpiexec(), "-n", str(world), *base]
    print(f"[{mode}] {' '.join(cmd)}", flush=True)
    rc, elapsed, _, _ = run_cmd(cmd, dict(os.environ), timeout, odir / "log.txt")
    if rc != 0:
        raise RuntimeError(f"{mode} exited {rc} after {elapsed:.0f}s; log tail:\n{tail(odir / 'log.txt')}")
    summary = json.loads((odir / "summary.json").read_text())
    return {"command": cmd, "process_wall_s": elapsed, "memory": summary["memory"],
            "final_loss": summary["final_loss"]}


def model_bytes(part: dict) -> int:
    """What the model itself holds in a part: its parameters and the optimizer state."""
    return part["parameters"] + part["optimizer"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--split", type=int, default=2, help="p = q: blocks at each end of the client")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--out", default="benchmarks/results/memory.json")
    args = ap.parse_args(argv)
    _ensure_smollm2()
    common = [f"model.name_or_path={SMOLLM2_DIR}", f"split.head_layers={args.split}",
              f"split.tail_layers={args.split}", f"train.steps={args.steps}", "train.seq_len=128",
              "train.micro_batch_size=4", f"topology.clients={args.clients}",
              f"topology.servers={args.servers}", "run.progress=false"]
    with tempfile.TemporaryDirectory(prefix="fedsea_mem_") as tmp:
        runs = {m: run_mode(m, common, args.clients + args.servers, Path(tmp), args.timeout)
                for m in ("centralized", "parallel")}
    c_mem, p_mem = runs["centralized"]["memory"], runs["parallel"]["memory"]
    base = {role: import_baseline(role) for role in BASELINE_IMPORTS}
    central = c_mem["peak_bytes"]["centralized"]
    client = p_mem["peak_bytes"]["client"]
    server = p_mem["peak_bytes"].get("server", 0)
    client_model = max(model_bytes(v) for k, v in p_mem["parts"].items() if k.startswith("client"))
    central_model = model_bytes(c_mem["parts"]["centralized"])
    result = {
        "measure": p_mem["measure"],
        "peak_bytes": {"centralized": central, "client": client, "server": server},
        "import_baseline_bytes": base,
        "client_over_centralized_peak": client / central,
        "client_over_centralized_above_baseline": (client - base["client"]) / (central - base["client"]),
        "model_bytes": {"centralized": central_model, "client": client_model},
        "client_over_centralized_model_bytes": client_model / central_model,
        "target": 0.15,
        "paper": {"model": "Llama-2-7B", "centralized_gb": 28.2, "client_gb": 3.4, "ratio": 3.4 / 28.2},
    }
    projection = {
        "label": "PROJECTION (parameter counts from the config on the meta device; nothing run)",
        "smollm2-135m": [client_share(None, str(REPO / SMOLLM2_DIR), s, s) for s in (2, 1)],
        "llama-2-7b": [client_share(LLAMA2_7B, None, s, s) for s in (2, 1)],
    }
    doc = {"benchmark": "memory", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine_info(),
           "config": common, "runs": runs, "result": result, "projection": projection}
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    r = result
    print()
    print(f"| SmolLM2-135M, p=q={args.split}, {args.clients} clients + {args.servers} server | centralized | client "
          "| client / centralized (target <= 15 %) |")
    print("|---|---:|---:|---:|")
    print(f"| measured peak {r['measure']} (GiB) | {central / GIB:.2f} | {client / GIB:.2f} "
          f"| {r['client_over_centralized_peak']:.1%} |")
    print(f"| measured peak above the import baseline ({base['client'] / GIB:.2f} GiB) | "
          f"{(central - base['client']) / GIB:.2f} | {(client - base['client']) / GIB:.2f} "
          f"| {r['client_over_centralized_above_baseline']:.1%} |")
    print(f"| parameters + optimizer state (GiB) | {central_model / GIB:.3f} | {client_model / GIB:.3f} "
          f"| {r['client_over_centralized_model_bytes']:.1%} |")
    print(f"\nserver rank peak: {server / GIB:.2f} GiB (baseline with DeepSpeed {base['server'] / GIB:.2f} GiB)")
    print("\nPROJECTION, client's share of the parameters (config only, nothing run):")
    for name, rows in projection.items():
        if name != "label":
            print("  " + name + ": " + ", ".join(f"p=q={x['p']}: {x['client_fraction']:.1%}" for x in rows))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
