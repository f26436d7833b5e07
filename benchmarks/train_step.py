"""Split vs centralized training step: time per step and bytes on the wire against the minimum.

For each model this runs the real CLI twice with the same config (noise and LoRA at their
defaults): ``train.mode=centralized`` in one process, and ``train.mode=parallel`` under
``mpiexec -n clients+servers``. "Equal cores": centralized gets every core
(``OMP_NUM_THREADS=os.cpu_count()``); the split ranks share the same cores, with the CLI's own
default (``torch threads = cores // ranks-per-node``, at least 1; OMP_NUM_THREADS is removed from
their environment). The thread counts used are written to the JSON.

Minimum bytes per step: only the hidden states and their gradients must cross the wire, in both
directions: ``4 * sum_c B_c * T_c * H * itemsize`` (h_A up, h_B down, dL/dh_B up, dL/dh_A down).
B_c and T_c of every step are reconstructed exactly with ``ClientData(...).batches()``, the same
stream each client rank draws from (same files, client index, tokenizer, seq_len and seed).

    python benchmarks/train_step.py --models tiny,smollm2 --out benchmarks/results/train_step.json
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_DIR = "models/smollm2-135m-instruct"
PHASES = ("client_compute_s", "wait_server_s", "server_compute_s", "wait_clients_s", "sync_s", "optim_s")
WARMUP = 2  # the summary's mean_step_time_s excludes the first 2 steps; so do our phase means

# Per-model defaults; --steps/--seq-len/--micro-batch override them for every model.
MODELS = {
    "tiny": dict(overrides=["model.name_or_path=tiny"], steps=30, seq_len=128, micro_batch=8),
    "smollm2": dict(overrides=[f"model.name_or_path={SMOLLM2_DIR}", "split.head_layers=2",
                               "split.tail_layers=2"], steps=8, seq_len=128, micro_batch=4),
}


def _ensure_smollm2() -> None:
    if (REPO / SMOLLM2_DIR / "config.json").is_file():
        return
    print(f"fetching SmolLM2-135M into {SMOLLM2_DIR} ...", flush=True)
    subprocess.run([sys.executable, "-m", "fedsea_hpc", "fetch-model", "smollm2", "--dest", SMOLLM2_DIR],
                   cwd=REPO, check=True)


def _mpiexec() -> str:
    cand = Path(sys.executable).parent / "mpiexec"
    return str(cand) if cand.exists() else (shutil.which("mpiexec") or "mpiexec")


def split_threads(world: int) -> int:
    """What ``fedsea_hpc.cli._threads`` picks when OMP_NUM_THREADS is unset and all ranks share a node."""
    return max(1, (os.cpu_count() or 1) // max(world, 1))


def _run(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.perf_counter() - t0


def _tail(path: Path, n: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])


def minimum_bytes(overrides: list[str], steps: int) -> dict:
    """Per-step ``sum_c B_c * T_c`` and the minimum activation + gradient bytes, from the data."""
    import torch

    from fedsea_hpc.config import load_config
    from fedsea_hpc.data.dataset import ClientData
    from fedsea_hpc.data.tokenizer import load_tokenizer

    cfg = load_config(None, overrides)  # validate() fills data.train_files exactly as the CLI does
    m = cfg.model
    if m.name_or_path == "tiny":
        hidden = m.tiny_hidden_size
    else:
        hidden = json.loads((REPO / m.name_or_path / "config.json").read_text())["hidden_size"]
    itemsize = torch.empty(0, dtype=getattr(torch, m.dtype)).element_size()
    tok = load_tokenizer(m.name_or_path, cache_dir=m.cache_dir or None)
    n = cfg.topology.clients
    streams = [ClientData(cfg.data.train_files, c, n, tok, cfg.train.seq_len, cfg.run.seed)
               .batches(cfg.train.micro_batch_size) for c in range(n)]
    bt, tokens, samples, lengths_bytes = [], [], [], []
    for _ in range(steps):
        batches = [next(s) for s in streams]
        bt.append(sum(b.input_ids.shape[0] * b.input_ids.shape[1] for b in batches))
        tokens.append(sum(b.num_loss_tokens for b in batches))
        samples.append(sum(b.input_ids.shape[0] for b in batches))
        lengths_bytes.append(sum(b.input_ids.shape[0] * 8 for b in batches))  # int64 [B_c]
    per_step = [4 * x * hidden * itemsize for x in bt]
    return {"hidden_size": hidden, "itemsize": itemsize, "sum_BT_per_step": bt, "tokens_per_step": tokens,
            "samples_per_step": samples, "min_bytes_per_step": per_step,
            "lengths_bytes_per_step": lengths_bytes, "train_files": cfg.data.train_files}


def _phase_means(rows: list[dict]) -> dict:
    steady = rows[min(WARMUP, len(rows) - 1):]
    return {p: sum(r["phase_s"][p] for r in steady) / len(steady) for p in PHASES}


def run_model(name: str, args, run_root: Path) -> dict:
    spec = MODELS[name]
    steps = args.steps or spec["steps"]
    seq_len = args.seq_len or spec["seq_len"]
    mb = args.micro_batch or spec["micro_batch"]
    world = args.clients + args.servers
    if name == "smollm2":
        _ensure_smollm2()
    common = spec["overrides"] + [
        f"train.steps={steps}", f"train.seq_len={seq_len}", f"train.micro_batch_size={mb}",
        f"topology.clients={args.clients}", f"topology.servers={args.servers}",
        "run.progress=false", f"run.log_every={max(1, steps // 5)}",
    ]
    ncpu = os.cpu_count() or 1
    out: dict = {"model": name, "steps": steps, "seq_len": seq_len, "micro_batch_size": mb,
                 "clients": args.clients, "servers": args.servers, "overrides": common, "runs": {}}
    for mode in ("centralized", "parallel"):
        odir = run_root / name / mode
        shutil.rmtree(odir, ignore_errors=True)
        odir.mkdir(parents=True)
        ov = common + [f"train.mode={mode}", f"run.output_dir={odir}"]
        env = dict(os.environ)
        env.pop("OMP_NUM_THREADS", None)
        base = [sys.executable, "-m", "fedsea_hpc", "train", *ov]
        if mode == "centralized":
            env["OMP_NUM_THREADS"] = str(ncpu)
            cmd, threads, ranks = base, ncpu, 1
        else:
            cmd, threads, ranks = [_mpiexec(), "-n", str(world), *base], split_threads(world), world
        load_before = os.getloadavg()
        print(f"[{name}/{mode}] {' '.join(cmd)}", flush=True)
        rc, elapsed = _run(cmd, env, args.timeout, odir / "log.txt")
        if rc != 0:
            raise RuntimeError(f"{name}/{mode} exited {rc} after {elapsed:.0f}s; log tail:\n{_tail(odir / 'log.txt')}")
        summary = json.loads((odir / "summary.json").read_text())
        rows = [json.loads(line) for line in (odir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        out["runs"][mode] = {
            "command": cmd, "ranks": ranks, "torch_threads_per_rank": threads,
            "omp_num_threads_env": env.get("OMP_NUM_THREADS"), "process_wall_s": elapsed,
            "loadavg_before": load_before, "summary": summary, "phase_means_s": _phase_means(rows),
            "per_step": [{k: r[k] for k in ("step", "step_time_s", "bytes_sent", "bytes_sent_by_kind",
                                             "phase_s", "samples", "tokens")} for r in rows],
        }
        print(f"[{name}/{mode}] {summary['mean_step_time_s'] * 1e3:.1f} ms/step, final loss "
              f"{summary['final_loss']:.4f} ({elapsed:.0f}s)", flush=True)

    mins = minimum_bytes(common, steps)
    c, p = out["runs"]["centralized"]["summary"], out["runs"]["parallel"]["summary"]
    # Sanity: the reconstruction must see the very batches the runs saw.
    recon_ok = (p["tokens_total"] == sum(mins["tokens_per_step"]) == c["tokens_total"]
                and p["samples_total"] == sum(mins["samples_per_step"]))
    kinds = p["bytes_sent_by_kind"]
    min_total = sum(mins["min_bytes_per_step"])
    act_grad = kinds["activation"] + kinds["gradient"]
    out["result"] = {
        "split_ms_per_step": p["mean_step_time_s"] * 1e3,
        "centralized_ms_per_step": c["mean_step_time_s"] * 1e3,
        "time_ratio": p["mean_step_time_s"] / c["mean_step_time_s"],
        "time_ratio_target": 1.2,
        "wire_bytes_per_step": p["bytes_sent_total"] / steps,
        "wire_bytes_per_step_by_kind": {k: v / steps for k, v in kinds.items()},
        "min_bytes_per_step": min_total / steps,
        "bytes_ratio": p["bytes_sent_total"] / min_total,
        "payload_act_grad_ratio": act_grad / min_total,  # 1.0 exactly unless something extra is sent
        "bytes_ratio_target": 1.05,
        "final_loss": {"centralized": c["final_loss"], "parallel": p["final_loss"]},
        "reconstruction_matches_runs": recon_ok,
    }
    out["minimum"] = mins
    return out


def _table(results: list[dict]) -> str:
    mib = 2**20
    lines = ["| model | mode | ms/step | ratio | MiB/step | min MiB/step | bytes ratio | final loss |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        s = r["result"]
        lines.append(f"| {r['model']} | centralized (1 proc, {r['runs']['centralized']['torch_threads_per_rank']} thr) "
                     f"| {s['centralized_ms_per_step']:.1f} | 1.00 | 0 | - | - | {s['final_loss']['centralized']:.4f} |")
        lines.append(f"| {r['model']} | parallel ({r['runs']['parallel']['ranks']} ranks, "
                     f"{r['runs']['parallel']['torch_threads_per_rank']} thr each) | {s['split_ms_per_step']:.1f} "
                     f"| {s['time_ratio']:.2f} | {s['wire_bytes_per_step'] / mib:.3f} | {s['min_bytes_per_step'] / mib:.3f} "
                     f"| {s['bytes_ratio']:.4f} | {s['final_loss']['parallel']:.4f} |")
    return "\n".join(lines)


def _phase_table(results: list[dict]) -> str:
    lines = ["| model | mode | " + " | ".join(p.removesuffix("_s") for p in PHASES) + " |",
             "|---|---|" + "---:|" * len(PHASES)]
    for r in results:
        for mode, run in r["runs"].items():
            lines.append(f"| {r['model']} | {mode} | "
                         + " | ".join(f"{run['phase_means_s'][p] * 1e3:.1f}" for p in PHASES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--steps", type=int, default=0, help="steps per run (0 = per-model default: tiny 30, smollm2 8)")
    ap.add_argument("--clients", type=int, default=2)
    ap.add_argument("--servers", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=0, help="0 = per-model default (128)")
    ap.add_argument("--micro-batch", type=int, default=0, help="0 = per-model default (tiny 8, smollm2 4)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    ap.add_argument("--run-dir", default="", help="where run outputs go (default: a temp dir, deleted)")
    ap.add_argument("--out", default="benchmarks/results/train_step.json")
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {list(MODELS)}")

    import deepspeed  # noqa: F401  (version only)
    import torch
    import transformers

    tmp = None if args.run_dir else tempfile.TemporaryDirectory(prefix="fedsea_bench_")
    run_root = Path(args.run_dir or tmp.name).resolve()
    try:
        results = [run_model(m, args, run_root) for m in names]
    finally:
        if tmp is not None:
            tmp.cleanup()
    doc = {
        "benchmark": "train_step",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "deepspeed": deepspeed.__version__,
                    "transformers": transformers.__version__,
                    "mem_total_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "note": "centralized: 1 process with OMP_NUM_THREADS=cpu_count; parallel: clients+servers ranks on the "
                "same cores, torch threads = cores // ranks (CLI default). Times are mean over steps > 2.",
        "results": results,
    }
    out = REPO / args.out if not os.path.isabs(args.out) else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print()
    print(_table(results))
    print()
    print("mean phase times (ms/step, max over ranks, steps > 2):")
    print(_phase_table(results))
    for r in results:
        if not r["result"]["reconstruction_matches_runs"]:
            print(f"WARNING: {r['model']}: reconstructed batches do not match the runs' tokens/samples")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
